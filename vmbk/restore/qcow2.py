"""A fresh qcow2 image written directly: data clusters first, metadata last.

Why not ``qemu-img convert``: going through it means writing the whole
disk twice (a raw intermediate, then the qcow2) or serving the chain to it
over NBD; either way the bytes cross the page cache twice.  A new image
with no backing file and no snapshots is simple to lay out, and writing it
here costs one pass over the data (bench/restore.py: the raw intermediate
plus convert took 2.5-3x as long as this).  ``qemu-img check`` still
checks every image this module writes (`vmbk.restore.image`).

Layout (QEMU's docs/interop/qcow2.txt), in host clusters::

    0            header (version 2 or 3), no header extensions
    1 ..         data clusters in the order of their guest offsets, each
                 L2 table right after the data it maps (written as soon
                 as the writer moves past its range: one table in memory)
    then         the L1 table, the refcount blocks, the refcount table

Every host cluster is used exactly once, so every refcount is 1 and every
L1/L2 entry carries the COPIED flag, as QEMU writes them.  Clusters the
chain never wrote, or that hold only zeroes, stay unallocated: in an image
without a backing file they read as zero.  ImageOptions are the three
`vmbk.restore.image.qcow_options` keeps from the source image: ``compat``
(0.10 = version 2, 1.1 = version 3), ``cluster_size``, ``lazy_refcounts``
(a compatible feature bit of version 3; the refcounts are exact anyway).
Refcounts are 16 bits (QEMU's default; ``refcount_order`` 4).
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import sys
from array import array
from collections.abc import Callable, Sequence

from vmbk.fsutil import pwrite_all

MAGIC = 0x514649FB
COPIED = 1 << 63
REFCOUNT_ORDER = 4  # 16-bit refcounts
LAZY_REFCOUNTS = 1  # compatible feature bit 0
HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3_EXTRA = struct.Struct(">QQQII")  # 32 more: features, refcount_order, header_length
DEFAULT_CLUSTER_BITS = 16


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    version: int = 3
    cluster_bits: int = DEFAULT_CLUSTER_BITS
    lazy_refcounts: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @classmethod
    def parse(cls, options: Sequence[str]) -> ImageOptions:
        """``("compat=1.1", "cluster_size=65536", "lazy_refcounts=on")`` -> ImageOptions.

        ValueError for anything else: this writer makes only these.
        """
        version, bits, lazy = 3, DEFAULT_CLUSTER_BITS, False
        for opt in options:
            key, _, value = opt.partition("=")
            if key == "compat" and value in ("0.10", "v2", "1.1", "v3"):
                version = 2 if value in ("0.10", "v2") else 3
            elif key == "cluster_size" and value.isdigit():
                size = int(value)
                if not (512 <= size <= 2 << 20) or size & (size - 1):
                    raise ValueError(f"qcow2 cluster size {size} is not a power of two from 512 to 2 MiB")
                bits = size.bit_length() - 1
            elif key == "lazy_refcounts" and value in ("on", "off"):
                lazy = value == "on"
            else:
                raise ValueError(f"qcow2 option {opt!r} is not supported by the restore's qcow2 writer")
        return cls(version, bits, lazy and version >= 3)


def _be(values: array) -> bytes:
    """A native array of integers as big-endian bytes."""
    if sys.byteorder == "little":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


class Writer:
    """Writes a qcow2 of ``virtual_size`` into the empty file ``fd``.

    `write` the clusters that hold data, in increasing guest order, then
    `finish` once.  The file must be empty (fresh): bytes never written
    read as zero.
    """

    def __init__(self, fd: int, virtual_size: int, options: ImageOptions, *,
                 pwrite: Callable[[memoryview, int], None] | None = None) -> None:
        if virtual_size <= 0:
            raise ValueError("a qcow2 image needs a virtual size above 0")
        self.fd = fd
        # every write goes up the file except the header's, last, at 0: a stream can take it
        # (vmbk.restore.remote sends the image to another host as it is written)
        self._pwrite = pwrite if pwrite is not None else functools.partial(pwrite_all, fd)
        self.size = virtual_size
        self.opts = options
        self.cs = options.cluster_size
        self.l2_entries = self.cs // 8
        self.l1_size = -(-virtual_size // (self.cs * self.l2_entries))
        self.next = 1  # next free host cluster; 0 is the header
        self.l1 = array("Q", bytes(8 * self.l1_size))
        self.l2: tuple[int, array] | None = None  # (L1 index, table) being filled
        self.last_guest = -1
        self.data_clusters = 0

    def write(self, offset: int, data: memoryview) -> None:
        """Allocate host clusters for guest ``[offset, offset + len(data))`` and write them.

        ``offset`` and the length are multiples of the cluster size, above
        every range written before (so host clusters follow guest order).
        """
        cs = self.cs
        if offset % cs or data.nbytes % cs or not data.nbytes:
            raise ValueError(f"write of {data.nbytes} bytes at {offset} is not whole clusters")
        first, count = offset // cs, data.nbytes // cs
        if first <= self.last_guest or (first + count - 1) * cs >= self.size:
            raise ValueError(f"clusters {first}+{count}: out of order or past the disk's end")
        if self.l2 is not None and self.l2[0] != first // self.l2_entries:
            self._flush_l2()
        host = self.next * cs
        self._pwrite(data, host)
        self.next += count
        self.data_clusters += count
        self.last_guest = first + count - 1
        g, left, h = first, count, host
        while left:
            l1i, l2i = divmod(g, self.l2_entries)
            if self.l2 is not None and self.l2[0] != l1i:
                self._flush_l2()
            if self.l2 is None:
                self.l2 = (l1i, array("Q", bytes(cs)))
            n = min(left, self.l2_entries - l2i)
            self.l2[1][l2i:l2i + n] = array("Q", range(h | COPIED, (h | COPIED) + n * cs, cs))
            g, left, h = g + n, left - n, h + n * cs

    def _flush_l2(self) -> None:
        """Write the L2 table being filled into the next host cluster."""
        assert self.l2 is not None
        l1i, table = self.l2
        pos = self.next * self.cs
        self._pwrite(memoryview(_be(table)), pos)
        self.l1[l1i] = pos | COPIED
        self.next += 1
        self.l2 = None

    def finish(self) -> int:
        """Write the last L2 table, the L1 table, refcounts and header; returns the image size in bytes."""
        cs = self.cs
        if self.l2 is not None:
            self._flush_l2()
        pos = self.next
        l1_offset = pos * cs
        l1_clusters = -(-self.l1_size * 8 // cs)
        pos += l1_clusters
        # refcount blocks cover every cluster, themselves and the table included
        per_block = cs * 8 // (1 << REFCOUNT_ORDER)
        blocks = table_clusters = 0
        while True:
            total = pos + blocks + table_clusters
            need_blocks = -(-total // per_block)
            need_table = -(-need_blocks * 8 // cs)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        blocks_offset = pos * cs
        table_offset = blocks_offset + blocks * cs
        total = pos + blocks + table_clusters
        self._pwrite(memoryview(_be(self.l1)), l1_offset)
        full = b"\x00\x01" * per_block
        for b in range(blocks):
            used = min(per_block, total - b * per_block)
            block = full if used == per_block else full[:2 * used] + bytes(2 * (per_block - used))
            self._pwrite(memoryview(block), blocks_offset + b * cs)
        table = array("Q", bytes(table_clusters * cs))
        for b in range(blocks):
            table[b] = blocks_offset + b * cs
        self._pwrite(memoryview(_be(table)), table_offset)
        self._pwrite(memoryview(self._header(l1_offset, table_offset, table_clusters)), 0)
        return total * cs

    def _header(self, l1_offset: int, table_offset: int, table_clusters: int) -> bytes:
        o = self.opts
        head = HEADER_V2.pack(MAGIC, o.version, 0, 0, o.cluster_bits, self.size, 0, self.l1_size, l1_offset,
                              table_offset, table_clusters, 0, 0)
        if o.version >= 3:
            compatible = LAZY_REFCOUNTS if o.lazy_refcounts else 0
            head += HEADER_V3_EXTRA.pack(0, compatible, 0, REFCOUNT_ORDER, HEADER_V2.size + HEADER_V3_EXTRA.size)
        # the header extensions end with an end marker (type 0, length 0): 8 zero bytes
        return head + bytes(8)
