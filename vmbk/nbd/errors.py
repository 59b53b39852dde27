"""Errors of the NBD client.

The split matters to callers: after a `RequestError` the connection is
fine and the next request may succeed (a bad sector, an out-of-range
read); after a `ProtocolError` (and its `NbdTimeout`) the byte stream is
in an unknown state, so the client refuses further requests and the only
way on is a new connection.  Both carry what the server said, because
"Input/output error" alone does not tell an operator which disk failed.
"""

from __future__ import annotations

import os

from vmbk.errors import Exit, VmbkError


class NbdError(VmbkError):
    """Base of every NBD failure: an external tool (the server) failed us."""

    code = Exit.TOOL
    kind = "nbd"


class ProtocolError(NbdError):
    """The connection is unusable: EOF, garbage, a reply we cannot parse.

    Raised for a server that died mid-transfer too, so a short read can
    never pass as a successful one.
    """


class NbdTimeout(ProtocolError):
    """No byte arrived (or could be sent) within the configured timeout.

    A ProtocolError because the reply may still arrive later and we no
    longer know where it would land; the connection must be dropped.
    """


class HandshakeError(NbdError):
    """The server refused an option during negotiation.

    ``option`` and ``reply`` are the NBD codes; ``server_message`` is the
    text the server attached (qemu-nbd and nbdkit usually send one).
    """

    def __init__(
        self,
        message: str,
        *,
        option: int | None = None,
        reply: int | None = None,
        server_message: str = "",
    ) -> None:
        if server_message:
            message = f"{message}: {server_message}"
        super().__init__(message)
        self.option = option
        self.reply = reply
        self.server_message = server_message


class RequestError(NbdError):
    """The server failed one request; the connection remains usable.

    ``errno`` is the host errno (``errno.EIO``...), ``server_message`` the
    server's text if any, ``offset`` the failing offset when the server
    reported one (NBD_REPLY_TYPE_ERROR_OFFSET).
    """

    def __init__(
        self,
        command: str,
        offset: int,
        length: int,
        errno: int,
        server_message: str = "",
        error_offset: int | None = None,
    ) -> None:
        text = f"NBD {command} offset={offset} length={length} failed: "
        text += f"[Errno {errno}] {os.strerror(errno)}"
        if server_message:
            text += f": {server_message}"
        if error_offset is not None:
            text += f" (at offset {error_offset})"
        super().__init__(text)
        self.command = command
        self.offset = offset
        self.length = length
        self.errno = errno
        self.server_message = server_message
        self.error_offset = error_offset


class Unsupported(NbdError):
    """The server did not advertise what the caller asked for.

    Raised before anything is sent, e.g. TRIM without NBD_FLAG_SEND_TRIM or
    extents of a context the server did not grant.
    """
