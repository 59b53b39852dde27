"""vmbk.nbd against real servers (qemu-nbd, nbdkit) and a scripted one.

Expected bytes never come from our own client: they are computed
(nbdkit pattern/data), written by qemu-io, or checked by qemu-img.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import struct
import subprocess
import threading
import time

import pytest

from vmbk.nbd import (
    ALLOCATION,
    DIRTY,
    HOLE,
    ZERO,
    Address,
    Client,
    Extent,
    HandshakeError,
    NbdError,
    NbdTimeout,
    ProtocolError,
    Reader,
    RequestError,
    Unsupported,
    status,
    wire,
)
from vmbk.nbd.extents import split

KiB, MiB = 1024, 1024**2
Z = ZERO | HOLE


# --- helpers ---


def qemu_io(image: pathlib.Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", fmt, *args, str(image)], check=True, capture_output=True)


def qcow2(tmp_path: pathlib.Path, size: int, *writes: str, bitmap: str | None = None, after: tuple = ()) -> pathlib.Path:
    """A qcow2 with qemu-io ``writes``; ``after`` are written once ``bitmap`` exists."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
    if writes:
        qemu_io(image, *writes)
    if bitmap:
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), bitmap], check=True)
    if after:
        qemu_io(image, *after)
    return image


def image_map(image: pathlib.Path, fmt: str = "qcow2") -> list[dict]:
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", fmt, str(image)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def allocated_in(image: pathlib.Path, start: int, length: int, fmt: str = "qcow2") -> bool:
    """Does qemu-img map show any data in [start, start+length)?"""
    return any(m["data"] and m["start"] < start + length and m["start"] + m["length"] > start
               for m in image_map(image, fmt))


def pattern(offset: int, length: int) -> bytes:
    """nbdkit-pattern-plugin: each 8-byte word holds its offset, big-endian."""
    first = offset - offset % 8
    count = (offset + length - first + 7) // 8
    words = struct.pack(f">{count}Q", *range(first, first + count * 8, 8))
    return words[offset - first : offset - first + length]


def random_raw(tmp_path: pathlib.Path, size: int, regions: list[tuple[int, int]]) -> pathlib.Path:
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset, length in regions:
            f.seek(offset)
            f.write(os.urandom(length))
    return raw


def convert(raw: pathlib.Path, image: pathlib.Path) -> pathlib.Path:
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    return image


def collect(reader: Reader, extents) -> tuple[bytearray, list]:
    """Assemble what a Reader delivers; also return (offset, length, is_data)."""
    out = bytearray(reader.size)
    seen = []
    for chunk in reader.read(extents):
        seen.append((chunk.offset, chunk.length, chunk.data is not None))
        if chunk.data is not None:
            out[chunk.offset : chunk.offset + chunk.length] = chunk.data
    return out, seen


# --- handshake, size, flags ---


def test_handshake_qemu_nbd_read_only(tmp_path, qemu_nbd) -> None:
    srv = qemu_nbd(qcow2(tmp_path, 64 * MiB), read_only=True)
    with Client(srv.address) as c:
        assert c.size == 64 * MiB
        assert c.read_only and c.can_flush and c.structured_replies
        assert not c.can_multi_conn  # qemu-nbd: only with --shared > 1
        assert c.contexts == (ALLOCATION,)
        assert (c.min_block_size, c.preferred_block_size, c.max_block_size) == (1, 4096, 32 * MiB)
        assert c.max_payload == 32 * MiB
        with pytest.raises(Unsupported):
            c.write(0, b"x")


def test_handshake_qemu_nbd_writable_shared(tmp_path, qemu_nbd) -> None:
    srv = qemu_nbd(qcow2(tmp_path, 64 * MiB), shared=4)
    with Client(srv.address) as c:
        assert not c.read_only
        assert c.can_multi_conn and c.can_trim and c.can_zero and c.can_fast_zero and c.can_fua


def test_handshake_nbdkit_memory(nbdkit) -> None:
    srv = nbdkit("memory", "size=8M")
    with Client(srv.url) as c:
        assert c.size == 8 * MiB
        assert not c.read_only
        assert c.can_multi_conn and c.can_trim and c.can_zero and c.can_flush
        assert c.flags & wire.FLAG_HAS_FLAGS


def test_unknown_export_is_refused_with_the_server_message(tmp_path, qemu_nbd) -> None:
    srv = qemu_nbd(qcow2(tmp_path, MiB), read_only=True, export="disk0")
    with pytest.raises(HandshakeError) as e:
        Client(Address.unix(srv.socket, "nope"), timeout=5)
    assert e.value.reply == wire.REP_ERR_UNKNOWN
    assert "nope" in e.value.server_message  # qemu: "export 'nope' not present"
    with Client(Address.unix(srv.socket, "disk0")) as c:  # the server is fine
        assert c.size == MiB


