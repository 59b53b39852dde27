"""Fixed newstyle negotiation: from a connected socket to transmission phase.

Order of options, and why:

1. NBD_OPT_STARTTLS when the caller gives a TLS context: everything after
   it must be private, and a server that refuses it is never sent the
   export's name (HandshakeError);
2. NBD_OPT_STRUCTURED_REPLY: needed for sparse reads (holes are not sent)
   and for BLOCK_STATUS; without it we still work, reading everything.
3. NBD_OPT_SET_META_CONTEXT: base:allocation and the dirty bitmap(s).
4. NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE request: we promise to honour
   the server's block sizes, which lets servers with O_DIRECT-style
   alignment needs accept us instead of refusing.

When the server refuses something we cannot do without, we send
NBD_OPT_ABORT (a soft disconnect, as the spec asks of clients) before the
caller closes the socket.
See https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md#fixed-newstyle-negotiation
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Sequence

from . import wire
from .errors import HandshakeError, ProtocolError
from .transport import Transport

log = logging.getLogger("vmbk.nbd")

#: Option replies are small (names, sizes); anything bigger is garbage.
_MAX_OPTION_REPLY = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What NBD_OPT_GO told us about the export."""

    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int
    structured_replies: bool
    #: Granted metadata contexts: name -> id used in block status chunks.
    contexts: dict[str, int]


def negotiate(t: Transport, export: str, contexts: Sequence[str], *, tls: ssl.SSLContext | None = None,
              server_name: str | None = None) -> ExportInfo:
    """Run the handshake on ``t``; the server is in transmission phase after.

    Raises HandshakeError (after NBD_OPT_ABORT) when the server refuses the
    export, ProtocolError when it does not speak fixed newstyle.
    """
    magic, opt_magic, hflags = wire.HANDSHAKE.unpack(t.recv(wire.HANDSHAKE.size))
    if magic != wire.NBDMAGIC:
        raise ProtocolError(f"{t.name}: not an NBD server (magic {magic:#x})")
    if opt_magic == wire.OLDSTYLE_MAGIC:
        raise ProtocolError(f"{t.name}: oldstyle NBD servers are not supported")
    if opt_magic != wire.IHAVEOPT or not hflags & wire.FLAG_FIXED_NEWSTYLE:
        raise ProtocolError(f"{t.name}: server does not speak fixed newstyle NBD")
    cflags = wire.FLAG_FIXED_NEWSTYLE | (hflags & wire.FLAG_NO_ZEROES)
    t.send(wire.CLIENT_FLAGS.pack(cflags))
    try:
        if tls is not None:
            _starttls(t, tls, server_name)
        structured = _structured_reply(t)
        granted: dict[str, int] = {}
        if structured and contexts:
            granted = _set_meta_context(t, export, contexts)
        return _go(t, export, structured, granted)
    except HandshakeError:
        abort(t)
        raise


def abort(t: Transport) -> None:
    """Send NBD_OPT_ABORT; the server's ACK is not worth waiting for."""
    try:
        _send_option(t, wire.OPT_ABORT)
    except ProtocolError:
        pass


def _starttls(t: Transport, context: ssl.SSLContext, server_name: str | None) -> None:
    _send_option(t, wire.OPT_STARTTLS)
    rtype, data = _recv_reply(t, wire.OPT_STARTTLS)
    if rtype != wire.REP_ACK:
        raise HandshakeError(f"{t.name}: server refused TLS ({_error_text(rtype, data)})",
                             option=wire.OPT_STARTTLS, reply=rtype, server_message=_message(data))
    t.start_tls(context, server_side=False, server_hostname=server_name if context.check_hostname else None)


def _structured_reply(t: Transport) -> bool:
    _send_option(t, wire.OPT_STRUCTURED_REPLY)
    rtype, data = _recv_reply(t, wire.OPT_STRUCTURED_REPLY)
    if rtype == wire.REP_ACK:
        return True
    if rtype & wire.REP_ERR_BIT:
        log.debug("%s: no structured replies: %s", t.name, _error_text(rtype, data))
        return False
    raise ProtocolError(f"{t.name}: unexpected reply {rtype} to NBD_OPT_STRUCTURED_REPLY")


