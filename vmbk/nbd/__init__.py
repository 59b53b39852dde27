"""A pure-Python NBD client: stdlib sockets, no libnbd.

Layers, bottom up: `wire` (numbers and structs of the protocol),
`transport` (exact-length socket I/O with timeouts), `handshake` (fixed
newstyle negotiation), `client` (one connection, pipelined requests),
`status` and `extents` (block status walking and the pure extent logic),
`reader` (pipelined multi-connection reads delivered in offset order).
The server, `vmbk.nbd.server`, sits beside it on the same `wire` and
`transport`.
"""

from .address import Address
from .client import Client, Command
from .errors import HandshakeError, NbdError, NbdTimeout, ProtocolError, RequestError, Unsupported
from .extents import DIRTY, HOLE, ZERO, Extent
from .reader import Chunk, Reader
from .wire import ALLOCATION, DIRTY_BITMAP_PREFIX

__all__ = [
    "ALLOCATION",
    "DIRTY",
    "DIRTY_BITMAP_PREFIX",
    "HOLE",
    "ZERO",
    "Address",
    "Chunk",
    "Client",
    "Command",
    "Extent",
    "HandshakeError",
    "NbdError",
    "NbdTimeout",
    "ProtocolError",
    "Reader",
    "RequestError",
    "Unsupported",
]