def test_refused_go_sends_abort(fake_nbd) -> None:
    fake = fake_nbd()
    fake.go_error = (wire.REP_ERR_POLICY, "not you")
    with pytest.raises(HandshakeError, match="not you"):
        Client(fake.address, timeout=5)
    fake.thread.join(5)
    assert fake.options[-2:] == [wire.OPT_GO, wire.OPT_ABORT]


def test_missing_dirty_bitmap_is_a_handshake_error(tmp_path, qemu_nbd) -> None:
    srv = qemu_nbd(qcow2(tmp_path, MiB), read_only=True)
    with pytest.raises(HandshakeError, match="qemu:dirty-bitmap:b0"):
        Client(srv.address, dirty_bitmap="b0")


def test_close_sends_disc(fake_nbd) -> None:
    fake = fake_nbd()
    with Client(fake.address) as c:
        c.read(0, 512)
    fake.thread.join(5)
    assert [r.type for r in fake.requests] == [wire.CMD_READ, wire.CMD_DISC]


def test_connect_timeout_when_server_never_greets(tmp_path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)  # accepts into the backlog, never speaks
        start = time.monotonic()
        with pytest.raises(NbdTimeout):
            Client(Address.unix(str(path)), connect_timeout=0.3)
        assert time.monotonic() - start < 2


def test_connect_refused(tmp_path) -> None:
    with pytest.raises(NbdError, match="cannot connect"):
        Client(Address.unix(str(tmp_path / "none.sock")))


def test_tcp(nbdkit) -> None:
    srv = nbdkit("pattern", "size=1M", tcp=True)
    assert srv.url.startswith("nbd://127.0.0.1:")
    with Client(srv.url) as c:
        assert c.read(4096, 64) == pattern(4096, 64)


# --- reads ---


@pytest.mark.parametrize("offset, length", [(0, 8), (3, 5), (12345, 100000), (64 * MiB - 17, 17), (MiB, 40 * MiB)])
def test_read_pattern(nbdkit, offset: int, length: int) -> None:
    srv = nbdkit("pattern", "size=64M", read_only=True)
    with Client(srv.address) as c:
        assert c.read(offset, length) == pattern(offset, length)


def test_read_data_plugin_exact_bytes(nbdkit) -> None:
    srv = nbdkit("data", "data=1 2 3 @4096 0x41 0x42 @8191 9", read_only=True)
    expected = bytearray(8192)
    expected[0:3] = b"\x01\x02\x03"
    expected[4096:4098] = b"AB"
    expected[8191] = 9
    with Client(srv.address) as c:
        assert c.size == 8192
        buf = bytearray(b"\xee" * 8192)
        c.readinto(0, memoryview(buf))
        assert buf == expected


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_read_zero_fills_holes(tmp_path, qemu_nbd, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(4 * MiB)], check=True)
    qemu_io(image, "write -P 0x11 1M 64k", "write -P 0x22 3M 4k", fmt=fmt)
    srv = qemu_nbd(image, fmt=fmt, read_only=True)
    expected = bytearray(4 * MiB)
    expected[MiB : MiB + 64 * KiB] = b"\x11" * 64 * KiB
    expected[3 * MiB : 3 * MiB + 4 * KiB] = b"\x22" * 4 * KiB
    with Client(srv.address) as c:
        buf = bytearray(b"\xff" * 4 * MiB)  # holes must be overwritten
        c.readinto(0, buf)
        assert buf == expected
        # (qemu-img create allocates the first 4k of a raw image: not a hole)
        zeros = [(e.offset, e.end) for e in c.extents() if e.zero]
        assert zeros[0][1] == MiB and zeros[1] == (MiB + 64 * KiB, 3 * MiB)


# --- block status ---


def test_extents_are_merged_and_windowed(tmp_path, qemu_nbd, monkeypatch) -> None:
    image = qcow2(tmp_path, 8 * MiB, "write -P 0x11 1M 64k", "write -P 0x22 1088k 64k", "write -P 0x33 5M 192k")
    srv = qemu_nbd(image, read_only=True)
    expected = [
        Extent(0, MiB, Z),
        Extent(MiB, 128 * KiB, 0),  # two adjacent writes: one extent
        Extent(MiB + 128 * KiB, 4 * MiB - 128 * KiB, Z),
        Extent(5 * MiB, 192 * KiB, 0),
        Extent(5 * MiB + 192 * KiB, 3 * MiB - 192 * KiB, Z),
    ]
    with Client(srv.address) as c:
        assert list(c.extents()) == expected
        monkeypatch.setattr(status, "BLOCK_STATUS_WINDOW", 256 * KiB)
        calls: list[tuple[int, int]] = []
        real = c.block_status
        def counting(offset: int, length: int) -> dict[str, list[Extent]]:
            calls.append((offset, length))
            return real(offset, length)

        monkeypatch.setattr(c, "block_status", counting)
        assert list(c.extents()) == expected  # merged across windows too
        assert len(calls) == 32 and all(n <= 256 * KiB for _, n in calls)
        assert list(c.extents(start=MiB + 64 * KiB, length=MiB)) == [
            Extent(MiB + 64 * KiB, 64 * KiB, 0),
            Extent(MiB + 128 * KiB, MiB - 64 * KiB, Z),
        ]


