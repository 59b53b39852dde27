"""NBD wire format: magic numbers, flags, option and command codes, structs.

Only what vmbk speaks is here, client (`vmbk.nbd.client`) and server
(`vmbk.nbd.server`) alike: fixed newstyle handshake, structured replies,
metadata contexts, 32-bit ("compact") requests.  Every group links
to the section of the protocol document that defines it, so a reader can
check a number against the spec rather than against our memory of it.
All integers on the wire are big-endian (network order).
"""

from __future__ import annotations

import errno
import struct

SPEC = "https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md"

# --- Handshake: {SPEC}#newstyle-negotiation, #fixed-newstyle-negotiation ---

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253  # oldstyle servers send this instead
OPTION_REPLY_MAGIC = 0x3E889045565A9

# {SPEC}#handshake-flags and #client-flags (same bits on both sides).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# --- Transmission flags: {SPEC}#transmission-flags ---

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --- Options: {SPEC}#option-types ---

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5  # the client sends it first for TLS (handshake); the server (vmbk.nbd.server) answers it
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# --- Option replies: {SPEC}#option-reply-types ---

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT + 1
REP_ERR_POLICY = REP_ERR_BIT + 2
REP_ERR_INVALID = REP_ERR_BIT + 3
REP_ERR_PLATFORM = REP_ERR_BIT + 4
REP_ERR_TLS_REQD = REP_ERR_BIT + 5
REP_ERR_UNKNOWN = REP_ERR_BIT + 6
REP_ERR_SHUTDOWN = REP_ERR_BIT + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT + 8
REP_ERR_TOO_BIG = REP_ERR_BIT + 9

REP_ERR_NAMES = {
    REP_ERR_UNSUP: "unsupported option",
    REP_ERR_POLICY: "forbidden by server policy",
    REP_ERR_INVALID: "invalid option",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "server requires TLS",
    REP_ERR_UNKNOWN: "export not available",
    REP_ERR_SHUTDOWN: "server shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "server requires block size negotiation",
    REP_ERR_TOO_BIG: "request or reply too large",
}

# NBD_REP_INFO types: {SPEC}#option-reply-types (under NBD_REP_INFO).
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- Requests: {SPEC}#request-message, #request-types, #command-flags ---

REQUEST_MAGIC = 0x25609513

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# --- Replies: {SPEC}#simple-reply-message, #structured-reply-chunk-message,
# #structured-reply-flags, #structured-reply-types ---

SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT + 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT + 2

# --- Metadata contexts: {SPEC}#metadata-querying,
# #baseallocation-metadata-context; qemu's namespace is documented in
# https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/nbd.txt ---

ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 1 << 0  # base:allocation: not allocated
STATE_ZERO = 1 << 1  # base:allocation: reads as zeroes
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME: changed since the bitmap began

# --- Error values: {SPEC}#error-values ---
# The spec fixes these numbers independently of the host's errno; map them
# so ``RequestError.errno`` compares equal to ``errno.EIO`` etc. anywhere.
# The server (`vmbk.nbd.server`) sends the ERR_* numbers.

ERR_PERM = 1
ERR_IO = 5
ERR_NOMEM = 12
ERR_INVAL = 22
ERR_NOSPC = 28
ERR_OVERFLOW = 75
ERR_NOTSUP = 95
ERR_SHUTDOWN = 108

ERRNO = {
    ERR_PERM: errno.EPERM,
    ERR_IO: errno.EIO,
    ERR_NOMEM: errno.ENOMEM,
    ERR_INVAL: errno.EINVAL,
    ERR_NOSPC: errno.ENOSPC,
    ERR_OVERFLOW: errno.EOVERFLOW,
    ERR_NOTSUP: errno.ENOTSUP,
    ERR_SHUTDOWN: errno.ESHUTDOWN,
}

# --- Sizes: {SPEC}#size-constraints ---

#: Maximum payload when the server does not advertise one (also our cap).
DEFAULT_MAX_BLOCK = 32 * 1024**2
DEFAULT_PREFERRED_BLOCK = 4096
#: Request lengths are 32-bit.
MAX_LENGTH = 2**32 - 1
#: Strings (export names, context names, messages): {SPEC}#conventions.
MAX_STRING = 4096

# --- Structs ---

HANDSHAKE = struct.Struct("!QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct("!I")
OPTION = struct.Struct("!QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct("!QIII")  # magic, option, reply type, length
INFO_EXPORT_S = struct.Struct("!HQH")  # type, size, transmission flags
EXPORT_NAME_REPLY = struct.Struct("!QH")  # NBD_OPT_EXPORT_NAME: size, transmission flags (+ 124 zeroes)
INFO_BLOCK_SIZE_S = struct.Struct("!HIII")  # type, min, preferred, max
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
U64 = struct.Struct("!Q")
REQUEST = struct.Struct("!IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct("!IIQ")  # magic, error, handle
STRUCTURED_REPLY = struct.Struct("!IHHQI")  # magic, flags, type, handle, length
HOLE = struct.Struct("!QI")  # offset, hole size
ERROR = struct.Struct("!IH")  # error, message length
DESCRIPTOR = struct.Struct("!II")  # extent length, status flags
