"""The server's side of fixed newstyle negotiation: from accept to transmission.

What is answered (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md,
"Option types"; the client's side is `vmbk.nbd.handshake`):

* NBD_OPT_GO / NBD_OPT_INFO: NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE (always:
  1 / 4096 / 32 MiB, the spec's defaults, so clients that do not ask are
  not refused), NBD_INFO_NAME and NBD_INFO_DESCRIPTION when asked for;
  the empty name is the first export (the default export);
* NBD_OPT_EXPORT_NAME, for old clients (an unknown name ends the session:
  this option cannot return an error);
* NBD_OPT_LIST: one NBD_REP_SERVER per export, with its description;
* NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_LIST_META_CONTEXT and
  NBD_OPT_SET_META_CONTEXT: ``base:allocation`` is the only context;
* NBD_OPT_STARTTLS: with a TLS context the server runs in FORCEDTLS mode
  (every option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD
  until TLS is up, and the state negotiated before it is forgotten);
  without one, NBD_REP_ERR_UNSUP;
* NBD_OPT_ABORT: acknowledged, then the session ends;
* anything else: NBD_REP_ERR_UNSUP, its data skipped.

A client that breaks a MUST (wrong magic, unknown client flags, a
malformed length) gets a hard disconnect (`Hangup`), as the spec allows.
Limits against hostile clients, also hard disconnects: option data above
64 KiB (nothing we answer needs more than a few names), more than 1,000
options, and the caller's timeout on every message.  Syntactically bad
data inside a sane length gets NBD_REP_ERR_INVALID and the client may go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Mapping

from vmbk.nbd import wire
from vmbk.nbd.errors import NbdError
from vmbk.nbd.server.export import Export
from vmbk.nbd.transport import Transport

log = logging.getLogger("vmbk.nbd")

MAX_OPTION_DATA = 64 * 1024
MAX_OPTIONS = 1000
#: The id of ``base:allocation`` in NBD_REP_META_CONTEXT and block status chunks.
ALLOCATION_ID = 1
#: Size constraints sent in NBD_INFO_BLOCK_SIZE (the spec's defaults).
MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD = 1, wire.DEFAULT_PREFERRED_BLOCK, wire.DEFAULT_MAX_BLOCK


class Hangup(Exception):
    """The session ends here: the client left, aborted or broke a MUST."""


class Invalid(Exception):
    """Option data that cannot be parsed: NBD_REP_ERR_INVALID, and go on."""


@dataclasses.dataclass
class Session:
    """What the negotiation agreed on; transmission starts with it."""

    export: Export
    structured: bool
    #: Selected metadata contexts: id -> name.
    contexts: dict[int, str]
    #: The transmission flags sent to the client.
    flags: int


@dataclasses.dataclass
class _State:
    structured: bool = False
    meta_export: str | None = None
    contexts: dict[int, str] = dataclasses.field(default_factory=dict)


def transmission_flags(structured: bool) -> int:
    """Read-only, and several connections see one unchanging image (multi-conn)."""
    flags = wire.FLAG_HAS_FLAGS | wire.FLAG_READ_ONLY | wire.FLAG_CAN_MULTI_CONN
    return flags | (wire.FLAG_SEND_DF if structured else 0)


def negotiate(t: Transport, exports: Mapping[str, Export], *, tls: ssl.SSLContext | None = None) -> Session:
    """Run the handshake on a fresh connection; the session to serve, or `Hangup`.

    ``exports``: name -> export, in the order NBD_OPT_LIST shows them
    (the first is the default export).
    """
    t.send(wire.HANDSHAKE.pack(wire.NBDMAGIC, wire.IHAVEOPT, wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES))
    (cflags,) = wire.CLIENT_FLAGS.unpack(t.recv(wire.CLIENT_FLAGS.size))
    if cflags & ~(wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES):
        raise Hangup(f"unknown client flags {cflags:#x}")
    fixed = bool(cflags & wire.FLAG_FIXED_NEWSTYLE)
    state = _State()
    for _ in range(MAX_OPTIONS):
        magic, option, length = wire.OPTION.unpack(t.recv(wire.OPTION.size))
        if magic != wire.IHAVEOPT:
            raise Hangup(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise Hangup(f"option {option} with {length} bytes of data")
        data = t.recv(length) if length else b""
        if option == wire.OPT_EXPORT_NAME:
            return _export_name(t, exports, data, state, tls, no_zeroes=bool(cflags & wire.FLAG_NO_ZEROES))
        if not fixed:
            raise Hangup(f"option {option} from a client without fixed newstyle")
        try:
            session = _option(t, exports, option, data, state, tls)
        except Invalid as e:
            _reply(t, option, wire.REP_ERR_INVALID, str(e))
            continue
        if session is not None:
            return session
    raise Hangup(f"more than {MAX_OPTIONS} options")


def _option(t: Transport, exports: Mapping[str, Export], option: int, data: bytes, state: _State,
            tls: ssl.SSLContext | None) -> Session | None:
    if option == wire.OPT_ABORT:
        with contextlib.suppress(NbdError):  # the spec: it may close without waiting for the ACK
            _reply(t, option, wire.REP_ACK)
        raise Hangup("the client aborted the negotiation")
    if option == wire.OPT_STARTTLS:
        _starttls(t, data, state, tls)
        return None
    if tls is not None and not t.tls:
        _reply(t, option, wire.REP_ERR_TLS_REQD, "this server requires TLS (NBD_OPT_STARTTLS)")
        return None
    if option == wire.OPT_LIST:
        if data:
            raise Invalid("NBD_OPT_LIST takes no data")
        for ex in exports.values():
            _reply(t, option, wire.REP_SERVER, _string(ex.name) + ex.description.encode())
        _reply(t, option, wire.REP_ACK)
    elif option in (wire.OPT_INFO, wire.OPT_GO):
        return _info(t, exports, option, data, state)
    elif option == wire.OPT_STRUCTURED_REPLY:
        if data:
            raise Invalid("NBD_OPT_STRUCTURED_REPLY takes no data")
        if state.structured:
            raise Invalid("structured replies are already negotiated")
        state.structured = True
        _reply(t, option, wire.REP_ACK)
    elif option in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
        _meta_context(t, exports, option, data, state)
    else:
        _reply(t, option, wire.REP_ERR_UNSUP, f"option {option} is not supported")
    return None


def _export_name(t: Transport, exports: Mapping[str, Export], data: bytes, state: _State,
                 tls: ssl.SSLContext | None, *, no_zeroes: bool) -> Session:
    """NBD_OPT_EXPORT_NAME: no error reply exists, so anything wrong ends the session."""
    if tls is not None and not t.tls:
        raise Hangup("NBD_OPT_EXPORT_NAME before TLS")
    try:
        name = _text(data)
    except Invalid as e:
        raise Hangup(str(e)) from None
    export = _lookup(exports, name)
    if export is None:
        raise Hangup(f"no export {name!r}")
    flags = transmission_flags(state.structured)
    t.send(wire.EXPORT_NAME_REPLY.pack(export.size, flags), b"" if no_zeroes else bytes(124))
    return Session(export, state.structured, _contexts_for(state, name), flags)


def _starttls(t: Transport, data: bytes, state: _State, tls: ssl.SSLContext | None) -> None:
    if data:
        raise Invalid("NBD_OPT_STARTTLS takes no data")
    if tls is None:
        _reply(t, wire.OPT_STARTTLS, wire.REP_ERR_UNSUP, "TLS is not configured on this server")
        return
    if t.tls:
        raise Invalid("TLS is already negotiated")
    _reply(t, wire.OPT_STARTTLS, wire.REP_ACK)
    t.start_tls(tls, server_side=True)
    state.structured, state.meta_export, state.contexts = False, None, {}  # the spec: forget it all


def _info(t: Transport, exports: Mapping[str, Export], option: int, data: bytes, state: _State) -> Session | None:
    name, rest = _take_string(data)
    if len(rest) < 2:
        raise Invalid("NBD_OPT_INFO/GO data ends before its list of requests")
    (count,) = wire.U16.unpack_from(rest)
    if len(rest) != 2 + 2 * count:
        raise Invalid(f"NBD_OPT_INFO/GO announces {count} requests in {len(rest) - 2} bytes")
    wanted = {wire.U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)}
    export = _lookup(exports, name)
    if export is None:
        _reply(t, option, wire.REP_ERR_UNKNOWN, f"no export {name!r} (exports: {', '.join(exports)})")
        return None
    structured = state.structured
    flags = transmission_flags(structured)
    _reply(t, option, wire.REP_INFO, wire.INFO_EXPORT_S.pack(wire.INFO_EXPORT, export.size, flags))
    if wire.INFO_NAME in wanted:
        _reply(t, option, wire.REP_INFO, wire.U16.pack(wire.INFO_NAME) + export.name.encode())
    if wire.INFO_DESCRIPTION in wanted and export.description:
        _reply(t, option, wire.REP_INFO, wire.U16.pack(wire.INFO_DESCRIPTION) + export.description.encode())
    _reply(t, option, wire.REP_INFO,
           wire.INFO_BLOCK_SIZE_S.pack(wire.INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
    _reply(t, option, wire.REP_ACK)
    if option == wire.OPT_INFO:
        return None
    return Session(export, structured, _contexts_for(state, name), flags)


def _meta_context(t: Transport, exports: Mapping[str, Export], option: int, data: bytes, state: _State) -> None:
    setting = option == wire.OPT_SET_META_CONTEXT
    if setting:
        state.meta_export, state.contexts = None, {}  # replaced, even when this one fails
    if not state.structured:
        raise Invalid("metadata contexts need structured replies first")
    name, rest = _take_string(data)
    if len(rest) < 4:
        raise Invalid("metadata context data ends before its number of queries")
    (count,) = wire.U32.unpack_from(rest)
    rest = rest[4:]
    queries = []
    for _ in range(count):
        query, rest = _take_string(rest)
        queries.append(query)
    if rest:
        raise Invalid(f"{len(rest)} bytes after the last query")
    if _lookup(exports, name) is None:
        _reply(t, option, wire.REP_ERR_UNKNOWN, f"no export {name!r}")
        return
    if setting:
        selected = wire.ALLOCATION in queries
    else:  # no query lists everything; "base:" is the namespace's wildcard
        selected = not queries or wire.ALLOCATION in queries or "base:" in queries
    if selected:
        ctx_id = ALLOCATION_ID if setting else 0  # the spec: ids of a listing are 0
        _reply(t, option, wire.REP_META_CONTEXT, wire.U32.pack(ctx_id) + wire.ALLOCATION.encode())
    if setting:
        state.meta_export = name
        state.contexts = {ALLOCATION_ID: wire.ALLOCATION} if selected else {}
    _reply(t, option, wire.REP_ACK)


def _contexts_for(state: _State, name: str) -> dict[int, str]:
    """The contexts set for this export name (another name's do not count)."""
    return dict(state.contexts) if state.structured and state.meta_export == name else {}


def _lookup(exports: Mapping[str, Export], name: str) -> Export | None:
    if name == "":
        return next(iter(exports.values()), None)
    return exports.get(name)


def _take_string(data: bytes) -> tuple[str, bytes]:
    """A 32-bit length and that many bytes of UTF-8; the text and what follows."""
    if len(data) < 4:
        raise Invalid("option data ends inside a string length")
    (n,) = wire.U32.unpack_from(data)
    if n > len(data) - 4:
        raise Invalid(f"a string of {n} bytes in {len(data) - 4} bytes of data")
    return _text(data[4:4 + n]), data[4 + n:]


def _text(raw: bytes) -> str:
    if len(raw) > wire.MAX_STRING:
        raise Invalid(f"a string of {len(raw)} bytes (at most {wire.MAX_STRING})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("a string that is not UTF-8") from None


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return wire.U32.pack(len(b)) + b


def _reply(t: Transport, option: int, rtype: int, data: bytes | str = b"") -> None:
    payload = data.encode("utf-8")[:wire.MAX_STRING] if isinstance(data, str) else data
    t.send(wire.OPTION_REPLY.pack(wire.OPTION_REPLY_MAGIC, option, rtype, len(payload)), payload)
