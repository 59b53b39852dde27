"""Pure extent logic of vmbk.nbd: merge, clip, intersect, split, walking.

Pictures use one character per unit: ``d`` data, ``z`` zero (ZERO|HOLE),
``D`` dirty, ``.`` clean; `_run("ddzz")` builds the extents they show.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbk.nbd import status
from vmbk.nbd.extents import DIRTY, HOLE, ZERO, Extent, clip, intersect, merge, spans, split
from vmbk.nbd.status import ExtentQueries
from vmbk.nbd.wire import ALLOCATION

Z = ZERO | HOLE
FLAGS = {"d": 0, "z": Z, "D": DIRTY, ".": 0, "h": HOLE}


def _run(picture: str, unit: int = 1) -> list[Extent]:
    """One extent per character, unmerged."""
    return [Extent(i * unit, unit, FLAGS[c]) for i, c in enumerate(picture)]


def _bytes(extents: list[Extent]) -> list[int]:
    """Flags per unit of a contiguous run (the truth merging must keep)."""
    return [e.flags for e in extents for _ in range(e.length)]


# --- Extent ---


def test_extent_properties() -> None:
    e = Extent(10, 5, ZERO | DIRTY)
    assert (e.end, e.zero, e.dirty, e.hole) == (15, True, True, False)
    assert not Extent(0, 1).zero and Extent(0, 1, HOLE).hole


# --- merge ---


def test_merge_joins_neighbours_with_same_flags() -> None:
    #  ddzzd -> [dd][zz][d]
    assert list(merge(_run("ddzzd"))) == [Extent(0, 2, 0), Extent(2, 2, Z), Extent(4, 1, 0)]


def test_merge_keeps_alternating_extents() -> None:
    assert list(merge(_run("dzdz"))) == _run("dzdz")


def test_merge_does_not_join_across_a_gap() -> None:
    #  [0 d 4)  gap  [6 d 8)
    extents = [Extent(0, 4), Extent(6, 2)]
    assert list(merge(extents)) == extents


def test_merge_zero_is_not_hole() -> None:
    # HOLE alone (unallocated, may read non-zero: backing file) != ZERO|HOLE
    assert list(merge([Extent(0, 1, HOLE), Extent(1, 1, Z)])) == [Extent(0, 1, HOLE), Extent(1, 1, Z)]


def test_merge_empty_and_single() -> None:
    assert list(merge([])) == []
    assert list(merge([Extent(3, 4, Z)])) == [Extent(3, 4, Z)]


def test_merge_is_lazy() -> None:
    def endless():
        i = 0
        while True:
            yield Extent(i, 1, (i // 3) % 2 * Z)
            i += 1

    it = merge(endless())
    assert [next(it), next(it)] == [Extent(0, 3, 0), Extent(3, 3, Z)]


# --- clip ---


def test_clip_cuts_the_extent_across_the_end() -> None:
    #  end:        |
    #  [0 a 4)[4 b 12)[12 c 16)  ->  [0 a 4)[4 b 10)
    extents = [Extent(0, 4, 0), Extent(4, 8, Z), Extent(12, 4, 0)]
    assert clip(extents, 10) == [Extent(0, 4, 0), Extent(4, 6, Z)]


def test_clip_at_a_boundary_and_past_the_end() -> None:
    extents = [Extent(0, 4, 0), Extent(4, 4, Z)]
    assert clip(extents, 4) == [Extent(0, 4, 0)]
    assert clip(extents, 100) == extents


# --- intersect ---


def test_intersect_draws_every_boundary() -> None:
    # dirty: ..DDDD..
    # alloc: dzzzdddd
    # out:   [d][z][Dz][Dz]... merged: d z Dz Dz D D . .
    dirty = list(merge(_run("..DDDD..")))
    alloc = list(merge(_run("dzzzdddd")))
    out = list(merge(intersect(dirty, alloc)))
    assert out == [
        Extent(0, 1, 0),
        Extent(1, 1, Z),
        Extent(2, 2, DIRTY | Z),
        Extent(4, 2, DIRTY),
        Extent(6, 2, 0),
    ]


def test_intersect_identical_boundaries() -> None:
    a = [Extent(0, 4, DIRTY), Extent(4, 4, 0)]
    b = [Extent(0, 4, Z), Extent(4, 4, 0)]
    assert list(intersect(a, b)) == [Extent(0, 4, DIRTY | Z), Extent(4, 4, 0)]


def test_intersect_not_starting_at_zero() -> None:
    a = [Extent(100, 10, DIRTY)]
    b = [Extent(100, 3, 0), Extent(103, 7, Z)]
    assert list(intersect(a, b)) == [Extent(100, 3, DIRTY), Extent(103, 7, DIRTY | Z)]


@pytest.mark.parametrize(
    "a, b",
    [
        ([Extent(0, 4)], [Extent(0, 5)]),  # different ends
        ([Extent(0, 4)], [Extent(1, 3)]),  # different starts
        ([Extent(0, 2), Extent(3, 1)], [Extent(0, 4)]),  # gap
        ([Extent(0, 4)], []),  # one side empty
    ],
)
def test_intersect_rejects_mismatched_sides(a: list[Extent], b: list[Extent]) -> None:
    with pytest.raises(ValueError):
        list(intersect(a, b))


def test_intersect_both_empty() -> None:
    assert list(intersect([], [])) == []


# --- split ---


def test_split_pieces_never_cross_extents() -> None:
    # size 4:  [0 10)[10 12)  ->  (0,4) (4,4) (8,2) (10,2)
    assert list(split([Extent(0, 10), (10, 2)], 4)) == [(0, 4), (4, 4), (8, 2), (10, 2)]


def test_split_exact_multiple_and_empty() -> None:
    assert list(split([Extent(8, 8)], 4)) == [(8, 4), (12, 4)]
    assert list(split([Extent(8, 0)], 4)) == []
    with pytest.raises(ValueError):
        list(split([Extent(0, 1)], 0))


# --- properties over random runs ---

pictures = st.text(alphabet="dzh", min_size=1, max_size=40)
dirty_pictures = st.text(alphabet="D.", min_size=1, max_size=40)


@given(pictures)
def test_merge_keeps_every_unit_and_leaves_no_equal_neighbours(picture: str) -> None:
    out = list(merge(_run(picture, unit=3)))
    assert _bytes(out) == _bytes(_run(picture, unit=3))
    assert all(a.end == b.offset and a.flags != b.flags for a, b in zip(out, out[1:]))


@given(st.data())
def test_intersect_flags_are_the_union_per_unit(data: st.DataObject) -> None:
    alloc = data.draw(pictures)
    dirty = data.draw(st.text(alphabet="D.", min_size=len(alloc), max_size=len(alloc)))
    a, d = list(merge(_run(alloc))), list(merge(_run(dirty)))
    out = list(intersect(d, a))
    assert _bytes(out) == [x | y for x, y in zip(_bytes(_run(dirty)), _bytes(_run(alloc)))]
    assert out[0].offset == 0 and out[-1].end == len(alloc)


# --- walking block status with servers that answer short or long ---


class FakeStatus(ExtentQueries):
    """block_status from fixed truths, answering ``answer`` extents at most.

    Mimics what Client.block_status guarantees (contiguous from offset,
    clipped to the request), with servers that stop early per context.
    """

    def __init__(self, truths: dict[str, list[Extent]], answer: dict[str, int], size: int) -> None:
        self.truths, self.answer, self._size = truths, answer, size
        self.requests: list[tuple[int, int]] = []

    size = property(lambda self: self._size)
    contexts = property(lambda self: tuple(self.truths))
    dirty_bitmap = property(lambda self: next((n for n in self.truths if n != ALLOCATION), None))

    def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        self.requests.append((offset, length))
        out = {}
        for name, truth in self.truths.items():
            run = [e for e in truth if e.end > offset]
            first = run[0]
            run[0] = Extent(offset, first.end - offset, first.flags)
            out[name] = clip(run[: self.answer.get(name, len(run))], offset + length)
        return out


ALLOC = [Extent(0, 10, 0), Extent(10, 30, Z), Extent(40, 24, 0)]
BITMAP = "qemu:dirty-bitmap:b0"
DIRTY_TRUTH = [Extent(0, 5, 0), Extent(5, 40, DIRTY), Extent(45, 19, 0)]


@pytest.mark.parametrize("answer", [1, 2, 100])
@pytest.mark.parametrize("window", [7, 16, 1024])
def test_extents_walk_short_answers_and_small_windows(monkeypatch, answer: int, window: int) -> None:
    monkeypatch.setattr(status, "BLOCK_STATUS_WINDOW", window)
    fake = FakeStatus({ALLOCATION: ALLOC}, {ALLOCATION: answer}, 64)
    assert list(fake.extents()) == ALLOC
    assert all(length <= window for _, length in fake.requests)


def test_extents_subrange() -> None:
    fake = FakeStatus({ALLOCATION: ALLOC}, {}, 64)
    assert list(fake.extents(start=5, length=40)) == [Extent(5, 5, 0), Extent(10, 30, Z), Extent(40, 5, 0)]
    with pytest.raises(ValueError):
        list(fake.extents(start=60, length=10))


@pytest.mark.parametrize("short", [(1, 100), (100, 1), (2, 1)])
def test_changed_extents_with_contexts_answering_different_lengths(monkeypatch, short) -> None:
    monkeypatch.setattr(status, "BLOCK_STATUS_WINDOW", 16)
    fake = FakeStatus({BITMAP: DIRTY_TRUTH, ALLOCATION: ALLOC}, {BITMAP: short[0], ALLOCATION: short[1]}, 64)
    assert list(fake.changed_extents()) == [
        Extent(0, 5, 0),
        Extent(5, 5, DIRTY),
        Extent(10, 30, DIRTY | Z),
        Extent(40, 5, DIRTY),
        Extent(45, 19, 0),
    ]


def test_without_allocation_context_everything_is_data() -> None:
    fake = FakeStatus({}, {}, 64)
    assert list(fake.extents()) == [Extent(0, 64, 0)]


def test_spans_join_close_neighbours_and_cap_their_number() -> None:
    dirty = [Extent(0, 2, DIRTY), Extent(5, 1, DIRTY), Extent(20, 2, DIRTY)]
    assert list(spans(dirty, 4, 8)) == [(0, 6), (20, 22)]
    assert list(spans(dirty, 3, 8)) == [(0, 2), (5, 6), (20, 22)]
    assert list(spans(dirty, 3, 2)) == [(0, 22)]  # too many: one span over all
    assert list(spans([], 4, 8)) == []


class BitmapAlone(FakeStatus):
    """FakeStatus with a second "connection" that answers the bitmap alone, as Reader does."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.bitmap_requests: list[tuple[int, int]] = []

    def bitmap_status(self):
        def status_of_bitmap(offset: int, length: int) -> list[Extent]:
            self.bitmap_requests.append((offset, length))
            truth = self.truths[BITMAP]
            run = [e for e in truth if e.end > offset]
            run[0] = Extent(offset, run[0].end - offset, run[0].flags)
            return clip(run[: self.answer.get(BITMAP, len(run))], offset + length)
        return status_of_bitmap