def test_dirty_bitmap_extents_are_exactly_the_writes(tmp_path, qemu_nbd) -> None:
    image = qcow2(
        tmp_path, 8 * MiB,
        "write -P 0x11 0 1M",  # before the bitmap: allocated, not dirty
        bitmap="b0",
        after=("write -P 0x44 512k 64k", "write -P 0x22 2M 64k", "write -P 0x33 4M 128k", "write -z 6M 64k"),
    )
    srv = qemu_nbd(image, read_only=True, bitmap="b0")
    with Client(srv.address, dirty_bitmap="b0") as c:
        assert c.dirty_bitmap == "qemu:dirty-bitmap:b0"
        dirty = [(e.offset, e.length) for e in c.extents(c.dirty_bitmap) if e.dirty]
        assert dirty == [(512 * KiB, 64 * KiB), (2 * MiB, 64 * KiB), (4 * MiB, 128 * KiB), (6 * MiB, 64 * KiB)]
        assert list(c.changed_extents()) == [
            Extent(0, 512 * KiB, 0),
            Extent(512 * KiB, 64 * KiB, DIRTY),  # dirty data: read it
            Extent(576 * KiB, 448 * KiB, 0),
            Extent(MiB, MiB, Z),
            Extent(2 * MiB, 64 * KiB, DIRTY),
            Extent(2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, Z),
            Extent(4 * MiB, 128 * KiB, DIRTY),
            Extent(4 * MiB + 128 * KiB, 2 * MiB - 128 * KiB, Z),
            Extent(6 * MiB, 64 * KiB, DIRTY | Z),  # dirty zeroes: record a zero range
            Extent(6 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, Z),
        ]


# --- writes ---


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_write_zeroes_trim_flush_round_trip(tmp_path, qemu_nbd, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(8 * MiB)], check=True)
    qemu_io(image, "write -P 0x11 0 2M", fmt=fmt)
    srv = qemu_nbd(image, fmt=fmt, extra=["--discard=unmap"])
    data = os.urandom(MiB + 4096)
    expected = bytearray(8 * MiB)
    expected[0 : 2 * MiB] = b"\x11" * 2 * MiB
    with Client(srv.address) as c:
        c.write(4 * MiB, data)
        expected[4 * MiB : 5 * MiB + 4096] = data
        c.write_zeroes(MiB, 512 * KiB)  # over data
        expected[MiB : MiB + 512 * KiB] = bytes(512 * KiB)
        c.write_zeroes(6 * MiB, MiB)  # over a hole
        c.trim(0, 256 * KiB)
        expected[0 : 256 * KiB] = bytes(256 * KiB)
        c.flush()
        assert c.read(0, 8 * MiB) == expected
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected)
    subprocess.run(["qemu-img", "compare", "-U", "-f", fmt, "-F", "raw", str(image), str(ref)], check=True)
    # Without NBD_CMD_FLAG_NO_HOLE, zeroing punches holes (raw: no
    # FALLOC_FL_ZERO_RANGE allocation) and holes stay holes.
    assert not allocated_in(image, 6 * MiB, MiB, fmt)
    assert not allocated_in(image, MiB, 512 * KiB, fmt)
    assert not allocated_in(image, 4096, 252 * KiB, fmt)  # trimmed (raw keeps its first 4k)
    assert allocated_in(image, 4 * MiB, MiB, fmt)


def test_fast_zero_and_fua(nbdkit) -> None:
    srv = nbdkit("memory", "size=4M")
    with Client(srv.address) as c:
        c.write(0, b"\x55" * 8192, fua=True)
        if c.can_fast_zero:
            c.write_zeroes(0, 4096, fast=True)
        else:
            c.write_zeroes(0, 4096)
        assert c.read(0, 8192) == bytes(4096) + b"\x55" * 4096


def test_requests_are_split_at_max_block_size(nbdkit) -> None:
    srv = nbdkit("memory", "size=4M", "blocksize-maximum=64K", "blocksize-error-policy=error",
                 filters=["blocksize-policy"])
    data = os.urandom(MiB + 512)
    with Client(srv.address) as c:
        assert c.max_block_size == c.max_payload == 64 * KiB
        c.write(KiB, data)  # 17 requests, each accepted
        assert c.read(KiB, len(data)) == data
        with pytest.raises(ValueError):
            c.start_read(0, memoryview(bytearray(128 * KiB)))
        with Reader(srv.address, request_size=4 * MiB) as r:
            assert r.request_size == 64 * KiB
            assert collect(r, [(KiB, len(data))])[0][KiB : KiB + len(data)] == data


