"""The NBD server against malformed and hostile clients, over real sockets.

Every case talks raw bytes to a running `vmbk.nbd.server.Server` whose
export checks every read it is asked for: the server must answer with an
NBD error or close that one connection, never read outside the image,
never die, and never keep another client waiting.  After each case a good
client (vmbk's own) reads the whole export and compares it.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from vmbk.nbd import Client, wire
from vmbk.nbd.server import Export, Server

SIZE = 1 << 20
IMAGE = bytes(random.Random(5).randbytes(SIZE // 2)) + bytes(SIZE // 4) + b"tail" * (SIZE // 16)


class Checked:
    """A handle over IMAGE that fails the test (and the request) on any read outside it."""

    outside: list[tuple[int, int]] = []

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        runs = []
        for start, end, data in ((0, SIZE // 2, True), (SIZE // 2, SIZE * 3 // 4, False), (SIZE * 3 // 4, SIZE, True)):
            a, b = max(start, offset), min(end, offset + length)
            if a < b:
                runs.append((a, b - a, data))
        return runs

    def pread_into(self, offset: int, out: memoryview) -> None:
        self._check(offset, out.nbytes)
        out[:] = IMAGE[offset:offset + out.nbytes]

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > SIZE:
            Checked.outside.append((offset, length))
            raise ValueError("outside the image")

    def close(self) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path):
    Checked.outside = []
    srv = Server([Export("vda", SIZE, Checked, "test image"), Export("vdb", SIZE, Checked)],
                 unix=tmp_path / "nbd.sock").start()
    yield srv
    srv.stop(grace=1.0)
    assert Checked.outside == []


def good_read(srv: Server) -> None:
    with Client(srv.uri("vda"), timeout=10) as c:
        assert c.read(0, SIZE) == IMAGE
        assert c.read_only and c.can_multi_conn


def raw(srv: Server) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(srv.unix))
    return s


def recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def closed(s: socket.socket, timeout: float = 10) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def greet(s: socket.socket, flags: int = wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES) -> None:
    magic, opt, hflags = wire.HANDSHAKE.unpack(recv(s, wire.HANDSHAKE.size))
    assert (magic, opt) == (wire.NBDMAGIC, wire.IHAVEOPT) and hflags & wire.FLAG_FIXED_NEWSTYLE
    s.sendall(wire.CLIENT_FLAGS.pack(flags))


def option(s: socket.socket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send an option; its replies up to the final one."""
    s.sendall(wire.OPTION.pack(wire.IHAVEOPT, opt, len(data)) + data)
    replies = []
    while True:
        magic, ropt, rtype, length = wire.OPTION_REPLY.unpack(recv(s, wire.OPTION_REPLY.size))
        assert magic == wire.OPTION_REPLY_MAGIC and ropt == opt
        replies.append((rtype, recv(s, length)))
        if rtype in (wire.REP_ACK,) or rtype & wire.REP_ERR_BIT:
            return replies


def name(text: str) -> bytes:
    return struct.pack("!I", len(text)) + text.encode()


def go(s: socket.socket, export: str = "vda", structured: bool = True, meta: bool = True) -> None:
    greet(s)
    if structured:
        assert option(s, wire.OPT_STRUCTURED_REPLY)[-1][0] == wire.REP_ACK
    if meta:
        reps = option(s, wire.OPT_SET_META_CONTEXT, name(export) + struct.pack("!I", 1) + name(wire.ALLOCATION))
        assert [r[0] for r in reps] == [wire.REP_META_CONTEXT, wire.REP_ACK]
    reps = option(s, wire.OPT_GO, name(export) + struct.pack("!H", 0))
    assert reps[-1][0] == wire.REP_ACK


def request(s: socket.socket, cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 7) -> None:
    s.sendall(wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, cmd, cookie, offset, length))


def error_of(s: socket.socket, cookie: int = 7) -> int:
    """The error of a structured reply to a request (0: success), its data skipped."""
    error = 0
    while True:
        magic, flags, rtype, handle, length = wire.STRUCTURED_REPLY.unpack(recv(s, wire.STRUCTURED_REPLY.size))
        assert magic == wire.STRUCTURED_REPLY_MAGIC and handle == cookie
        body = recv(s, length)
        if rtype & wire.REPLY_TYPE_ERROR_BIT:
            error = struct.unpack_from("!I", body)[0]
        if flags & wire.REPLY_FLAG_DONE:
            return error


# -- the handshake ----------------------------------------------------------------------------------


def test_bad_option_magic_closes_only_that_connection(server):
    s = raw(server)
    greet(s)
    s.sendall(b"NOTMAGIC" + struct.pack("!II", wire.OPT_GO, 0))
    assert closed(s)
    good_read(server)


