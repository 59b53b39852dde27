"""vmbk.stream.chain: merging a chain's extent maps, newest frame wins."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmbk.stream.chain as chain_mod
from vmbk.stream import StreamMeta, StreamWriter, merge_chain, reconstruct_raw
from vmbk.stream.chain import Segment, frames_from_picture, picture
from vmbk.stream.scan import Frame


def test_docstring_pictures() -> None:
    result = doctest.testmod(chain_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


@pytest.mark.parametrize(
    "pictures, merged",
    [
        (["AAAA"], "AAAA"),
        (["AAAA", "...."], "AAAA"),
        (["....", "BBBB"], "BBBB"),
        (["AAAA", "1111"], "1111"),
        (["0000", ".BB."], "0BB0"),
        (["AA..AA", "..BB.."], "AABBAA"),
        (["A.A.A.A.", ".B.B.B.B"], "ABABABAB"),
        (["AAAAAAAA", ".BB..BB.", "..CCCC.."], "ABCCCCBA"),
        (["AAAA00AA", "..1111..", "...CC..."], "AA1CC1AA"),
        (["........", "..BB....", "CCCCCCCC"], "CCCCCCCC"),
        (["AAAA", "..BB", "C...", ".3.."], "C3BB"),
    ],
)
def test_drawn_cases(pictures: list[str], merged: str) -> None:
    size = len(pictures[0])
    segs = merge_chain([frames_from_picture(p) for p in pictures])
    assert picture(segs, size) == merged


def test_unit_scale_and_frame_offsets() -> None:
    unit = 4096
    full = frames_from_picture("AAAAAAAA", unit)
    inc = frames_from_picture("..BB....", unit)
    segs = merge_chain([full, inc])
    assert [
        (s.offset // unit, s.length // unit, s.source, s.frame_offset // unit) for s in segs
    ] == [
        (0, 2, 0, 0),
        (2, 2, 1, 0),
        (4, 4, 0, 4),
    ]
    assert segs[2].frame is full[0]


def test_rejects_unsorted_frames() -> None:
    f1 = Frame("data", 10, 5, 0, 5)
    f2 = Frame("data", 12, 5, 0, 5)
    with pytest.raises(ValueError):
        merge_chain([[f1, f2]])
    with pytest.raises(ValueError):
        merge_chain([[Frame("zero", 0, 0, 0, 0)]])


def test_empty_chain() -> None:
    assert merge_chain([]) == []
    assert merge_chain([[], []]) == []


# -- property: merged segments applied once == frames applied in order -----------

SIZE = 200


@st.composite
def streams(draw: st.DrawFn) -> list[list[tuple[Frame, bytes]]]:
    """1-5 streams of non-overlapping frames; data frames carry a payload."""
    out = []
    for idx in range(draw(st.integers(1, 5))):
        frames = []
        pos = draw(st.integers(0, 20))
        while pos < SIZE:
            length = draw(st.integers(1, 40))
            length = min(length, SIZE - pos)
            if draw(st.integers(0, 3)) == 0:
                f = Frame("zero", pos, length, 0, 0)
                frames.append((f, bytes(length)))
            else:
                payload = bytes(((idx + 1) * 37 + i * 11 + pos) % 255 + 1 for i in range(length))
                frames.append((Frame("data", pos, length, 0, length), payload))
            pos += length + draw(st.integers(0, 30))
        out.append(frames)
    return out


def apply_sequentially(
    chain: list[list[tuple[Frame, bytes]]], zero_frames: bool
) -> tuple[bytearray, list[bool]]:
    img = bytearray(b"\xee" * SIZE)  # not zero: zero frames must be visible
    written = [False] * SIZE
    for frames in chain:
        for f, payload in frames:
            if f.kind == "zero" and not zero_frames:
                continue
            img[f.offset : f.end] = payload
            for i in range(f.offset, f.end):
                written[i] = True
    return img, written


def apply_merged(
    chain: list[list[tuple[Frame, bytes]]], segs: list[Segment]
) -> tuple[bytearray, list[bool]]:
    payloads = {id(f): p for frames in chain for f, p in frames}
    img = bytearray(b"\xee" * SIZE)
    written = [False] * SIZE
    for s in segs:
        p = payloads[id(s.frame)]
        img[s.offset : s.end] = p[s.frame_offset : s.frame_offset + s.length]
        for i in range(s.offset, s.end):
            assert not written[i], "segments overlap"
            written[i] = True
    return img, written


@settings(max_examples=1500, deadline=None)
@given(chain=streams(), zero_frames=st.booleans())
def test_merge_equals_sequential_application(
    chain: list[list[tuple[Frame, bytes]]], zero_frames: bool
) -> None:
    segs = merge_chain([[f for f, _ in frames] for frames in chain], zero_frames=zero_frames)
    # well-formed: sorted, non-empty, inside their frames, kind of the frame
    prev_end = 0
    for s in segs:
        assert s.length > 0 and s.offset >= prev_end
        prev_end = s.end
        assert s.frame.offset + s.frame_offset == s.offset
        assert s.end <= s.frame.end and s.kind == s.frame.kind
        assert s.frame in [f for f, _ in chain[s.source]]
        if not zero_frames:
            assert s.kind == "data"
    expected, exp_written = apply_sequentially(chain, zero_frames)
    got, got_written = apply_merged(chain, segs)
    assert got_written == exp_written
    assert got == expected
    # the newest stream covering a byte provides it
    for s in segs:
        for newer in chain[s.source + 1 :]:
            for f, _ in newer:
                if f.kind == "zero" and not zero_frames:
                    continue
                assert f.end <= s.offset or f.offset >= s.end


# -- end to end: real stream files -> reconstruct_raw ------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(chain=streams(), compressed=st.sampled_from([False, 2]))
def test_reconstruct_raw_from_files(
    tmp_path: Path, chain: list[list[tuple[Frame, bytes]]], compressed: bool | int
) -> None:
    paths = []
    for i, frames in enumerate(chain):
        p = tmp_path / f"s{i}.data"
        dsize = sum(f.length for f, _ in frames if f.kind == "data")
        meta = StreamMeta(
            virtual_size=SIZE,
            data_size=dsize,
            disk_name="vda",
            compressed=compressed,
            incremental=i > 0,
        )
        with StreamWriter(p, meta) as w:
            for f, payload in frames:
                if f.kind == "data":
                    w.write_data(f.offset, payload)
                else:
                    w.write_zero(f.offset, f.length)
        paths.append(p)
    out = tmp_path / "image.raw"
    for zero_frames in (True, False):
        reconstruct_raw(paths, out, zero_frames=zero_frames)
        expected, written = apply_sequentially(chain, zero_frames)
        for i in range(SIZE):
            if not written[i]:
                expected[i] = 0  # never written: a hole in the new file
        assert out.read_bytes() == bytes(expected)