def test_min_block_size_is_enforced(fake_nbd) -> None:
    fake = fake_nbd(block_size=(512, 4096, MiB))
    with Client(fake.address) as c:
        assert c.min_block_size == 512
        with pytest.raises(ValueError, match="aligned"):
            c.read(100, 512)
        assert c.read(512, 1024) == bytes(1024)
    fake.thread.join(5)
    assert [r.type for r in fake.requests] == [wire.CMD_READ, wire.CMD_DISC]


# --- pipelining and multi-conn ---


def test_reader_multi_conn_equals_sequential_read(tmp_path, qemu_nbd) -> None:
    regions = [(0, 3 * MiB + 4096), (8 * MiB, 5 * MiB), (20 * MiB, 64 * KiB), (30 * MiB, 2 * MiB)]
    raw = random_raw(tmp_path, 32 * MiB, regions)
    srv = qemu_nbd(convert(raw, tmp_path / "disk.qcow2"), read_only=True, shared=4)
    source = raw.read_bytes()
    with Client(srv.address) as c:
        assert c.read(0, c.size) == source  # sequential, one request at a time (split at 32 MiB)
    with Reader(srv.address, connections=4, request_size=256 * KiB, buffers=8) as r:
        assert r.connections == 4
        data, seen = collect(r, r.extents())
        assert data == source
        offsets = [o for o, _, _ in seen]
        assert offsets == sorted(offsets) and seen[-1][0] + seen[-1][1] == r.size
        assert all(n <= 256 * KiB for _, n, is_data in seen if is_data)
        assert not any(is_data for o, n, is_data in seen if source[o : o + n] == bytes(n) and n > 64 * KiB)
        sink = bytearray(r.size)
        copied = r.copy((e for e in r.extents() if not e.zero), lambda o, d: sink.__setitem__(slice(o, o + len(d)), d))
        assert sink == source and copied == sum(e.length for e in r.extents() if not e.zero)


def test_reader_nbdkit_memory_multi_conn(nbdkit) -> None:
    srv = nbdkit("memory", "size=16M")
    data = os.urandom(16 * MiB)
    with Client(srv.address) as c:
        c.write(0, data)
    with Reader(srv.address, connections=3, request_size=MiB, buffers=5) as r:
        assert r.connections == 3
        assert collect(r, [(0, 16 * MiB)])[0] == data
        assert collect(r, [(5, 1000), (MiB + 3, 2 * MiB)])[0][MiB + 3 : 3 * MiB + 3] == data[MiB + 3 : 3 * MiB + 3]


def test_reader_single_connection_without_multi_conn(tmp_path, qemu_nbd, monkeypatch) -> None:
    monkeypatch.setattr(status, "BLOCK_STATUS_WINDOW", MiB)  # many lazy queries between reads
    raw = random_raw(tmp_path, 8 * MiB, [(MiB, 3 * MiB), (6 * MiB, 100 * KiB)])
    srv = qemu_nbd(convert(raw, tmp_path / "disk.qcow2"), read_only=True)
    with Reader(srv.address, connections=4, request_size=512 * KiB, buffers=3) as r:
        assert r.connections == 1
        assert collect(r, r.extents())[0] == raw.read_bytes()


def test_reader_uses_one_connection_unless_multi_conn(nbdkit) -> None:
    srv = nbdkit("pattern", "size=8M", "multi-conn-mode=disable", filters=["multi-conn"], read_only=True)
    with Reader(srv.address, connections=4) as r:
        assert not r.client.can_multi_conn and r.connections == 1
        assert collect(r, [(0, 8 * MiB)])[0] == pattern(0, 8 * MiB)


def test_reader_settles_for_the_connections_the_server_greets(tmp_path, qemu_nbd) -> None:
    image = qcow2(tmp_path, 8 * MiB, "write -P 0x11 0 8M")
    srv = qemu_nbd(image, read_only=True, shared=2)  # multi-conn, but 2 clients at most
    with Reader(srv.address, connections=4, connect_timeout=0.3) as r:
        assert r.client.can_multi_conn and r.connections == 2
        assert collect(r, r.extents())[0] == b"\x11" * 8 * MiB
    with pytest.raises(NbdError, match="closed"):
        collect(r, [(0, 512)])


@pytest.mark.parametrize("connections", [1, 2])
def test_reader_stopped_early_can_read_again(nbdkit, connections: int) -> None:
    srv = nbdkit("pattern", "size=32M", read_only=True)
    with Reader(srv.address, connections=connections, request_size=MiB, buffers=4) as r:
        it = r.read([(0, 32 * MiB)])
        assert bytes(next(it).data or b"") == pattern(0, MiB)
        it.close()  # waits for reads in flight; buffers are free again
        assert collect(r, [(5 * MiB, 3 * MiB)])[0][5 * MiB : 8 * MiB] == pattern(5 * MiB, 3 * MiB)


