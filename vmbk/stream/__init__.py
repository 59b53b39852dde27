"""virtnbdbackup's sparse stream format: write, scan, read, merge chains.

``format``: constants, headers, :class:`StreamMeta`, :class:`StreamError`;
``writer``: :class:`StreamWriter`; ``atomic``: :func:`write_stream_atomic`;
``reader``: :func:`scan`, :class:`StreamReader`, checksums;
``chain``: :func:`merge_chain` (newest frame wins) and helpers.
"""

from vmbk.stream.chain import Segment, merge_chain, reconstruct_raw
from vmbk.stream.format import (
    MAX_REQUEST_SIZE,
    StreamError,
    StreamMeta,
)
from vmbk.stream.reader import (
    Frame,
    StreamMap,
    StreamReader,
    file_checksum,
    read_checksum_file,
    read_meta,
    scan,
    verify_checksum,
)
from vmbk.stream.atomic import write_checksum_file, write_stream_atomic
from vmbk.stream.writer import StreamWriter

__all__ = [
    "MAX_REQUEST_SIZE",
    "Frame",
    "Segment",
    "StreamError",
    "StreamMap",
    "StreamMeta",
    "StreamReader",
    "StreamWriter",
    "file_checksum",
    "merge_chain",
    "read_checksum_file",
    "read_meta",
    "reconstruct_raw",
    "scan",
    "verify_checksum",
    "write_checksum_file",
    "write_stream_atomic",
]
