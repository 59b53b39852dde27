"""A read-only NBD server, pure Python, beside the client it shares `vmbk.nbd.wire` with.

It serves restore points (`vmbk.restore.serve`: each disk of a point is an
export named after its target, ``vda``), so real clients -- qemu-img,
nbdcopy, nbdinfo, nbdfuse, QEMU's block layer, vmbk's own reader -- read
a backup without it being written out first.  Layers, bottom up:

``export``        what is served: a name, a size, a reader per connection
                  (`vmbk.stream.chainread.ChainImage` is one);
``handshake``     fixed newstyle negotiation, the server's side: GO/INFO/LIST,
                  structured replies, ``base:allocation``, STARTTLS;
``transmission``  one connection's requests: READ (holes as hole chunks),
                  BLOCK_STATUS, writes refused with NBD_EPERM, DISC;
``listener``      the socket, a thread per connection, a clean stop.

Socket I/O is `vmbk.nbd.transport`, the client's, with TLS.
"""

from vmbk.nbd.server.export import Export, Handle
from vmbk.nbd.server.listener import Server

__all__ = ["Export", "Handle", "Server"]
