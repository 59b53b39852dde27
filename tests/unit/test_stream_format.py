"""vmbk.stream: headers, meta, writer/reader round trips, exact bytes, errors."""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbk.errors import Exit, VmbkError
from vmbk.stream import (
    MAX_REQUEST_SIZE,
    StreamError,
    StreamMeta,
    StreamReader,
    StreamWriter,
    file_checksum,
    read_checksum_file,
    read_meta,
    scan,
    verify_checksum,
    write_stream_atomic,
)
from vmbk.stream.format import FRAME_LEN, pack_header, parse_header

DATE = "2024-01-02T03:04:05.678901"


def meta(**kw: object) -> StreamMeta:
    base: dict[str, object] = dict(
        virtual_size=1 << 20,
        data_size=0,
        disk_name="vda",
        disk_format="qcow2",
        checkpoint_name="virtnbdbackup.0",
        parent_checkpoint="",
        date=DATE,
    )
    base.update(kw)
    return StreamMeta(**base)  # type: ignore[arg-type]


def write(path: Path, m: StreamMeta, frames: list[tuple[str, int, bytes | int]]) -> StreamWriter:
    with StreamWriter(path, m) as w:
        for kind, off, payload in frames:
            if kind == "data":
                assert isinstance(payload, bytes)
                w.write_data(off, payload)
            else:
                assert isinstance(payload, int)
                w.write_zero(off, payload)
    return w


# -- headers ------------------------------------------------------------------


def test_pack_header_exact() -> None:
    assert pack_header("data", 0x100000, 0x4000) == b"data 0000000000100000 0000000000004000\r\n"
    assert pack_header("stop", 0, 0) == b"stop 0000000000000000 0000000000000000\r\n"
    assert len(pack_header("zero", (1 << 64) - 1, 1)) == FRAME_LEN
    with pytest.raises(ValueError):
        pack_header("junk", 0, 0)
    with pytest.raises(ValueError):
        pack_header("data", 1 << 64, 0)


def test_parse_header_round_trip() -> None:
    for kind in ("meta", "data", "zero", "stop", "comp"):
        raw = pack_header(kind, 12345, 678)
        assert parse_header(raw, path="f", pos=0) == (kind, 12345, 678)
    # virtnbdbackup writes lowercase; uppercase hex is still a number
    assert parse_header(b"data 00000000000000AB 0000000000000001\r\n", path="f", pos=0) == (
        "data",
        0xAB,
        1,
    )


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"data 0000000000000000 00000000000000", "truncated frame header"),
        (b"data 0000000000000000 0000000000000001\n\n", "malformed"),
        (b"data_0000000000000000 0000000000000001\r\n", "malformed"),
        (b"junk 0000000000000000 0000000000000001\r\n", "unknown frame kind"),
        (b"DATA 0000000000000000 0000000000000001\r\n", "unknown frame kind"),
        (b"\xff\xfe\xfd\xfc 0000000000000000 0000000000000001\r\n", "unknown frame kind"),
        (b"data 000000000000000g 0000000000000001\r\n", "non-hex"),
        (b"data +000000000000000 0000000000000001\r\n", "non-hex"),
        (b"data 0000000_00000000 0000000000000001\r\n", "non-hex"),
        (b"data  000000000000000 0000000000000001\r\n", "non-hex"),
        (b"data 0000000000000000 -000000000000001\r\n", "non-hex"),
    ],
)
def test_parse_header_rejects(raw: bytes, fragment: str) -> None:
    with pytest.raises(StreamError) as ei:
        parse_header(raw, path="/x/vda.full.data", pos=1234)
    e = ei.value
    assert fragment in str(e)
    assert e.path == "/x/vda.full.data" and e.offset == 1234
    assert "/x/vda.full.data" in str(e) and "1234" in str(e)


def test_stream_error_is_a_storage_error_record() -> None:
    e = StreamError("/b/vda.full.data", 40, "boom", vm="web")
    assert isinstance(e, VmbkError)
    assert e.code == Exit.STORAGE and e.kind == "stream" and e.vm == "web"
    assert str(e) == "/b/vda.full.data: at byte 40: boom"


# -- meta -----------------------------------------------------------------------


def test_meta_json_matches_virtnbdbackup() -> None:
    m = meta(virtual_size=209715200, data_size=43057152)
    assert m.to_json().decode() == (
        "{\n"
        '    "virtualSize": 209715200,\n'
        '    "dataSize": 43057152,\n'
        f'    "date": "{DATE}",\n'
        '    "diskName": "vda",\n'
        '    "diskFormat": "qcow2",\n'
        '    "checkpointName": "virtnbdbackup.0",\n'
        '    "compressed": false,\n'
        '    "compressionMethod": "lz4",\n'
        '    "parentCheckpoint": "",\n'
        '    "incremental": false,\n'
        '    "streamVersion": 2\n'
        "}"
    )
    assert StreamMeta.from_json(m.to_json()) == m