def test_unknown_client_flags_close_the_connection(server):
    s = raw(server)
    greet(s, flags=wire.FLAG_FIXED_NEWSTYLE | 0x80)
    assert closed(s)
    good_read(server)


def test_oversized_option_length_is_a_hard_disconnect_without_reading_it(server):
    s = raw(server)
    greet(s)
    t0 = time.monotonic()
    s.sendall(wire.OPTION.pack(wire.IHAVEOPT, wire.OPT_GO, 0xFFFFFFFF))
    assert closed(s) and time.monotonic() - t0 < 5
    good_read(server)


def test_unknown_and_malformed_options_get_errors_and_the_client_may_go_on(server):
    s = raw(server)
    greet(s)
    assert option(s, 4242, b"junk")[-1][0] == wire.REP_ERR_UNSUP
    assert option(s, wire.OPT_LIST, b"x")[-1][0] == wire.REP_ERR_INVALID
    assert option(s, wire.OPT_INFO, b"\xff\xff\xff\xff")[-1][0] == wire.REP_ERR_INVALID  # name longer than the data
    assert option(s, wire.OPT_INFO, name("vda") + struct.pack("!H", 5))[-1][0] == wire.REP_ERR_INVALID
    assert option(s, wire.OPT_GO, name("nope") + struct.pack("!H", 0))[-1][0] == wire.REP_ERR_UNKNOWN
    assert option(s, wire.OPT_GO, struct.pack("!I", 2) + b"\xff\xfe" + struct.pack("!H", 0))[-1][0] == wire.REP_ERR_INVALID
    assert option(s, wire.OPT_SET_META_CONTEXT, name("vda") + struct.pack("!I", 1))[-1][0] == wire.REP_ERR_INVALID
    assert option(s, wire.OPT_STARTTLS)[-1][0] == wire.REP_ERR_UNSUP  # no TLS configured
    reps = option(s, wire.OPT_LIST)
    assert [r[0] for r in reps] == [wire.REP_SERVER, wire.REP_SERVER, wire.REP_ACK]
    assert reps[0][1][4:7] == b"vda" and reps[0][1].endswith(b"test image")
    reps = option(s, wire.OPT_GO, name("") + struct.pack("!HHH", 2, wire.INFO_NAME, wire.INFO_BLOCK_SIZE))
    infos = {struct.unpack_from("!H", r[1])[0]: r[1] for r in reps if r[0] == wire.REP_INFO}
    assert infos[wire.INFO_NAME][2:] == b"vda"  # the empty name is the first export
    assert wire.INFO_EXPORT_S.unpack(infos[wire.INFO_EXPORT])[1] == SIZE
    request(s, wire.CMD_READ, 0, 16)
    magic, err, cookie = wire.SIMPLE_REPLY.unpack(recv(s, wire.SIMPLE_REPLY.size))  # no structured replies asked
    assert (magic, err, cookie) == (wire.SIMPLE_REPLY_MAGIC, 0, 7) and recv(s, 16) == IMAGE[:16]
    request(s, wire.CMD_DISC, 0, 0)
    assert closed(s)


def test_too_many_options_end_the_session(server):
    s = raw(server)
    greet(s)
    for _ in range(1000):
        assert option(s, 4242)[-1][0] == wire.REP_ERR_UNSUP
    try:  # the server hangs up after the 1000th answer: the next option may already meet a reset
        s.sendall(wire.OPTION.pack(wire.IHAVEOPT, 4242, 0))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert closed(s)
    good_read(server)


# -- transmission --------------------------------------------------------------------------------


def test_requests_outside_the_image_or_too_big_get_einval(server):
    s = raw(server)
    go(s)
    for offset, length in ((SIZE, 1), (SIZE - 1, 2), (2**64 - 1, 1), (0, SIZE + 1), (2**63, 2**32 - 1)):
        request(s, wire.CMD_READ, offset, length)
        assert error_of(s) == wire.ERR_INVAL
        request(s, wire.CMD_BLOCK_STATUS, offset, length)
        assert error_of(s) == wire.ERR_INVAL
    request(s, wire.CMD_READ, 0, 64 << 20)
    assert error_of(s) == wire.ERR_INVAL  # above the maximum payload
    request(s, wire.CMD_READ, 0, 16, flags=0x40)
    assert error_of(s) == wire.ERR_INVAL  # an unknown flag
    request(s, wire.CMD_BLOCK_STATUS, 0, 0)
    assert error_of(s) == wire.ERR_INVAL
    request(s, 99, 0, 0)
    assert error_of(s) == wire.ERR_INVAL
    request(s, wire.CMD_FLUSH, 0, 0)
    assert error_of(s) == wire.ERR_INVAL  # not advertised: nothing to flush on a read-only export
    request(s, wire.CMD_READ, SIZE - 4, 4)
    assert error_of(s) == 0
    request(s, wire.CMD_DISC, 0, 0)
    assert closed(s)


