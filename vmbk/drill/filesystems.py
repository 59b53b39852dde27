"""Are a restore point's partition tables and file systems readable?

The last level a drill can reach for a guest that has no agent and shows
no login prompt (issue #20, check 5): the disks hold a partition table
(MBR or GPT) and partitions whose superblocks name a file system or a
volume vmbk knows (ext2/3/4, XFS, Btrfs, NTFS, FAT, exFAT, swap, LVM,
LUKS, BitLocker, ISO 9660).  It proves the data is laid out as a disk,
not that it mounts.

It reads the point's chain (`vmbk.stream.chainread.ChainImage`), not the
image the drill VM runs from: they hold the same bytes (the image was
built from the chain and checked against its checksums), and the chain
can be read while QEMU holds the image's lock.  512-byte sectors.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from vmbk.stream.chainread import ChainImage

SECTOR = 512
Read = Callable[[int, int], bytes]

#: (offset in the partition, bytes, name): the first that matches names it.
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (1024 + 56, b"\x53\xef", "ext4"),
    (0, b"XFSB", "xfs"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (3, b"NTFS    ", "ntfs"),
    (3, b"EXFAT   ", "exfat"),
    (3, b"-FVE-FS-", "bitlocker"),
    (82, b"FAT32   ", "vfat"),
    (54, b"FAT1", "vfat"),
    (4086, b"SWAPSPACE2", "swap"),
    (512 + 24, b"LVM2 001", "lvm"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x8001, b"CD001", "iso9660"),
)
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MBR_PROTECTIVE = 0xEE


def chain_reader(img: ChainImage) -> Read:
    """``read(offset, length)`` over the merged chain: data where a stream has it, zeroes elsewhere."""
    segs = img.segments
    starts = [s.offset for s in segs]

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, img.virtual_size - offset))
        out = bytearray(length)
        view = memoryview(out)
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        while i < len(segs) and segs[i].offset < offset + length:
            s = segs[i]
            a, b = max(s.offset, offset), min(s.end, offset + length)
            if a < b:
                img.read_into(s, a, view[a - offset:b - offset])
            i += 1
        return bytes(out)

    return read


def fs_type(read: Read, start: int) -> str | None:
    for off, magic, name in SIGNATURES:
        if read(start + off, len(magic)) == magic:
            return name
    return None


def partitions(read: Read) -> tuple[str | None, list[int]]:
    """(``gpt``, ``mbr`` or None, the byte offsets of the partitions)."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None, []
    entries = [mbr[446 + 16 * i:462 + 16 * i] for i in range(4)]
    if any(e[4] == MBR_PROTECTIVE for e in entries):
        return _gpt(read)
    if mbr[82:90] == b"FAT32   " or mbr[54:58] == b"FAT1" or mbr[3:11] == b"NTFS    ":
        return None, []  # a file system's boot sector, not a table
    starts = [struct.unpack_from("<I", e, 8)[0] * SECTOR for e in entries if e[4] and e[4] not in MBR_EXTENDED]
    return "mbr", [s for s in starts if s > 0]


def _gpt(read: Read) -> tuple[str | None, list[int]]:
    head = read(SECTOR, 92)
    if head[:8] != b"EFI PART":
        return None, []
    lba, count, size = struct.unpack_from("<QII", head, 72)
    if not 0 < size <= 4096 or count > 1024:
        return None, []
    table = read(lba * SECTOR, count * size)
    out = []
    for i in range(count):
        e = table[i * size:(i + 1) * size]
        if len(e) >= 48 and any(e[:16]):
            out.append(struct.unpack_from("<Q", e, 32)[0] * SECTOR)
    return "gpt", out


def probe_disk(read: Read) -> tuple[str, int]:
    """One disk in words (``gpt: 1 vfat, 2 ext4``) and how many file systems or volumes were recognised."""
    table, starts = partitions(read)
    if table is None:
        whole = fs_type(read, 0)
        return (whole, 1) if whole else ("no partition table, no file system", 0)
    found = [(n, fs_type(read, s)) for n, s in enumerate(starts, 1)]
    known = sum(1 for _, fs in found if fs)
    parts = ", ".join(f"{n} {fs or 'unknown'}" for n, fs in found) or "no partitions"
    return f"{table}: {parts}", known


def probe(disks: dict[str, Sequence[Path]]) -> tuple[bool, str]:
    """Every disk of a point (disk -> its streams, oldest first): (some readable, in words)."""
    words = []
    total = 0
    for disk, sources in sorted(disks.items()):
        with ChainImage(sources) as img:
            text, known = probe_disk(chain_reader(img))
        words.append(f"{disk}: {text}")
        total += known
    return total > 0, "; ".join(words)