def test_meta_keeps_unknown_keys_and_order() -> None:
    obj = json.loads(meta().to_json())
    obj["vmbkChain"] = {"id": "abc", "seq": 3}
    obj["futureFlag"] = True
    raw = json.dumps(obj, indent=4).encode()
    m = StreamMeta.from_json(raw)
    assert m.extra == {"vmbkChain": {"id": "abc", "seq": 3}, "futureFlag": True}
    assert m.to_json() == raw


def test_meta_version1_legacy_key_round_trip() -> None:
    v1 = {
        "virtualSize": 1048576,
        "dataSize": 0,
        "date": DATE,
        "diskName": "sda",
        "checkpointName": "virtnbdbackup.0",
        "parentCheckpoint": False,
        "incremental": False,
        "stream-version": 1,
    }
    raw = json.dumps(v1, indent=4).encode()
    m = StreamMeta.from_json(raw)
    assert m.stream_version == 1 and m.legacy_version_key
    assert m.disk_format is None and m.compressed is None and not m.is_compressed
    assert m.parent_checkpoint is False
    assert m.to_json() == raw


@pytest.mark.parametrize(
    "compressed, version, expect",
    [
        (False, 2, False),
        (2, 2, True),
        (True, 2, True),
        (0, 2, True),
        (2, 1, False),
        (None, 2, False),
    ],
)
def test_meta_is_compressed_follows_virtnbdrestore(
    compressed: object, version: int, expect: bool
) -> None:
    assert meta(compressed=compressed, stream_version=version).is_compressed is expect


@pytest.mark.parametrize(
    "patch, fragment",
    [
        ({"virtualSize": None}, "virtualSize"),
        ({"virtualSize": "12"}, "virtualSize"),
        ({"dataSize": -1}, "dataSize"),
        ({"dataSize": True}, "dataSize"),
        ({"dataSize": 1 << 40}, "larger than virtualSize"),
        ({"streamVersion": 3}, "unsupported stream version"),
        ({"streamVersion": None}, "streamVersion"),
        ({"diskName": 5}, "diskName"),
        ({"compressed": "yes"}, "compressed"),
        ({"compressed": 2, "compressionMethod": "zstd"}, "compression method"),
        ({"incremental": "no"}, "incremental"),
    ],
)
def test_meta_rejects(patch: dict[str, object], fragment: str) -> None:
    obj = meta().to_dict()
    for k, v in patch.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    with pytest.raises(StreamError, match=fragment) as ei:
        StreamMeta.from_json(json.dumps(obj).encode(), path="p", pos=40)
    assert ei.value.offset == 40


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 100000])
def test_meta_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(StreamError):
        StreamMeta.from_json(raw, path="p", pos=40)


# -- exact bytes ------------------------------------------------------------------


def test_exact_layout_uncompressed(tmp_path: Path) -> None:
    p = tmp_path / "vda.full.data"
    m = meta(virtual_size=32, data_size=6)
    w = write(p, m, [("data", 0, b"abcd"), ("zero", 4, 4), ("data", 16, b"xy"), ("zero", 18, 14)])
    j = m.to_json()
    expected = (
        b"meta 0000000000000000 %016x\r\n" % len(j)
        + j
        + b"\r\n"
        + b"data 0000000000000000 0000000000000004\r\nabcd\r\n"
        + b"zero 0000000000000004 0000000000000004\r\n"
        + b"data 0000000000000010 0000000000000002\r\nxy\r\n"
        + b"zero 0000000000000012 000000000000000e\r\n"
        + b"stop 0000000000000000 0000000000000000\r\n"
    )
    content = p.read_bytes()
    assert content == expected
    assert w.checksum == zlib.adler32(expected) == zlib.adler32(content, 1)
    assert (w.data_size, w.stored_size, w.size, w.frames) == (6, 6, len(expected), 4)

    sm = scan(p)
    assert [(f.kind, f.offset, f.length, f.stored_len, f.pieces) for f in sm.frames] == [
        ("data", 0, 4, 4, ()),
        ("zero", 4, 4, 0, ()),
        ("data", 16, 2, 2, ()),
        ("zero", 18, 14, 0, ()),
    ]
    first = sm.frames[0]
    assert first.header_pos == FRAME_LEN + len(j) + 2
    assert first.file_pos == first.header_pos + FRAME_LEN
    assert content[first.file_pos : first.file_pos + 4] == b"abcd"
    assert sm.stop_pos == len(expected) - FRAME_LEN and sm.trailer_pos is None
    assert sm.meta == m


