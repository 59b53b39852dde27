"""vmbk.stream.scan.probe: the cheap check of a stream's end (listings, plans).

Sound streams pass; every truncation, appended bytes and damage to the
last frame (stop, comp header) are found without reading a payload.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_stream_fuzz import CORPUS

from vmbk.stream import StreamError, scan
from vmbk.stream.scan import probe


@pytest.fixture(params=range(len(CORPUS)))
def stream(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, bytes]:
    """The fuzzer's valid streams: plain, lz4 (split frames too), empty, zero-only, version 1."""
    p = tmp_path / "s.data"
    p.write_bytes(CORPUS[request.param])
    return p, CORPUS[request.param]


def verdict(p: Path) -> StreamError | None:
    try:
        return probe(p)[1]
    except StreamError as e:
        return e


def test_a_sound_stream_passes(stream: tuple[Path, bytes]) -> None:
    p, _ = stream
    meta, problem = probe(p)
    assert problem is None and meta == scan(p).meta


def test_every_truncation_and_every_extension_is_found(stream: tuple[Path, bytes]) -> None:
    p, raw = stream
    for n in range(len(raw) - 1, -1, -1):
        p.write_bytes(raw[:n])
        assert verdict(p) is not None, n
    for extra in (b"\0", b"\r\n", b"x" * 40, raw[-40:]):
        p.write_bytes(raw + extra)
        assert verdict(p) is not None, extra


def scans(p: Path) -> bool:
    try:
        scan(p)
    except StreamError:
        return False
    return True


def test_damage_to_the_last_frame_is_found(stream: tuple[Path, bytes]) -> None:
    """Every flip in the last 40 bytes that the full scan refuses (``A`` for ``a`` in a hex field is harmless)."""
    p, raw = stream
    for pos in range(len(raw) - 40, len(raw)):
        for bit in (0x01, 0x20):
            bad = bytearray(raw)
            bad[pos] ^= bit
            p.write_bytes(bad)
            assert verdict(p) is not None or scans(p), (pos, bit)


def test_a_size_that_does_not_add_up_is_found(tmp_path: Path) -> None:
    """dataSize larger than the payloads the file can hold: the end is intact, the size is not."""
    p = tmp_path / "s.data"
    p.write_bytes(CORPUS[0])  # uncompressed, 3103 bytes of data in 3 frames
    j = scan(p).meta.to_json()
    bigger = j.replace(b'"dataSize": 3103', b'"dataSize": 3283')  # more than the frames' room
    assert bigger != j
    p.write_bytes(CORPUS[0].replace(j, bigger))
    assert verdict(p) is not None
