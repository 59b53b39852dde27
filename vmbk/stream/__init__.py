"""virtnbdbackup's sparse stream format: write, scan, read, merge chains.

``format``: constants, headers, :class:`StreamMeta`, :class:`StreamError`;
``writer``: :class:`StreamWriter`; ``atomic``: :func:`write_stream_atomic`
(the ``.partial`` / ``.chksum`` / rename order);
``scan``: :func:`scan` (the extent map), :func:`read_meta`;
``reader``: :class:`StreamReader` (payloads); ``lz4read``: stored lz4
blocks copied without decompressing;
``checksum``: adler32 and the ``.chksum`` files;
``chain``: :func:`merge_chain` (newest frame wins) and helpers;
``chainread``: :class:`~vmbk.stream.chainread.ChainImage`, a chain's
merged image read in disk order.
"""

from vmbk.stream.atomic import write_stream_atomic
from vmbk.stream.chain import Segment, merge_chain, reconstruct_raw
from vmbk.stream.checksum import (
    file_checksum,
    read_checksum_file,
    verify_checksum,
    write_checksum_file,
)
from vmbk.stream.format import (
    MAX_REQUEST_SIZE,
    StreamError,
    StreamMeta,
)
from vmbk.stream.reader import StreamReader
from vmbk.stream.scan import Frame, StreamMap, read_meta, scan
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
