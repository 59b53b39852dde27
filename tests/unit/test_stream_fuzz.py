"""Fuzzing the stream reader with mutated valid streams.

Whatever the bytes, scanning and reading must either succeed or raise
StreamError: no other exception, no hang, no allocation beyond the file
size and one lz4 piece.  (A flipped byte inside an uncompressed payload is
not detectable without the checksum, so success is allowed.)
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbk.stream import StreamError, StreamMeta, StreamReader, StreamWriter, scan
from vmbk.stream.format import pack_header
from vmbk.stream.writer import compress_piece


def _meta(**kw: object) -> StreamMeta:
    base: dict[str, object] = dict(
        virtual_size=1 << 16, data_size=0, disk_name="vda", date="2024-01-01T00:00:00"
    )
    base.update(kw)
    return StreamMeta(**base)  # type: ignore[arg-type]


def _write(path: Path, compressed: bool | int, frames: list[tuple[str, int, bytes | int]]) -> bytes:
    dsize = sum(len(p) for k, _, p in frames if k == "data")  # type: ignore[arg-type]
    with StreamWriter(path, _meta(data_size=dsize, compressed=compressed)) as w:
        for kind, off, payload in frames:
            if kind == "data":
                w.write_data(off, payload)  # type: ignore[arg-type]
            else:
                w.write_zero(off, payload)  # type: ignore[arg-type]
    return path.read_bytes()


def _split_by_hand(frames: list[tuple[int, bytes, int]]) -> bytes:
    """A compressed stream whose frames use the {"total": [pieces]} form."""
    m = _meta(data_size=sum(len(d) for _, d, _ in frames), compressed=2)
    j = m.to_json()
    out = [pack_header("meta", 0, len(j)), j, b"\r\n"]
    trailer: list[object] = []
    for off, data, piece in frames:
        out.append(pack_header("data", off, len(data)))
        sizes = []
        for i in range(0, len(data), piece):
            c = compress_piece(data[i : i + piece], 2)
            sizes.append(len(c))
            out.append(c)
        out.append(b"\r\n")
        trailer.append({str(sum(sizes)): sizes})
    t = json.dumps(trailer).encode()
    out += [pack_header("stop", 0, 0), t, b"\r\n", pack_header("comp", 0, len(t))]
    return b"".join(out)


def _corpus() -> list[bytes]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.data"
        pattern = bytes((i * 13) % 256 for i in range(3000))
        frames: list[tuple[str, int, bytes | int]] = [
            ("data", 0, b"a" * 100),
            ("zero", 100, 900),
            ("data", 4096, pattern),
            ("zero", 8192, 4096),
            ("data", 20000, b"xyz"),
        ]
        corpus = [
            _write(p, False, frames),
            _write(p, 2, frames),
            _write(p, 2, []),
            _write(p, False, [("zero", 0, 1 << 16)]),
        ]
    corpus.append(_split_by_hand([(0, pattern, 1000), (8192, b"q" * 2500, 1024)]))
    v1 = json.dumps(
        {
            "virtualSize": 65536,
            "dataSize": 4,
            "diskName": "sda",
            "incremental": False,
            "stream-version": 1,
        }
    ).encode()
    corpus.append(
        pack_header("meta", 0, len(v1))
        + v1
        + b"\r\n"
        + pack_header("data", 512, 4)
        + b"wxyz\r\n"
        + pack_header("stop", 0, 0)
    )
    return corpus


CORPUS = _corpus()
WORKDIR = tempfile.mkdtemp(prefix="vmbk-fuzz-")

TOKENS = [
    b"data ",
    b"zero ",
    b"stop ",
    b"comp ",
    b"meta ",
    b"\r\n",
    b" ",
    b"0",
    b"f",
    b"ffffffffffffffff",
    b"7fffffffffffffff",
    b"0000000000000000",
    b"[",
    b"]",
    b"{",
    b"}",
    b'"',
    b"-1",
    b"1e309",
    b"\x00",
    b"\x04\x22\x4d\x18",  # lz4 frame magic
]


def _landmarks(raw: bytes) -> list[int]:
    """Where headers, the meta end and the trailer are: mutations aim there."""
    marks = [0, raw.find(b"}\r\n") + 1, len(raw) - 40, len(raw) - 42, max(raw.rfind(b"\r\n["), 0)]
    for kind in (b"data ", b"zero ", b"stop ", b"comp "):
        i = raw.find(kind)
        while i >= 0:
            marks += [i, i + 5, i + 21, i + 22, i + 38, i + 40]
            i = raw.find(kind, i + 1)
    return sorted({m for m in marks if 0 <= m < len(raw)})


LANDMARKS = {raw: _landmarks(raw) for raw in CORPUS}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(CORPUS))
    raw = bytearray(base)
    body = base.find(b"}\r\n") + 3
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "token"]))
        where = draw(st.sampled_from(["landmark", "landmark", "body", "body", "anywhere"]))
        if where == "landmark":
            pos = draw(st.sampled_from(LANDMARKS[base])) + draw(st.integers(-2, 20))
        elif where == "body":
            pos = body + draw(st.integers(0, max(len(raw) - body, 0)))
        else:
            pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        pos = min(max(pos, 0), max(len(raw) - 1, 0))
        if op == "flip" and raw:
            raw[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del raw[pos : pos + draw(st.integers(1, 64))]
        elif op == "overwrite":
            junk = draw(st.binary(min_size=1, max_size=16))
            raw[pos : pos + len(junk)] = junk
        else:
            tok = draw(st.sampled_from(TOKENS))
            if draw(st.booleans()):
                raw[pos : pos + len(tok)] = tok
            else:
                raw[pos:pos] = tok
    return bytes(raw)


def _consume(path: str) -> Iterator[int]:
    """Scan and read everything the way a restore would (chunked)."""
    sm = scan(path)
    with StreamReader(path, sm) as r:
        for f in sm.frames:
            if f.kind == "data":
                n = 0
                for _, chunk in r.iter_chunks(f, chunk_size=1 << 20):
                    n += len(chunk)
                assert n == f.length
                yield n
                if f.length > 2:
                    mid = f.length // 2
                    assert len(r.read_frame(f, mid, 2)) == 2
            else:
                r.read_frame_into(f, bytearray(min(f.length, 4096)))


@settings(max_examples=3000, deadline=None)
@given(raw=mutated())
def test_fuzz_reader_raises_only_stream_error(raw: bytes) -> None:
    path = os.path.join(WORKDIR, "fuzz.data")
    with open(path, "wb") as f:
        f.write(raw)
    try:
        for _ in _consume(path):
            pass
    except StreamError as e:
        assert e.path == path
        assert isinstance(e.offset, int) and 0 <= e.offset <= max(len(raw), 0) + 40


def test_corpus_is_valid() -> None:
    path = os.path.join(WORKDIR, "corpus.data")
    for raw in CORPUS:
        Path(path).write_bytes(raw)
        list(_consume(path))


@pytest.mark.parametrize("compressed", [False, 2])
def test_every_truncation_is_an_error(compressed: bool | int) -> None:
    raw = CORPUS[0] if not compressed else CORPUS[1]
    path = os.path.join(WORKDIR, "trunc.data")
    for cut in range(len(raw)):
        Path(path).write_bytes(raw[:cut])
        with pytest.raises(StreamError):
            list(_consume(path))


def test_huge_claims_allocate_nothing(tmp_path: Path) -> None:
    """Lengths in headers/trailers are checked before anything is allocated."""
    big = _meta(virtual_size=1 << 62, data_size=1 << 61, compressed=2)
    j = big.to_json()
    head = pack_header("meta", 0, len(j)) + j + b"\r\n"
    piece = compress_piece(b"x" * 100, 2)
    cases = [
        pack_header("meta", 0, 1 << 40) + b"{}",
        # uncompressed meta with a 2**61-byte data frame
        head.replace(b'"compressed": 2', b'"compressed": false')
        + pack_header("data", 0, 1 << 61)
        + piece
        + b"\r\n"
        + pack_header("stop", 0, 0),
        # compressed: 2**61 bytes from one small piece
        head
        + pack_header("data", 0, 1 << 61)
        + piece
        + b"\r\n"
        + pack_header("stop", 0, 0)
        + b"[%d]\r\n" % len(piece)
        + pack_header("comp", 0, len(b"[%d]" % len(piece))),
        # trailer length claiming 2**60 bytes
        head + pack_header("stop", 0, 0) + b"[]\r\n" + pack_header("comp", 0, 1 << 60),
    ]
    p = tmp_path / "huge.data"
    tracemalloc.start()
    try:
        for raw in cases:
            p.write_bytes(raw)
            tracemalloc.reset_peak()
            with pytest.raises(StreamError):
                list(_consume(str(p)))
            _, peak = tracemalloc.get_traced_memory()
            assert peak < 4 << 20, peak
    finally:
        tracemalloc.stop()


def test_lz4_piece_decompressing_past_frame(tmp_path: Path) -> None:
    """A piece that holds more than its frame's length is caught, bounded."""
    data = b"y" * 5000
    raw = _split_by_hand([(0, data, 5000)])
    # claim the frame is 4000 bytes (and dataSize accordingly)
    raw = raw.replace(
        b"data 0000000000000000 0000000000001388", b"data 0000000000000000 0000000000000fa0"
    )
    raw = raw.replace(b'"dataSize": 5000', b'"dataSize": 4000')
    meta_len = raw.index(b"}\r\n") + 1 - 40
    raw = pack_header("meta", 0, meta_len) + raw[40:]
    p = tmp_path / "over.data"
    p.write_bytes(raw)
    with pytest.raises(StreamError, match="lz4 piece 0"):
        list(_consume(str(p)))
