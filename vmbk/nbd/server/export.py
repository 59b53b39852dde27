"""What the server serves: a name, a size, and a reader per connection.

The server knows nothing of streams or chains.  `Handle` is the face it
needs of an image -- which ranges hold data, and the bytes of any range
-- and `vmbk.stream.chainread.ChainImage` has it (`ChainImage.extents`,
`ChainImage.pread_into`), so `vmbk.restore.serve` hands the server chain
images without an adapter.  Each connection opens its own handle: a
reader keeps caches (the last lz4 piece) and is driven by one thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol


class Handle(Protocol):
    """One connection's reader of an export's bytes."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``[offset, offset + length)`` as ``(start, length, data)`` runs in
        order; a run that is not ``data`` reads as zero."""
        ...

    def pread_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes from ``offset`` (the range lies inside the export)."""
        ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Export:
    """A read-only export: ``open`` is called once per connection that selects it."""

    name: str
    size: int
    open: Callable[[], Handle]
    #: Shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION (``nbdinfo --list``).
    description: str = ""