def _set_meta_context(t: Transport, export: str, contexts: Sequence[str]) -> dict[str, int]:
    data = bytearray(_string(export))
    data += wire.U32.pack(len(contexts))
    for name in contexts:
        data += _string(name)
    _send_option(t, wire.OPT_SET_META_CONTEXT, bytes(data))
    granted: dict[str, int] = {}
    while True:
        rtype, reply = _recv_reply(t, wire.OPT_SET_META_CONTEXT)
        if rtype == wire.REP_ACK:
            return granted
        if rtype == wire.REP_META_CONTEXT and len(reply) >= 4:
            (ctx_id,) = wire.U32.unpack_from(reply)
            granted[reply[4:].decode("utf-8", "replace")] = ctx_id
        elif rtype & wire.REP_ERR_BIT:
            # The spec: on error, disregard contexts already replied.
            log.warning("%s: server refused metadata contexts: %s", t.name, _error_text(rtype, reply))
            return {}
        else:
            raise ProtocolError(f"{t.name}: unexpected reply {rtype} to NBD_OPT_SET_META_CONTEXT")


def _go(t: Transport, export: str, structured: bool, granted: dict[str, int]) -> ExportInfo:
    data = _string(export) + wire.U16.pack(1) + wire.U16.pack(wire.INFO_BLOCK_SIZE)
    _send_option(t, wire.OPT_GO, data)
    size = flags = None
    min_block, preferred, max_block = 1, wire.DEFAULT_PREFERRED_BLOCK, wire.DEFAULT_MAX_BLOCK
    while True:
        rtype, reply = _recv_reply(t, wire.OPT_GO)
        if rtype == wire.REP_INFO and len(reply) >= 2:
            (info,) = wire.U16.unpack_from(reply)
            if info == wire.INFO_EXPORT and len(reply) == wire.INFO_EXPORT_S.size:
                _, size, flags = wire.INFO_EXPORT_S.unpack(reply)
            elif info == wire.INFO_BLOCK_SIZE and len(reply) == wire.INFO_BLOCK_SIZE_S.size:
                _, min_block, preferred, max_block = wire.INFO_BLOCK_SIZE_S.unpack(reply)
        elif rtype == wire.REP_ACK:
            break
        elif rtype & wire.REP_ERR_BIT:
            raise HandshakeError(
                f"{t.name}: server refused export {export!r} ({_error_name(rtype)})",
                option=wire.OPT_GO,
                reply=rtype,
                server_message=_message(reply),
            )
        else:
            raise ProtocolError(f"{t.name}: unexpected reply {rtype} to NBD_OPT_GO")
    if size is None or flags is None:
        raise ProtocolError(f"{t.name}: NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
    if min_block < 1 or min_block & (min_block - 1) or max_block < min_block:
        raise ProtocolError(f"{t.name}: bad block sizes min={min_block} max={max_block}")
    return ExportInfo(size, flags, min_block, preferred, max_block, structured, granted)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return wire.U32.pack(len(b)) + b


def _send_option(t: Transport, option: int, data: bytes = b"") -> None:
    t.send(wire.OPTION.pack(wire.IHAVEOPT, option, len(data)), data)


def _recv_reply(t: Transport, option: int) -> tuple[int, bytes]:
    magic, ropt, rtype, length = wire.OPTION_REPLY.unpack(t.recv(wire.OPTION_REPLY.size))
    if magic != wire.OPTION_REPLY_MAGIC:
        raise ProtocolError(f"{t.name}: bad option reply magic {magic:#x}")
    if ropt != option:
        raise ProtocolError(f"{t.name}: reply for option {ropt}, expected {option}")
    if length > _MAX_OPTION_REPLY:
        raise ProtocolError(f"{t.name}: option reply of {length} bytes")
    return rtype, t.recv(length) if length else b""


def _message(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()


def _error_name(rtype: int) -> str:
    return wire.REP_ERR_NAMES.get(rtype, f"error {rtype - wire.REP_ERR_BIT}")


def _error_text(rtype: int, data: bytes) -> str:
    msg = _message(data)
    return f"{_error_name(rtype)}: {msg}" if msg else _error_name(rtype)