@pytest.mark.parametrize("connections", [1, 3])
def test_reader_process_runs_where_the_data_arrived(nbdkit, connections: int) -> None:
    """One connection: in the caller's thread (no workers); more: on the workers."""
    srv = nbdkit("pattern", "size=16M", read_only=True)

    def process(offset: int, data: memoryview) -> tuple[int, bool, str]:
        return offset, bytes(data) == pattern(offset, len(data)), threading.current_thread().name

    with Reader(srv.address, connections=connections, request_size=MiB, buffers=4) as r:
        assert r.connections == connections
        chunks = list(r.read([(0, 6 * MiB), Extent(6 * MiB, 2 * MiB, Z), (8 * MiB, 8 * MiB)], process))
    results = [c.result for c in chunks if c.data is not None]
    assert [o for o, _, _ in results] == [c.offset for c in chunks if c.data is not None]
    assert len(results) == 14 and all(ok for _, ok, _ in results)
    assert [c.result for c in chunks if c.data is None] == [None]
    threads = {name for _, _, name in results}
    if connections == 1:
        assert threads == {threading.current_thread().name}
    else:
        assert threads == {f"nbd-{i}" for i in range(connections)}


def enospc_at_5_mib(offset: int, data: memoryview) -> int:
    """A Reader ``process`` that fails at 5 MiB, as a full disk would."""
    if offset == 5 * MiB:
        raise OSError(errno.ENOSPC, "No space left on device")
    return offset


@pytest.mark.parametrize("connections", [1, 2])
def test_reader_process_error_is_raised_in_turn(nbdkit, connections: int) -> None:
    srv = nbdkit("pattern", "size=16M", read_only=True)

    with Reader(srv.address, connections=connections, request_size=MiB, buffers=4) as r:
        got = []
        with pytest.raises(OSError, match="No space"):
            for chunk in r.read([(0, 16 * MiB)], enospc_at_5_mib):
                got.append(chunk.result)
        assert got == [i * MiB for i in range(5)]
        assert collect(r, [(0, 2 * MiB)])[0][: 2 * MiB] == pattern(0, 2 * MiB)  # still usable


def collect_unordered(reader: Reader, extents, process=None) -> tuple[bytearray, list]:
    out = bytearray(reader.size)
    seen = []
    for chunk in reader.read_unordered(extents, process):
        seen.append((chunk.offset, chunk.length, chunk.data is not None, chunk.result))
        if chunk.data is not None:
            out[chunk.offset : chunk.offset + chunk.length] = chunk.data
    return out, seen


@pytest.mark.parametrize("connections", [1, 3])
def test_reader_unordered_delivers_every_chunk_once(tmp_path, qemu_nbd, connections: int) -> None:
    regions = [(0, 3 * MiB + 4096), (8 * MiB, 5 * MiB), (20 * MiB, 64 * KiB), (30 * MiB, 2 * MiB)]
    raw = random_raw(tmp_path, 32 * MiB, regions)
    srv = qemu_nbd(convert(raw, tmp_path / "disk.qcow2"), read_only=True, shared=4)
    source = raw.read_bytes()
    with Reader(srv.address, connections=connections, request_size=256 * KiB, buffers=6) as r:
        assert r.connections == connections
        extents = list(r.extents())
        data, seen = collect_unordered(r, extents, lambda o, d: (o, bytes(d) == source[o : o + len(d)]))
        assert data == source
        pieces = sorted((o, n) for o, n, is_data, _ in seen if is_data)
        assert pieces == [p for e in extents if not e.zero for p in split([e], 256 * KiB)]
        assert all(res == (o, True) for o, _, is_data, res in seen if is_data)
        assert sorted((o, n) for o, n, is_data, _ in seen if not is_data) == [(e.offset, e.length) for e in extents if e.zero]
        assert collect(r, extents)[0] == source  # and the ordered read still works after


def test_reader_unordered_does_not_wait_for_a_slow_chunk(nbdkit) -> None:
    """The first chunk's processing stalls; the other connections go on meanwhile."""
    srv = nbdkit("pattern", "size=16M", read_only=True)
    release = threading.Event()

    def process(offset: int, data: memoryview) -> int:
        if offset == 0:
            release.wait(10)
        return offset

    with Reader(srv.address, connections=2, request_size=MiB, buffers=4) as r:
        order = []
        for chunk in r.read_unordered([(0, 16 * MiB)], process):
            order.append(chunk.result)
            if len(order) == 6:
                release.set()  # 6 chunks passed the stalled one
        release.set()
    assert sorted(order) == [i * MiB for i in range(16)]
    assert order.index(0) >= 6