def test_exact_layout_compressed(tmp_path: Path) -> None:
    p = tmp_path / "vda.full.data"
    a, b = b"A" * 5000, bytes(range(256)) * 10
    m = meta(virtual_size=1 << 20, data_size=len(a) + len(b), compressed=2)
    write(p, m, [("data", 0, a), ("zero", 8192, 8192), ("data", 65536, b)])
    ca = lz4.frame.compress(a, compression_level=2, content_checksum=False, block_checksum=False)
    cb = lz4.frame.compress(b, compression_level=2, content_checksum=False, block_checksum=False)
    trailer = b"[%d, %d]" % (len(ca), len(cb))
    j = m.to_json()
    assert b'"compressed": 2' in j
    expected = (
        b"meta 0000000000000000 %016x\r\n" % len(j)
        + j
        + b"\r\n"
        + b"data 0000000000000000 0000000000001388\r\n"
        + ca
        + b"\r\n"
        + b"zero 0000000000002000 0000000000002000\r\n"
        + b"data 0000000000010000 0000000000000a00\r\n"
        + cb
        + b"\r\n"
        + b"stop 0000000000000000 0000000000000000\r\n"
        + trailer
        + b"\r\n"
        + b"comp 0000000000000000 %016x\r\n" % len(trailer)
    )
    assert p.read_bytes() == expected
    sm = scan(p)
    assert sm.trailer_pos == len(expected) - FRAME_LEN - 2 - len(trailer)
    assert [f.pieces for f in sm.frames] == [(len(ca),), (), (len(cb),)]
    with StreamReader(p) as r:
        assert r.read_frame(sm.frames[0]) == a
        assert r.read_frame(sm.frames[2]) == b
        assert r.read_frame(sm.frames[1]) == bytes(8192)