@given(st.data())
def test_dirty_extents_bitmap_first_equals_the_combined_walk(data) -> None:
    """Asking allocation only over dirty spans gives the dirty extents of the whole overlay."""
    alloc = data.draw(st.text(alphabet="dz", min_size=1, max_size=60))
    dirty = data.draw(st.text(alphabet="D.", min_size=len(alloc), max_size=len(alloc)))
    window = data.draw(st.integers(1, 70))
    gap = data.draw(st.integers(1, 10))
    most = data.draw(st.integers(1, 4))
    answer = data.draw(st.integers(1, 5))
    truths = {BITMAP: list(merge(_run(dirty))), ALLOCATION: list(merge(_run(alloc)))}
    combined = FakeStatus(truths, {}, len(alloc))
    first = BitmapAlone(truths, {BITMAP: answer, ALLOCATION: answer}, len(alloc))
    old = (status.BLOCK_STATUS_WINDOW, status.DIRTY_GAP, status.DIRTY_SPANS)
    status.BLOCK_STATUS_WINDOW, status.DIRTY_GAP, status.DIRTY_SPANS = window, gap, most
    try:
        want = [e for e in combined.changed_extents() if e.dirty]
        assert list(combined.dirty_extents()) == want  # no bitmap-only connection: the combined walk
        assert list(first.dirty_extents()) == want
    finally:
        status.BLOCK_STATUS_WINDOW, status.DIRTY_GAP, status.DIRTY_SPANS = old
    # allocation is asked only where something is dirty
    for offset, length in first.requests:
        assert "D" in dirty[offset:offset + length]


def test_dirty_extents_asks_allocation_only_around_the_changes(monkeypatch) -> None:
    monkeypatch.setattr(status, "BLOCK_STATUS_WINDOW", 100)
    monkeypatch.setattr(status, "DIRTY_GAP", 10)
    size = 1000
    alloc = [Extent(0, size, 0)]
    bitmap = [Extent(0, 150, 0), Extent(150, 5, DIRTY), Extent(155, 845, 0)]
    fake = BitmapAlone({BITMAP: bitmap, ALLOCATION: alloc}, {}, size)
    assert list(fake.dirty_extents()) == [Extent(150, 5, DIRTY)]
    assert fake.requests == [(150, 5)]
    assert len(fake.bitmap_requests) == 10
