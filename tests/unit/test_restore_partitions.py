"""Partition tables read from a disk's bytes (vmbk.restore.partitions): MBR with logical
partitions, GPT at 512 and 4096-byte sectors, and the tables it must not believe."""

from __future__ import annotations

import struct
import uuid

from vmbk.disklabel import Partition, read_table

MiB = 1 << 20


def reader(disk: bytes | bytearray):
    def read(offset: int, length: int) -> bytes:
        return bytes(disk[offset:offset + length])
    return read


def entry(ptype: int, lba: int, sectors: int, boot: int = 0) -> bytes:
    return struct.pack("<B3sB3sII", boot, b"\0" * 3, ptype, b"\0" * 3, lba, sectors)


def mbr(disk: bytearray, entries: list[bytes], at: int = 0) -> None:
    table = b"".join(entries).ljust(64, b"\0")
    disk[at + 446:at + 510] = table
    disk[at + 510:at + 512] = b"\x55\xaa"


def test_mbr_primary_and_logical_partitions_get_the_kernels_numbers():
    disk = bytearray(64 * MiB)
    ext = 20 * 2048  # the extended partition at 20 MiB
    mbr(disk, [entry(0x83, 2048, 8 * 2048, boot=0x80), bytes(16), entry(0x0F, ext, 40 * 2048),
               entry(0x82, 60 * 2048, 4 * 2048)])
    # two logical partitions: EBR -> data at +1 MiB, next EBR at +10 MiB of the extended partition
    mbr(disk, [entry(0x83, 2048, 4 * 2048), entry(0x05, 10 * 2048, 20 * 2048)], at=ext * 512)
    mbr(disk, [entry(0x07, 2048, 8 * 2048), bytes(16)], at=(ext + 10 * 2048) * 512)
    assert read_table(reader(disk), len(disk)) == ("mbr", [
        Partition(1, MiB, 8 * MiB, "0x83"), Partition(4, 60 * MiB, 4 * MiB, "0x82"),
        Partition(5, 21 * MiB, 4 * MiB, "0x83"), Partition(6, 31 * MiB, 8 * MiB, "0x07")])


def test_gpt_at_512_and_4096_byte_sectors():
    linux = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
    for sector in (512, 4096):
        disk = bytearray(64 * MiB)
        mbr(disk, [entry(0xEE, 1, 0xFFFFFFFF)])
        head = bytearray(92)
        head[:8] = b"EFI PART"
        struct.pack_into("<QII", head, 72, 2, 128, 128)
        disk[sector:sector + 92] = head
        table = 2 * sector
        for i, (first, last) in enumerate([(2048 * 512 // sector, (9 * MiB) // sector - 1), (0, 0),
                                           ((10 * MiB) // sector, (64 * MiB) // sector + 99)]):
            if first or last:
                e = linux.bytes_le + bytes(16) + struct.pack("<QQ", first, last)
                disk[table + i * 128:table + i * 128 + len(e)] = e
        assert read_table(reader(disk), len(disk)) == ("gpt", [
            Partition(1, MiB, 8 * MiB, str(linux)), Partition(3, 10 * MiB, 54 * MiB, str(linux))])  # clipped


def test_what_is_not_a_partition_table():
    disk = bytearray(4 * MiB)
    assert read_table(reader(disk), len(disk)) == (None, [])  # nothing
    disk[3:11] = b"NTFS    "
    disk[510:512] = b"\x55\xaa"
    assert read_table(reader(disk), len(disk)) == (None, [])  # an NTFS boot sector
    disk = bytearray(4 * MiB)
    disk[510:512] = b"\x55\xaa"
    assert read_table(reader(disk), len(disk)) == (None, [])  # a signature and no entry (a FAT boot sector)
    mbr(disk, [entry(0x83, 2048, 100, boot=0x33)])
    assert read_table(reader(disk), len(disk)) == (None, [])  # a boot flag no table has
    mbr(disk, [entry(0xEE, 1, 8191)])
    assert read_table(reader(disk), len(disk)) == (None, [])  # a protective MBR without a GPT


def test_hostile_tables_give_fewer_partitions_never_a_loop_or_a_range_outside_the_disk():
    disk = bytearray(8 * MiB)
    ext = 2048
    mbr(disk, [entry(0x83, 0xFFFFFF00, 100), entry(0x05, ext, 8 * 2048), entry(0x83, 4096, 0xFFFFFFFF)])
    mbr(disk, [entry(0x83, 1, 10), entry(0x05, 2048, 10)], at=ext * 512)
    mbr(disk, [entry(0x83, 1, 10), entry(0x05, 2048, 10)], at=(ext + 2048) * 512)  # the next EBR is itself
    table, parts = read_table(reader(disk), len(disk))
    assert table == "mbr"
    assert parts == [Partition(3, 2 * MiB, 6 * MiB, "0x83"), Partition(5, MiB + 512, 10 * 512, "0x83"),
                     Partition(6, 2 * MiB + 512, 10 * 512, "0x83")]
    assert all(p.start + p.size <= len(disk) for p in parts)
