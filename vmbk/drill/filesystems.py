"""Are a restore point's partition tables and file systems readable?

The last level a drill can reach for a guest that has no agent and shows
no login prompt (issue #20, check 5): the disks hold a partition table
(MBR or GPT) and partitions whose superblocks name a file system or a
volume vmbk knows (`vmbk.disklabel`, shared with ``vmbk-restore --mount``).
It proves the data is laid out as a disk, not that it mounts.

It reads the point's chain (`vmbk.stream.chainread.ChainImage`), not the
image the drill VM runs from: they hold the same bytes (the image was
built from the chain and checked against its checksums), and the chain
can be read while QEMU holds the image's lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmbk.disklabel import describe
from vmbk.stream.chainread import ChainImage


def probe(disks: dict[str, Sequence[Path]]) -> tuple[bool, str]:
    """Every disk of a point (disk -> its streams, oldest first): (some readable, in words)."""
    words = []
    total = 0
    for disk, sources in sorted(disks.items()):
        with ChainImage(sources) as img:
            text, known = describe(img.pread, img.virtual_size)
        words.append(f"{disk}: {text}")
        total += known
    return total > 0, "; ".join(words)