def test_reader_unordered_window_bounds_how_far_ahead(nbdkit) -> None:
    """A stalled chunk: with window=3 only two younger ones may pass it."""
    srv = nbdkit("pattern", "size=16M", read_only=True)
    release = threading.Event()

    def process(offset: int, data: memoryview) -> int:
        if offset == 0:
            release.wait(10)
        return offset

    timer = threading.Timer(0.5, release.set)
    timer.start()
    with Reader(srv.address, connections=2, request_size=MiB, buffers=8) as r:
        order = [c.result for c in r.read_unordered([(0, 16 * MiB)], process, window=3)]
    timer.cancel()
    assert sorted(order) == [i * MiB for i in range(16)]
    assert order.index(0) <= 2
    assert release.is_set()  # it did wait for the stalled one


@pytest.mark.parametrize("connections", [1, 2])
def test_reader_unordered_error_and_early_stop_leave_it_usable(nbdkit, connections: int) -> None:
    srv = nbdkit("pattern", "size=16M", read_only=True)

    with Reader(srv.address, connections=connections, request_size=MiB, buffers=4) as r:
        with pytest.raises(OSError, match="No space"):
            collect_unordered(r, [(0, 16 * MiB)], enospc_at_5_mib)
        it = r.read_unordered([(0, 16 * MiB)])
        first = next(it)
        assert bytes(first.data or b"") == pattern(first.offset, MiB)
        it.close()
        assert collect_unordered(r, [(2 * MiB, 3 * MiB)])[0][2 * MiB : 5 * MiB] == pattern(2 * MiB, 3 * MiB)


def test_reader_unordered_interrupt_after_a_chunk_was_taken_does_not_hang(nbdkit, monkeypatch) -> None:
    """SIGINT is raised right after a blocking call returns: here, after the
    finished queue gave a chunk and before the reader counted it.  The
    drain must not wait for that chunk a second time (it did: a hang)."""
    import queue as queue_mod

    import vmbk.nbd.reader as reader_mod

    class InterruptedOnce(queue_mod.SimpleQueue):  # type: ignore[type-arg]
        fired = False

        def get(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            item = super().get(*args, **kwargs)
            if not InterruptedOnce.fired and threading.current_thread().name == "reading":
                InterruptedOnce.fired = True
                raise KeyboardInterrupt
            return item

    monkeypatch.setattr(reader_mod.queue, "SimpleQueue", InterruptedOnce)
    srv = nbdkit("pattern", "size=16M", read_only=True)
    outcome: list[BaseException] = []

    def go() -> None:
        with Reader(srv.address, connections=2, request_size=MiB, buffers=4) as r:
            try:
                collect_unordered(r, [(0, 16 * MiB)])
            except BaseException as e:  # noqa: BLE001
                outcome.append(e)

    t = threading.Thread(target=go, name="reading", daemon=True)  # the workers' queues are SimpleQueues too
    t.start()
    t.join(10)
    assert not t.is_alive(), "read_unordered hung after the interrupt"
    assert InterruptedOnce.fired and len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)


def test_reader_unordered_broken_connection_fails_fast(nbdkit) -> None:
    srv = nbdkit("pattern", "size=64M", "rdelay=3", filters=["delay"], read_only=True)
    with Reader(srv.address, connections=2, request_size=MiB, buffers=4, timeout=30) as r:
        threading.Timer(0.3, r.client.abort).start()
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="aborted"):
            collect_unordered(r, [(0, 64 * MiB)])
        assert time.monotonic() - start < 2


def test_requests_in_flight_are_bounded(fake_nbd) -> None:
    """Unbounded pipelining deadlocks once both sides' socket buffers fill."""
    fake = fake_nbd()
    with Client(fake.address, max_in_flight=2) as c:
        bufs = [memoryview(bytearray(512)) for _ in range(5)]
        cmds = []
        for i, buf in enumerate(bufs):
            cmds.append(c.start_read(i * 512, buf))
            assert c.in_flight <= 2
        for cmd in cmds:
            c.wait(cmd)


def test_write_waits_for_reads_in_flight(fake_nbd) -> None:
    """A write payload must not be sent while read replies may be pending."""
    fake = fake_nbd()
    with Client(fake.address) as c:
        read = c.start_read(0, memoryview(bytearray(4096)))
        write = c.start_write(8192, memoryview(b"x" * 4096))
        assert read.done and not write.done
        c.wait(write)


def test_pipelined_replies_out_of_order(fake_nbd) -> None:
    fake = fake_nbd()
    fake.disk[:] = os.urandom(len(fake.disk))
    held = []

    def reverse(server, req):  # answer three reads in reverse, in several chunks
        held.append(req)
        if len(held) == 3:
            for r in reversed(held):
                half = r.length // 2
                server.data(r.handle, r.offset + half, bytes(server.disk[r.offset + half : r.offset + r.length]), False)
                server.data(r.handle, r.offset, bytes(server.disk[r.offset : r.offset + half]))

    fake.handler = reverse
    with Client(fake.address) as c:
        bufs = [bytearray(4096) for _ in range(3)]
        cmds = [c.start_read(i * 8192, memoryview(b)) for i, b in enumerate(bufs)]
        assert c.in_flight == 3
        c.wait(cmds[0])
        assert all(cmd.done for cmd in cmds)
        assert bufs == [fake.disk[i * 8192 : i * 8192 + 4096] for i in range(3)]