def test_writes_are_refused_with_eperm_and_the_stream_stays_in_step(server):
    s = raw(server)
    go(s)
    request(s, wire.CMD_WRITE, 0, 4096)
    s.sendall(b"w" * 4096)
    assert error_of(s) == wire.ERR_PERM
    for cmd in (wire.CMD_TRIM, wire.CMD_WRITE_ZEROES):
        request(s, cmd, 0, 4096)
        assert error_of(s) == wire.ERR_PERM
    request(s, wire.CMD_READ, 0, 4096)
    assert error_of(s) == 0
    request(s, wire.CMD_WRITE, 0, 2**32 - 1)  # a payload no client may send: the connection ends
    assert closed(s)
    good_read(server)


def test_block_status_without_a_context_is_einval_and_with_one_reports_holes(server):
    s = raw(server)
    go(s, meta=False)
    request(s, wire.CMD_BLOCK_STATUS, 0, SIZE)
    assert error_of(s) == wire.ERR_INVAL
    with Client(server.uri("vda"), timeout=10) as c:
        ext = c.block_status(0, SIZE)[wire.ALLOCATION]
    assert [(e.offset, e.length, e.flags) for e in ext] == [
        (0, SIZE // 2, 0), (SIZE // 2, SIZE // 4, wire.STATE_HOLE | wire.STATE_ZERO), (SIZE * 3 // 4, SIZE // 4, 0)]


def test_bad_request_magic_and_disconnects_mid_request_end_that_connection_only(server):
    s = raw(server)
    go(s)
    s.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert closed(s)
    for cut in (1, 13, 27):  # a request cut short, then gone
        s = raw(server)
        go(s)
        s.sendall(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, wire.CMD_READ, 1, 0, 4096)[:cut])
        s.close()
    s = raw(server)
    go(s)
    request(s, wire.CMD_WRITE, 0, 65536)
    s.sendall(b"x" * 1000)  # a write payload cut short
    s.close()
    good_read(server)


def test_a_stalled_client_never_holds_up_the_others(server):
    stalled = []
    for _ in range(3):
        s = raw(server)
        greet(s)
        s.sendall(wire.OPTION.pack(wire.IHAVEOPT, wire.OPT_GO, 100)[:10])  # half an option, then silence
        stalled.append(s)
    s = raw(server)
    go(s)
    s.sendall(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, wire.CMD_READ, 1, 0, 4096)[:20])  # half a request
    stalled.append(s)
    t0 = time.monotonic()
    done = threading.Event()
    threading.Thread(target=lambda: (good_read(server), done.set()), daemon=True).start()
    assert done.wait(10) and time.monotonic() - t0 < 10
    for s in stalled:
        s.close()


def test_random_bytes_at_every_stage_never_hurt_the_server(server):
    rnd = random.Random(1234)
    for i in range(150):
        s = raw(server)
        try:
            stage = i % 3
            if stage >= 1:
                greet(s)
            if stage == 2:
                option(s, wire.OPT_STRUCTURED_REPLY)
                option(s, wire.OPT_GO, name("vda") + struct.pack("!H", 0))
                if rnd.random() < 0.5:  # a well-formed header with random fields
                    s.sendall(wire.REQUEST.pack(wire.REQUEST_MAGIC, rnd.getrandbits(16), rnd.randrange(12),
                                                rnd.getrandbits(64), rnd.getrandbits(64), rnd.getrandbits(32)))
            s.sendall(rnd.randbytes(rnd.randrange(1, 300)))
        except (OSError, EOFError):
            pass
        finally:
            s.close()
    good_read(server)
    deadline = time.monotonic() + 70
    while server._threads() and time.monotonic() < deadline:  # every connection ends by itself
        time.sleep(0.1)
    assert len(server._threads()) <= 1


def test_the_connection_limit_refuses_more_and_recovers(tmp_path):
    srv = Server([Export("vda", SIZE, Checked)], unix=tmp_path / "s.sock", max_connections=2).start()
    try:
        held = [raw(srv), raw(srv)]
        for s in held:
            greet(s)
        extra = raw(srv)
        assert closed(extra)
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while srv._threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        good_read(srv)
    finally:
        srv.stop(grace=1.0)


def test_stop_lets_a_reply_finish_and_removes_the_socket(tmp_path):
    srv = Server([Export("vda", SIZE, Checked)], unix=tmp_path / "s.sock").start()
    c = Client(srv.uri("vda"), timeout=10)
    assert c.read(0, 4096) == IMAGE[:4096]
    srv.stop(grace=2.0)
    assert not (tmp_path / "s.sock").exists()
    with pytest.raises(Exception):
        c.read(0, 4096)
    c.close()