def test_split_threshold_is_max_request_size(tmp_path: Path) -> None:
    """Frames >= 32 MiB get the {"total": [pieces]} trailer form, smaller ones an int."""
    below = bytes(MAX_REQUEST_SIZE - 1)
    exact = bytes(MAX_REQUEST_SIZE)
    big = bytes(MAX_REQUEST_SIZE) + b"x" * (MAX_REQUEST_SIZE // 2)
    total = len(below) + len(exact) + len(big)
    p = tmp_path / "s.data"
    m = meta(virtual_size=4 * MAX_REQUEST_SIZE, data_size=total, compressed=2)
    with StreamWriter(p, m) as w:
        w.write_data(0, below)
        w.write_data(MAX_REQUEST_SIZE, exact)
        w.write_data(2 * MAX_REQUEST_SIZE, memoryview(big))
    content = p.read_bytes()
    tlen = int(content[-18:-2], 16)
    trailer = json.loads(content[-40 - 2 - tlen : -42])
    assert isinstance(trailer[0], int)
    ((k1, v1),) = trailer[1].items()
    assert len(v1) == 1 and int(k1) == v1[0]
    ((k2, v2),) = trailer[2].items()
    assert len(v2) == 2 and int(k2) == sum(v2)
    sm = scan(p)
    with StreamReader(p) as r:
        assert r.read_frame(sm.frames[2]) == big
        assert r.read_frame(sm.frames[2], MAX_REQUEST_SIZE - 3, 6) == b"\0\0\0xxx"
        assert r.read_frame(sm.frames[1], 5, 5) == bytes(5)


def test_piece_size_and_partial_reads(tmp_path: Path) -> None:
    size = MAX_REQUEST_SIZE + 12345
    data = bytes((i * 7) % 251 for i in range(65536)) * (size // 65536 + 1)
    data = data[:size]
    p = tmp_path / "p.data"
    m = meta(virtual_size=size + 4096, data_size=size, compressed=1)
    with StreamWriter(p, m, piece_size=1 << 20) as w:
        w.write_data(4096, data)
    (fr,) = scan(p).frames
    assert len(fr.pieces) == 33 and fr.offset == 4096
    with StreamReader(p) as r:
        assert r.read_frame(fr) == data
        for start, n in [(0, 1), ((1 << 20) - 1, 2), (5 << 20, 3 << 20), (size - 10, 10)]:
            assert r.read_frame(fr, start, n) == data[start : start + n]
        chunks = list(r.iter_chunks(fr, 1000, 3 << 20, chunk_size=700_000))
        assert all(len(c) <= 700_000 for _, c in chunks)
        assert b"".join(bytes(c) for _, c in chunks) == data[1000 : 1000 + (3 << 20)]
        assert [off for off, _ in chunks][0] == 4096 + 1000
        buf = bytearray(100)
        r.read_frame_into(fr, buf, size - 100)
        assert buf == data[-100:]
        with pytest.raises(ValueError):
            r.read_frame_into(fr, bytearray(2), size - 1)


# -- round trips --------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, bytes | int]]]:
    vsize = draw(st.integers(1, 1 << 16))
    frames: list[tuple[str, int, bytes | int]] = []
    pos = 0
    while pos < vsize and len(frames) < 12:
        gap = draw(st.integers(0, 64))
        pos += gap
        if pos >= vsize:
            break
        length = draw(st.integers(1, min(vsize - pos, 9000)))
        if draw(st.booleans()):
            seed = draw(st.integers(0, 255))
            frames.append(("data", pos, bytes((seed + i * 31) % 256 for i in range(length))))
        else:
            frames.append(("zero", pos, length))
        pos += length
    return vsize, frames


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(layout=layouts(), compressed=st.sampled_from([False, 1, 2, 9]), inc=st.booleans())
def test_round_trip(
    tmp_path: Path, layout: tuple[int, list], compressed: bool | int, inc: bool
) -> None:
    vsize, frames = layout
    dsize = sum(len(p) for k, _, p in frames if k == "data")
    m = meta(virtual_size=vsize, data_size=dsize, compressed=compressed, incremental=inc)
    p = tmp_path / "rt.data"
    w = write(p, m, frames)
    assert w.checksum == zlib.adler32(p.read_bytes())
    sm = scan(p)
    assert sm.meta == m
    assert [(f.kind, f.offset, f.length) for f in sm.frames] == [
        (k, off, len(x) if k == "data" else x)
        for k, off, x in frames  # type: ignore[arg-type]
    ]
    assert sm.data_size == dsize and sm.stored_size == w.stored_size
    with StreamReader(p, sm) as r:
        for f, (kind, _, payload) in zip(sm.frames, frames, strict=True):
            if kind == "data":
                assert r.read_frame(f) == payload
                assert b"".join(bytes(c) for _, c in r.iter_chunks(f, chunk_size=1000)) == payload


def test_file_object_target(tmp_path: Path) -> None:
    bio = io.BytesIO()
    m = meta(virtual_size=100, data_size=3, compressed=2)
    with StreamWriter(bio, m) as w:
        w.write_data(10, b"abc")
    assert w.checksum == zlib.adler32(bio.getvalue())
    p = tmp_path / "f.data"
    p.write_bytes(bio.getvalue())
    with StreamReader(p) as r:
        assert r.read_frame(r.frames[0]) == b"abc"


def test_buffers_of_any_format(tmp_path: Path) -> None:
    import array

    arr = array.array("I", range(100))
    m = meta(virtual_size=4096, data_size=400)
    p = tmp_path / "a.data"
    with StreamWriter(p, m) as w:
        w.write_data(0, arr)
    with StreamReader(p) as r:
        assert r.read_frame(r.frames[0]) == arr.tobytes()


def test_read_meta(tmp_path: Path) -> None:
    p = tmp_path / "m.data"
    m = meta(virtual_size=100, data_size=0)
    write(p, m, [])
    assert read_meta(p) == m


# -- version 1 ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["stream-version", "streamVersion"])
def test_reads_version1_streams(tmp_path: Path, key: str) -> None:
    """Version 1: no compression, no trailer, fewer meta keys, old key spelling."""
    j = json.dumps(
        {
            "virtualSize": 65536,
            "dataSize": 4,
            "date": "2020-11-20T10:00:00",
            "diskName": "sda",
            "checkpointName": "virtnbdbackup.1",
            "parentCheckpoint": "virtnbdbackup.0",
            "incremental": True,
            key: 1,
        },
        indent=4,
    ).encode()
    raw = (
        pack_header("meta", 0, len(j))
        + j
        + b"\r\n"
        + pack_header("data", 512, 4)
        + b"wxyz\r\n"
        + pack_header("stop", 0, 0)
    )
    p = tmp_path / "sda.inc.virtnbdbackup.1.data"
    p.write_bytes(raw)
    sm = scan(p)
    assert sm.meta.stream_version == 1 and sm.meta.incremental
    assert sm.meta.disk_format is None and not sm.compressed
    with StreamReader(p) as r:
        assert r.read_frame(sm.frames[0]) == b"wxyz"


def test_version2_without_disk_format(tmp_path: Path) -> None:
    """diskFormat appeared in 2022 without a version bump."""
    m = meta(virtual_size=100, data_size=1, disk_format=None)
    obj = m.to_dict()
    assert "diskFormat" not in obj
    j = json.dumps(obj, indent=4).encode()
    p = tmp_path / "old.data"
    p.write_bytes(
        pack_header("meta", 0, len(j))
        + j
        + b"\r\n"
        + pack_header("data", 0, 1)
        + b"x\r\n"
        + pack_header("stop", 0, 0)
    )
    assert scan(p).meta.disk_format is None


def test_writer_version1(tmp_path: Path) -> None:
    p = tmp_path / "v1.data"
    write(
        p,
        meta(virtual_size=100, data_size=1, stream_version=1, compressed=False),
        [("data", 0, b"x")],
    )
    assert scan(p).meta.stream_version == 1
    with pytest.raises(ValueError):
        StreamWriter(tmp_path / "bad", meta(stream_version=1, compressed=2))


# -- writer misuse ------------------------------------------------------------


def test_writer_rejects_misuse(tmp_path: Path) -> None:
    m = meta(virtual_size=1000, data_size=10)
    w = StreamWriter(tmp_path / "x", m)
    w.write_data(100, b"12345")
    with pytest.raises(ValueError, match="increasing"):
        w.write_data(50, b"1")
    with pytest.raises(ValueError, match="increasing"):
        w.write_zero(104, 10)
    with pytest.raises(ValueError, match="virtualSize"):
        w.write_data(998, b"123")
    with pytest.raises(ValueError, match="empty"):
        w.write_data(500, b"")
    with pytest.raises(ValueError, match="dataSize"):
        w.close()
    with pytest.raises(ValueError, match="aborted"):
        w.close()
    with pytest.raises(ValueError):
        StreamWriter(tmp_path / "y", meta(disk_format=None))
    with pytest.raises(ValueError):
        StreamWriter(tmp_path / "z", meta(), piece_size=MAX_REQUEST_SIZE + 1)


# -- atomic write and checksums -------------------------------------------------


def test_write_stream_atomic(tmp_path: Path) -> None:
    p = tmp_path / "vda.full.data"
    (tmp_path / "vda.full.data.chksum").write_text("12345")  # stale, from an older file
    m = meta(virtual_size=100, data_size=3)
    with write_stream_atomic(p, m) as w:
        assert w.path == f"{p}.partial"
        assert not p.exists() and (tmp_path / "vda.full.data.partial").exists()
        w.write_data(0, b"abc")
    assert sorted(os.listdir(tmp_path)) == ["vda.full.data", "vda.full.data.chksum"]
    stored = (tmp_path / "vda.full.data.chksum").read_text()
    assert stored == str(zlib.adler32(p.read_bytes())) == str(w.checksum)
    assert "\n" not in stored
    assert read_checksum_file(p) == w.checksum == file_checksum(p)
    assert verify_checksum(p, required=True) is True


def test_write_stream_atomic_failure_leaves_nothing(tmp_path: Path) -> None:
    p = tmp_path / "vda.inc.virtnbdbackup.1.data"
    with pytest.raises(RuntimeError):
        with write_stream_atomic(p, meta(virtual_size=100, data_size=3)) as w:
            w.write_data(0, b"abc")
            raise RuntimeError("NBD read failed")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="dataSize"):
        with write_stream_atomic(p, meta(virtual_size=100, data_size=4)) as w:
            w.write_data(0, b"abc")
    assert os.listdir(tmp_path) == []


def test_verify_checksum(tmp_path: Path) -> None:
    p = tmp_path / "v.data"
    with write_stream_atomic(p, meta(virtual_size=100, data_size=3)) as w:
        w.write_data(0, b"abc")
    raw = bytearray(p.read_bytes())
    raw[-45] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(StreamError, match="adler32") as ei:
        verify_checksum(p)
    assert ei.value.path == str(p)
    (tmp_path / "v.data.chksum").unlink()
    assert verify_checksum(p) is False
    with pytest.raises(StreamError, match="missing"):
        verify_checksum(p, required=True)
    (tmp_path / "v.data.chksum").write_text("abc")
    with pytest.raises(StreamError, match="adler32 value"):
        verify_checksum(p)


# -- reader errors -------------------------------------------------------------


def _valid(tmp_path: Path, compressed: bool | int = False) -> tuple[Path, bytes]:
    p = tmp_path / "ok.data"
    m = meta(virtual_size=1 << 16, data_size=300, compressed=compressed)
    write(p, m, [("data", 0, b"a" * 100), ("zero", 100, 900), ("data", 4096, b"b" * 200)])
    return p, p.read_bytes()


def _expect_error(
    tmp_path: Path, raw: bytes, fragment: str, offset: int | None = None
) -> StreamError:
    p = tmp_path / "bad.data"
    p.write_bytes(raw)
    with pytest.raises(StreamError) as ei:
        with StreamReader(p) as r:
            for f in r.frames:
                r.read_frame(f)
    e = ei.value
    assert fragment in e.detail, e
    assert e.path == str(p)
    if offset is not None:
        assert e.offset == offset, e
    return e


def _frame_positions(raw: bytes, kind: bytes) -> list[int]:
    out, i = [], raw.find(kind + b" ")
    while i >= 0:
        out.append(i)
        i = raw.find(kind + b" ", i + 1)
    return out


def test_error_truncated(tmp_path: Path) -> None:
    _, raw = _valid(tmp_path)
    _expect_error(tmp_path, b"", "truncated frame header", 0)
    _expect_error(tmp_path, raw[:30], "truncated frame header", 0)
    _expect_error(tmp_path, raw[:60], "does not fit the file", 0)
    _expect_error(tmp_path, raw[:-40], "without a stop frame")
    _expect_error(tmp_path, raw[:-1], "without a stop frame")
    d = _frame_positions(raw, b"data")[1]
    _expect_error(tmp_path, raw[: d + 60], "runs past the end", d)
    _, rawc = _valid(tmp_path, compressed=2)
    _expect_error(tmp_path, rawc[:-1], "malformed frame header")
    _expect_error(tmp_path, rawc[:-50], "")


def test_error_bad_kind_and_hex(tmp_path: Path) -> None:
    _, raw = _valid(tmp_path)
    z = _frame_positions(raw, b"zero")[0]
    _expect_error(tmp_path, raw[:z] + b"zer0" + raw[z + 4 :], "unknown frame kind", z)
    _expect_error(tmp_path, raw[:z] + b"meta" + raw[z + 4 :], "unexpected 'meta' frame", z)
    _expect_error(tmp_path, raw[: z + 5] + b"x" + raw[z + 6 :], "non-hex", z)
    _expect_error(tmp_path, raw[: z + 5] + b" " + raw[z + 6 :], "non-hex", z)
    _expect_error(tmp_path, b"xxxx" + raw[4:], "unknown frame kind", 0)
    _expect_error(tmp_path, raw.replace(b"meta", b"data", 1), "does not start with a meta frame", 0)


def test_error_frame_order_and_bounds(tmp_path: Path) -> None:
    m = meta(virtual_size=1000, data_size=2)
    j = m.to_json()
    head = pack_header("meta", 0, len(j)) + j + b"\r\n"
    stop = pack_header("stop", 0, 0)
    d1 = pack_header("data", 100, 1) + b"x\r\n"
    # out of order
    raw = head + d1 + pack_header("data", 50, 1) + b"y\r\n" + stop
    _expect_error(tmp_path, raw, "overlaps or precedes", len(head) + len(d1))
    # overlapping (a zero frame inside the data frame)
    raw = head + pack_header("data", 100, 2) + b"xy\r\n" + pack_header("zero", 101, 5) + stop
    _expect_error(tmp_path, raw, "overlaps or precedes")
    # past virtualSize
    raw = head + d1 + pack_header("zero", 990, 11) + pack_header("data", 0, 1) + stop
    _expect_error(tmp_path, raw, "past virtualSize", len(head) + len(d1))
    # huge length: rejected from the header, nothing allocated
    raw = head + pack_header("data", 0, (1 << 64) - 1) + b"x\r\n" + stop
    _expect_error(tmp_path, raw, "past virtualSize", len(head))
    big = meta(virtual_size=(1 << 63), data_size=1 << 62)
    j2 = big.to_json()
    raw = (
        pack_header("meta", 0, len(j2))
        + j2
        + b"\r\n"
        + pack_header("data", 0, 1 << 62)
        + b"\r\n"
        + stop
    )
    _expect_error(tmp_path, raw, "runs past the end")
    raw = pack_header("meta", 0, 1 << 62) + j
    _expect_error(tmp_path, raw, "does not fit the file", 0)
    # empty frames
    raw = head + pack_header("zero", 10, 0) + d1 + b"" + stop
    _expect_error(tmp_path, raw, "empty zero frame")
    # missing CRLF after payload
    raw = head + pack_header("data", 100, 1) + b"x\n\n" + stop
    _expect_error(tmp_path, raw, "not followed by CRLF", len(head) + 41)
    # junk after stop
    raw = head + pack_header("data", 100, 2) + b"xy\r\n" + stop + b"junk"
    _expect_error(tmp_path, raw, "after the stop frame", len(raw) - 4)
    # stop frame with values
    raw = head + pack_header("data", 100, 2) + b"xy\r\n" + pack_header("stop", 1, 0)
    _expect_error(tmp_path, raw, "stop frame with")


def test_error_data_size_mismatch(tmp_path: Path) -> None:
    m = meta(virtual_size=1000, data_size=3)
    j = m.to_json()
    raw = pack_header("meta", 0, len(j)) + j + b"\r\n" + pack_header("data", 0, 2) + b"xy\r\n"
    raw += pack_header("stop", 0, 0)
    e = _expect_error(tmp_path, raw, "dataSize 3", FRAME_LEN)
    assert "2 bytes" in e.detail


def _replace_trailer(raw: bytes, trailer: bytes, comp_len: int | None = None) -> bytes:
    tlen = int(raw[-18:-2], 16)
    body = raw[: -40 - 2 - tlen]
    n = len(trailer) if comp_len is None else comp_len
    return body + trailer + b"\r\n" + pack_header("comp", 0, n)


def test_error_trailer_mismatch(tmp_path: Path) -> None:
    _, raw = _valid(tmp_path, compressed=2)
    tlen = int(raw[-18:-2], 16)
    entries = json.loads(raw[-42 - tlen : -42])
    a, b = entries
    _expect_error(tmp_path, _replace_trailer(raw, b"[%d]" % a), "no compression trailer entry")
    _expect_error(
        tmp_path, _replace_trailer(raw, b"[%d, %d, 5]" % (a, b)), "3 entries for 2 data frames"
    )
    _expect_error(tmp_path, _replace_trailer(raw, b"[%d, %d]" % (a + 1, b)), "not followed by CRLF")
    _expect_error(tmp_path, _replace_trailer(raw, b"[%d, %d]" % (a - 1, b)), "")
    _expect_error(
        tmp_path,
        _replace_trailer(raw, b'[{"%d": [%d]}, %d]' % (a + 1, a, b)),
        "entry 0 is malformed",
    )
    _expect_error(tmp_path, _replace_trailer(raw, b"[%d, -4]" % a), "entry 1 is malformed")
    _expect_error(tmp_path, _replace_trailer(raw, b"[%d, true]" % a), "entry 1 is malformed")
    _expect_error(tmp_path, _replace_trailer(raw, b"{}"), "not a JSON list")
    _expect_error(tmp_path, _replace_trailer(raw, b"[1, 2"), "not valid JSON")
    _expect_error(
        tmp_path,
        _replace_trailer(raw, b"[%d, %d]" % (a, b), comp_len=10**9),
        "does not fit the file",
    )
    _expect_error(
        tmp_path,
        _replace_trailer(raw, b"[%d, %d]" % (a, b), comp_len=4),
        "does not lead back to a stop",
    )
    # a compressed stream whose trailer is gone
    _expect_error(tmp_path, raw[: -42 - tlen], "does not end with a comp frame")


def test_error_corrupt_lz4(tmp_path: Path) -> None:
    _, raw = _valid(tmp_path, compressed=2)
    d = _frame_positions(raw, b"data")[0] + FRAME_LEN
    bad = bytearray(raw)
    bad[d + 12] ^= 0x55  # inside the first lz4 block
    _expect_error(tmp_path, bytes(bad), "lz4 piece 0", d)


def test_reader_detects_changed_file(tmp_path: Path) -> None:
    p, raw = _valid(tmp_path)
    sm = scan(p)
    p.write_bytes(raw + b"x")
    with pytest.raises(StreamError, match="map was made for"):
        StreamReader(p, sm)


def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StreamError, match="cannot open") as ei:
        scan(tmp_path / "nope.data")
    assert ei.value.offset == 0