# --- errors ---


@pytest.mark.parametrize("connections", [1, 2])
def test_request_error_keeps_connection_usable(tmp_path, nbdkit, connections: int) -> None:
    flag = tmp_path / "inject"
    srv = nbdkit("pattern", "size=8M", "error=EIO", "error-pread-rate=100%", f"error-pread-file={flag}",
                 filters=["error"], read_only=True)
    with Client(srv.address) as c:
        flag.touch()
        with pytest.raises(RequestError) as e:
            c.read(0, 4096)
        assert e.value.errno == errno.EIO and e.value.command == "READ"
        flag.unlink()
        assert c.read(0, 4096) == pattern(0, 4096)
    with Reader(srv.address, connections=connections, request_size=MiB, buffers=4) as r:
        flag.touch()
        with pytest.raises(RequestError):
            collect(r, [(0, 8 * MiB)])
        flag.unlink()
        assert collect(r, [(0, 8 * MiB)])[0] == pattern(0, 8 * MiB)


def test_error_chunk_carries_server_message_and_offset(fake_nbd) -> None:
    fake = fake_nbd()

    def fail(server, req):
        if req.offset == 0:
            server.data(req.handle, 0, b"\x01" * 512, done=False)
            server.error(req.handle, 28, "disk full", offset=512, done=False)
            server.error(req.handle, 5, "and then some", offset=768)  # the first error wins
        else:
            server.error(req.handle, 999, "odd")  # unknown NBD error: EINVAL

    fake.handler = fail
    with Client(fake.address) as c:
        with pytest.raises(RequestError) as e:
            c.read(0, 1024)
        assert (e.value.errno, e.value.server_message, e.value.error_offset) == (errno.ENOSPC, "disk full", 512)
        assert "disk full" in str(e.value)
        with pytest.raises(RequestError) as e:
            c.read(4096, 512)
        assert e.value.errno == errno.EINVAL


