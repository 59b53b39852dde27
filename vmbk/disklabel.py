"""A disk's partitions and file systems, read from its bytes: MBR (logical
partitions too), GPT, and the superblock signatures of the file systems
and volumes vmbk names.

Two readers: ``vmbk-restore --mount`` (`read_table`) gives each partition a read-only loop device of its own
(``losetup --offset --sizelimit``) instead of asking the kernel to scan
the table (``losetup --partscan``, kpartx): kernels built without
MSDOS/EFI partition support (minimal VMs -- this test host's), and
containers whose ``/dev`` never shows the partition nodes, have loop
devices all the same.  Numbers are the kernel's: MBR slots 1-4, logical
partitions from 5 in chain order, GPT entries by index.

vmbk-drill (`describe`) proves, for a guest that shows nothing else,
that a restored disk is laid out as a disk: a table whose partitions
hold file systems it knows.  It proves the layout, not that they mount.

Pure: ``read(offset, length)`` in, partitions out; every offset and size
is checked against the disk before it is used, and the chains of EBRs
and the GPT entry array are bounded, so a damaged or hostile table yields
fewer partitions, never a loop or an out-of-range device.  512-byte
sectors, and 4096 for a GPT that is not at 512.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

Read = Callable[[int, int], bytes]

SECTOR = 512
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MBR_PROTECTIVE = 0xEE
MAX_LOGICAL = 128
MAX_GPT_ENTRIES = 1024
_ENTRY = struct.Struct("<B3sB3sII")  # boot flag, CHS start, type, CHS end, first LBA, sectors


@dataclasses.dataclass(frozen=True)
class Partition:
    number: int
    start: int
    size: int
    #: MBR type byte (``0x83``) or GPT type GUID (lower case).
    type: str


def read_table(read: Read, disk_size: int) -> tuple[str | None, list[Partition]]:
    """(``mbr``, ``gpt`` or None, the partitions in number order)."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None, []
    entries = [_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == MBR_PROTECTIVE for e in entries):
        for sector in (SECTOR, 4096):
            parts = _gpt(read, disk_size, sector)
            if parts is not None:
                return "gpt", parts
        return None, []
    if any(e[0] not in (0, 0x80) for e in entries) or mbr[3:11] in (b"NTFS    ", b"EXFAT   ", b"-FVE-FS-"):
        return None, []  # a file system's boot sector, not a table
    out: list[Partition] = []
    for slot, (_, _, ptype, _, lba, count) in enumerate(entries, 1):
        if not ptype or not count:
            continue
        if ptype in MBR_EXTENDED:
            out += _logical(read, disk_size, lba * SECTOR, count * SECTOR)
        else:
            part = _inside(slot, lba * SECTOR, count * SECTOR, f"{ptype:#04x}", disk_size)
            out += [part] if part else []
    if not out and not any(e[2] for e in entries):
        return None, []  # 55 aa but no entry: a boot sector (a FAT file system has one)
    return "mbr", sorted(out, key=lambda p: p.number)


def _inside(number: int, start: int, size: int, ptype: str, disk_size: int) -> Partition | None:
    if start <= 0 or start >= disk_size:
        return None
    return Partition(number, start, min(size, disk_size - start), ptype)


def _logical(read: Read, disk_size: int, ext_start: int, ext_size: int) -> list[Partition]:
    """The chain of EBRs of an extended partition: logical partitions 5, 6, ..."""
    out: list[Partition] = []
    ebr = ext_start
    seen: set[int] = set()
    while len(out) < MAX_LOGICAL and ebr not in seen and ext_start <= ebr < min(ext_start + ext_size, disk_size):
        seen.add(ebr)
        sector = read(ebr, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
            break
        _, _, ptype, _, lba, count = _ENTRY.unpack_from(sector, 446)
        if ptype and count:
            part = _inside(5 + len(out), ebr + lba * SECTOR, count * SECTOR, f"{ptype:#04x}", disk_size)
            if part is not None:
                out.append(part)
        _, _, ntype, _, nlba, _ = _ENTRY.unpack_from(sector, 462)
        if ntype not in MBR_EXTENDED or not nlba:
            break
        ebr = ext_start + nlba * SECTOR
    return out


def _gpt(read: Read, disk_size: int, sector: int) -> list[Partition] | None:
    head = read(sector, 92)
    if len(head) < 92 or head[:8] != b"EFI PART":
        return None
    lba, count, esize = struct.unpack_from("<QII", head, 72)
    if not 128 <= esize <= 4096 or esize % 8 or lba * sector >= disk_size:
        return None
    count = min(count, MAX_GPT_ENTRIES)
    table = read(lba * sector, count * esize)
    out = []
    for i in range(len(table) // esize):
        e = table[i * esize:(i + 1) * esize]
        if not any(e[:16]):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last < first:
            continue
        part = _inside(i + 1, first * sector, (last - first + 1) * sector, _guid(e[:16]), disk_size)
        if part is not None:
            out.append(part)
    return out


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


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


def fs_type(read: Read, start: int) -> str | None:
    """The file system or volume whose signature lies at ``start`` (None: none known)."""
    for off, magic, name in SIGNATURES:
        if read(start + off, len(magic)) == magic:
            return name
    return None


def describe(read: Read, disk_size: int) -> tuple[str, int]:
    """One disk in words (``gpt: 1 vfat, 2 ext4``) and how many file systems or volumes were recognised."""
    table, parts = read_table(read, disk_size)
    if table is None:
        whole = fs_type(read, 0)
        return (whole, 1) if whole else ("no partition table, no file system", 0)
    found = [(p.number, fs_type(read, p.start)) for p in parts]
    known = sum(1 for _, fs in found if fs)
    words = ", ".join(f"{n} {fs or 'unknown'}" for n, fs in found) or "no partitions"
    return f"{table}: {words}", known