@pytest.mark.parametrize("target", ["path", "fileobj"])
def test_checksum_of_large_payloads(tmp_path: Path, target: str) -> None:
    """Every frame is summed on its own and combined: the order must hold."""
    blobs = [os.urandom(3 << 20), b"\x01" * 100, os.urandom(1 << 20)]
    m = meta(virtual_size=16 << 20, data_size=sum(map(len, blobs)))
    p = tmp_path / "big.data"
    with open(p, "wb") as f:
        with StreamWriter(p if target == "path" else f, m) as w:
            w.write_data(0, blobs[0])
            w.write_zero(4 << 20, 1 << 20)
            w.write_data(5 << 20, blobs[1])
            w.write_data(8 << 20, memoryview(blobs[2]))
    assert w.checksum == zlib.adler32(p.read_bytes()) == file_checksum(p)


# -- reserve / fill / commit: frames filled on other threads ---------------------


def _frames_for(vsize: int, seed: int) -> list[tuple[str, int, bytes | int]]:
    """Data frames of random and compressible bytes, zero frames between."""
    rnd = __import__("random").Random(seed)
    frames: list[tuple[str, int, bytes | int]] = []
    pos = 0
    while pos < vsize - 70_000:
        n = rnd.randint(1, 60_000)
        if rnd.random() < 0.3:
            frames.append(("zero", pos, n))
        else:
            frames.append(("data", pos, os.urandom(n // 2) + b"z" * (n - n // 2)))
        pos += n + rnd.choice([0, 0, 512])
    return frames


def _reserve_data_frames(w: StreamWriter, frames: list[tuple[str, int, bytes | int]]) -> Iterator[tuple[int, bytes]]:
    """Write the zero frames; reserve each data frame and yield it to be filled."""
    for kind, off, payload in frames:
        if kind == "zero":
            assert isinstance(payload, int)
            w.write_zero(off, payload)
            continue
        assert isinstance(payload, bytes)
        w.reserve(off, len(payload))
        yield off, payload


@pytest.mark.parametrize("compressed", [False, 2], ids=["plain", "lz4"])
@pytest.mark.parametrize("target", ["path", "fileobj"])
def test_fill_on_threads_in_any_order_writes_the_same_bytes(
    tmp_path: Path, compressed: bool | int, target: str
) -> None:
    """reserve in order, fill on a pool in random order, commit in order."""
    from concurrent.futures import ThreadPoolExecutor

    frames = _frames_for(4 << 20, 7)
    m = meta(virtual_size=4 << 20, data_size=sum(len(p) for k, _, p in frames if k == "data"),
             compressed=compressed)
    ref = write(tmp_path / "ref.data", m, frames)
    p = tmp_path / "par.data"
    with open(p, "wb") as f, ThreadPoolExecutor(4) as pool, StreamWriter(p if target == "path" else f, m) as w:
        window: list = []
        for off, payload in _reserve_data_frames(w, frames):
            window.append(pool.submit(w.fill, off, payload))
            if len(window) == 6:  # several frames reserved ahead, as the backup does
                w.commit(window.pop(0).result())
        for fut in window:
            w.commit(fut.result())
    assert p.read_bytes() == (tmp_path / "ref.data").read_bytes()
    assert w.checksum == ref.checksum == zlib.adler32(p.read_bytes())
    assert (w.size, w.data_size, w.stored_size, w.frames, w.zero_frames) == (
        ref.size, ref.data_size, ref.stored_size, ref.frames, ref.zero_frames)


@pytest.mark.parametrize("compressed", [False, 2], ids=["plain", "lz4"])
def test_finish_in_any_order_writes_the_same_bytes(tmp_path: Path, compressed: bool | int) -> None:
    """fill (write=False) and finish frames in random order, as the unordered backup does."""
    rnd = __import__("random").Random(11)
    frames = _frames_for(4 << 20, 8)
    m = meta(virtual_size=4 << 20, data_size=sum(len(p) for k, _, p in frames if k == "data"),
             compressed=compressed)
    ref = write(tmp_path / "ref.data", m, frames)
    p = tmp_path / "any.data"
    committed = 0
    with StreamWriter(p, m) as w:
        window: list = []
        for off, payload in _reserve_data_frames(w, frames):
            window.append(w.fill(off, bytearray(payload), write=False))
            if len(window) == 6:
                committed += w.finish(window.pop(rnd.randrange(len(window))))
        rnd.shuffle(window)
        for frame in window:
            committed += w.finish(frame)
    assert p.read_bytes() == (tmp_path / "ref.data").read_bytes()
    assert w.checksum == ref.checksum == zlib.adler32(p.read_bytes())
    assert committed == w.stored_size == ref.stored_size


def test_finish_out_of_order_refused_for_a_file_object(tmp_path: Path) -> None:
    """Its frames are written by commit from the caller's buffers: only in order."""
    m = meta(virtual_size=1000, data_size=10)
    with open(tmp_path / "x", "wb") as f:
        w = StreamWriter(f, m)
        w.reserve(0, 5)
        w.reserve(10, 5)
        second = w.fill(10, b"12345", write=False)
        with pytest.raises(ValueError, match="order reserved"):
            w.finish(second)
        assert w.finish(w.fill(0, b"abcde")) == 5
        assert w.finish(second) == 5
        w.close()
    assert scan(tmp_path / "x").meta.data_size == 10


def test_zero_frames_alone_are_flushed_in_order(tmp_path: Path) -> None:
    """Many zero frames and no data: queued headers are written as they pile up."""
    m = meta(virtual_size=1 << 30, data_size=5)
    p = tmp_path / "z.data"
    with StreamWriter(p, m) as w:
        for i in range(5000):
            w.write_zero(i * 4096, 1024)
        w.write_data(5000 * 4096, b"12345")
    sm = scan(p)
    assert len(sm.frames) == 5001 and w.checksum == zlib.adler32(p.read_bytes())


def test_reserve_fill_commit_misuse(tmp_path: Path) -> None:
    m = meta(virtual_size=1000, data_size=10)
    w = StreamWriter(tmp_path / "x", m)
    w.reserve(0, 5)
    w.reserve(10, 5)
    with pytest.raises(ValueError, match="no data frame reserved"):
        w.fill(5, b"12345")
    with pytest.raises(ValueError, match="reserved for 5 bytes, got 3"):
        w.fill(10, b"123")
    second = w.fill(10, b"12345")
    with pytest.raises(ValueError, match="order reserved"):
        w.commit(second)
    w.commit(w.fill(0, b"abcde"))
    with pytest.raises(ValueError, match="not committed"):
        w.close()
    assert w.closed
    with pytest.raises(ValueError, match="aborted"):
        w.fill(10, b"12345")


def test_a_failed_write_is_reported_by_every_later_fill(tmp_path: Path, monkeypatch) -> None:
    """Frames are filled out of order: whichever comes first in the file says why."""
    import errno

    import vmbk.stream.writer as writer_mod

    m = meta(virtual_size=1 << 20, data_size=3000)
    w = StreamWriter(tmp_path / "x", m)
    for off in (0, 1000, 2000):
        w.reserve(off, 1000)
    real = os.pwritev

    def pwritev(fd: int, bufs: list, pos: int) -> int:
        if any(bytes(b[:4]) == b"data" and b" 00000000000007d0 " in bytes(b) for b in bufs):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, pos)

    monkeypatch.setattr(writer_mod.os, "pwritev", pwritev)
    with pytest.raises(VmbkError, match="No space"):
        w.fill(2000, bytes(1000))
    with pytest.raises(VmbkError, match="No space"):
        w.fill(0, bytes(1000))
    w.abort()
    with pytest.raises(ValueError, match="aborted"):
        w.close()