MESSAGES = {
    "short": "completed with 512 bytes",
    "outside": "outside READ",
    "unknown-handle": "unknown handle",
    "bad-magic": "bad reply magic",
    "simple-status": "simple reply to BLOCK_STATUS",
    "no-context": "lacks context base:allocation",
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_server_misbehaving_is_a_protocol_error(fake_nbd, case: str) -> None:
    fake = fake_nbd()

    def bad(server, req):
        if case == "short":  # DONE after half the data: never silent short data
            server.data(req.handle, req.offset, bytes(req.length // 2))
        elif case == "outside":
            server.hole(req.handle, req.offset - 512, 1024)
        elif case == "unknown-handle":
            server.simple(req.handle + 1000)
        elif case == "bad-magic":
            server.send(b"\x00" * 16)
        elif case == "simple-status":
            server.simple(req.handle)
        elif case == "no-context":
            server.chunk(req.handle, wire.REPLY_TYPE_NONE)

    fake.handler = bad
    with Client(fake.address) as c:
        with pytest.raises(ProtocolError, match=MESSAGES[case]):
            list(c.extents()) if case.endswith(("status", "context")) else c.read(4096, 1024)
        with pytest.raises(ProtocolError, match="unusable"):
            c.read(0, 512)


def test_block_status_answers_long_and_short(fake_nbd) -> None:
    fake = fake_nbd(size=MiB)

    def odd(server, req):  # first extent 4k, then one running far past the request
        server.status(req.handle, ALLOCATION, [(4096, 3), (8 * MiB, 0)] if req.offset == 0 else [(4096, 0)])

    fake.handler = odd
    with Client(fake.address) as c:
        assert c.block_status(0, 64 * KiB)[ALLOCATION] == [Extent(0, 4096, Z), Extent(4096, 60 * KiB, 0)]
        assert list(c.extents()) == [Extent(0, 4096, Z), Extent(4096, MiB - 4096, 0)]


@pytest.mark.parametrize("connections", [1, 2])
def test_reply_timeout(nbdkit, connections: int) -> None:
    srv = nbdkit("memory", "size=1M", "rdelay=5", filters=["delay"])
    with Client(srv.address, timeout=0.3, connect_timeout=10) as c:
        start = time.monotonic()
        with pytest.raises(NbdTimeout):
            c.read(0, 4096)
        assert time.monotonic() - start < 2
        with pytest.raises(ProtocolError):
            c.read(0, 4096)
    with Reader(srv.address, connections=connections, timeout=0.3) as r:
        start = time.monotonic()
        with pytest.raises(NbdTimeout):
            collect(r, [(0, MiB)])
        assert time.monotonic() - start < 2


@pytest.mark.parametrize("connections", [1, 2])
def test_server_killed_mid_transfer(nbdkit, connections: int) -> None:
    srv = nbdkit("pattern", "size=256M", "rdelay=50ms", filters=["delay"], read_only=True)
    with Reader(srv.address, connections=connections, request_size=MiB, buffers=4, timeout=30) as r:
        start = time.monotonic()
        it = r.read([(0, 256 * MiB)])
        first = next(it)
        assert bytes(first.data or b"") == pattern(0, MiB)
        srv.kill()
        with pytest.raises(ProtocolError) as e:
            for chunk in it:  # what was already received is still right
                assert bytes(chunk.data or b"") == pattern(chunk.offset, chunk.length)
        assert not isinstance(e.value, NbdTimeout)
        assert time.monotonic() - start < 10


@pytest.mark.parametrize("connections", [1, 2])
def test_broken_connection_fails_the_reader_fast(nbdkit, connections: int) -> None:
    """One connection breaks: the others' slow reads are not waited for."""
    srv = nbdkit("pattern", "size=64M", "rdelay=3", filters=["delay"], read_only=True)
    with Reader(srv.address, connections=connections, request_size=MiB, buffers=4, timeout=30) as r:
        threading.Timer(0.3, r.client.abort).start()
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="aborted"):
            collect(r, [(0, 64 * MiB)])
        assert time.monotonic() - start < 2
        with pytest.raises(ProtocolError):
            collect(r, [(0, MiB)])


def test_server_killed_during_one_read(nbdkit) -> None:
    srv = nbdkit("pattern", "size=64M", "rdelay=1", filters=["delay"], read_only=True)
    with Client(srv.address, timeout=30) as c:
        threading.Timer(0.2, srv.kill).start()
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="closed"):
            c.read(0, 8 * MiB)
        assert time.monotonic() - start < 5


# --- addresses ---


@pytest.mark.parametrize(
    "url, address",
    [
        ("nbd+unix:///?socket=/run/x.sock", Address.unix("/run/x.sock")),
        ("nbd+unix:///sda?socket=/run/x.sock", Address.unix("/run/x.sock", "sda")),
        ("nbd://example.org/disk%201", Address.tcp("example.org", 10809, "disk 1")),
        ("nbd://[::1]:10810/", Address.tcp("::1", 10810)),
    ],
)
def test_address_parse_and_url(url: str, address: Address) -> None:
    assert Address.parse(url) == address
    assert Address.parse(address.url) == address


@pytest.mark.parametrize("url", ["http://x/", "nbds://x/", "nbd+unix:///x", "nbd:///x", "nbd://x:port/"])
def test_address_rejects(url: str) -> None:
    with pytest.raises(NbdError):
        Address.parse(url)


def test_reader_dirty_extents_walk_the_bitmap_alone(tmp_path, qemu_nbd) -> None:
    """An incremental's walk: the bitmap on a connection of its own, allocation only where dirty."""
    image = qcow2(
        tmp_path, 64 * MiB,
        "write -P 0x11 0 8M",
        bitmap="b0",
        after=("write -P 0x22 1M 64k", "write -z 40M 128k", "write -P 0x33 60M 64k"),
    )
    srv = qemu_nbd(image, read_only=True, bitmap="b0", shared=4)
    with Reader(srv.address, dirty_bitmap="b0") as r:
        assert r.connections > 1 and r.bitmap_status() is not None
        want = [e for e in r.changed_extents() if e.dirty]
        assert list(r.dirty_extents()) == want == [
            Extent(MiB, 64 * KiB, DIRTY), Extent(40 * MiB, 128 * KiB, DIRTY | Z), Extent(60 * MiB, 64 * KiB, DIRTY)]
    with Reader(srv.address, dirty_bitmap="b0", connections=1) as r:
        assert r.bitmap_status() is None and list(r.dirty_extents()) == want


def test_reader_without_a_bitmap_alone_connection_keeps_its_connections(tmp_path, qemu_nbd, monkeypatch) -> None:
    """A server that refuses the bitmap alone on the second connection: a plain one there, the combined walk."""
    image = qcow2(tmp_path, 16 * MiB, "write -P 0x11 0 1M", bitmap="b0", after=("write -P 0x22 4M 64k",))
    srv = qemu_nbd(image, read_only=True, bitmap="b0", shared=4)
    real = Client.__init__

    def refusing(self, *args, allocation: bool = True, **kw) -> None:
        if not allocation:
            raise HandshakeError("refused (test)")
        real(self, *args, allocation=allocation, **kw)

    monkeypatch.setattr(Client, "__init__", refusing)
    with Reader(srv.address, dirty_bitmap="b0") as r:
        assert r.connections == 4 and r.bitmap_status() is None
        assert list(r.dirty_extents()) == [Extent(4 * MiB, 64 * KiB, DIRTY)]
