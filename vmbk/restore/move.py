"""The move of an instant recovery: every disk copied under the running VM, then the pivot.

libvirt's block copy (QEMU's ``blockdev-mirror``, sync full) rather than
block pull (``block-stream`` into the overlay):

* the copy is a new file with the name a restore gives it, created by
  libvirt as qcow2 and written thin (the mirror skips what the export's
  ``base:allocation`` reports as zero); a pull would fill the overlay, a
  file named as the temporary it is;
* until the pivot nothing changes for the guest: an error in the copy
  (no space, the export gone) leaves the VM on the overlay and the export
  as before; guest writes made meanwhile go to both sides (the mirror's
  "ready" phase), so the pivot loses nothing;
* after the pivot the disk is one local file without a backing chain; the
  overlay, whose clusters were all copied, is no longer open and goes.

A job that vanishes before its pivot failed (QEMU ends a mirror whose
source cannot be read): `MoveFailed`.  Progress is libvirt's ``cur``/``end``
of each job, on the terminal's progress line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from vmbk.errors import ToolError
from vmbk.progress import Board
from vmbk.virt.connection import LibvirtError, libvirt_module

log = logging.getLogger("vmbk.restore")

POLL = 0.25


class MoveFailed(ToolError):
    """A copy ended before its pivot (the export gone, the target's disk full...)."""


def start(dom: Any, targets: Mapping[str, Path], *, bandwidth: int = 0) -> None:
    """Start a block copy of every disk (target dev -> new qcow2 file); ``bandwidth`` in bytes/s, 0: none."""
    libvirt = libvirt_module()
    params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else None
    for dev, target in targets.items():
        dest = f"<disk type='file'><source file={quoteattr(str(target))}/><driver type='qcow2'/></disk>"
        try:
            dom.blockCopy(dev, dest, params, 0)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot start copying {dev} to {target}: {e.get_error_message()}") from None


def wait_and_pivot(dom: Any, devs: list[str], board: Board | None = None, *, poll: float = POLL) -> None:
    """Wait until every copy has caught up, then pivot each disk to its copy."""
    libvirt = libvirt_module()
    started = time.monotonic()
    left = list(devs)
    while left:
        for dev in list(left):
            info = _info(dom, dev)
            if not info:
                raise MoveFailed(f"the copy of {dev} stopped before it was complete (the export gone, or its "
                                 f"target's file system full?)")
            cur, end = int(info.get("cur", 0)), int(info.get("end", 0))
            if board is not None:
                board.update(f"moving {dev}", cur, end, started)
            if end and cur == end and _pivot(dom, dev, libvirt):
                if board is not None:
                    board.finish(f"moving {dev}")
                left.remove(dev)
        if left:
            time.sleep(poll)


def abort(dom: Any, devs: list[str]) -> None:
    """End the copies without pivoting (the VM stays on its overlays); never raises."""
    libvirt = libvirt_module()
    for dev in devs:
        try:
            if _info(dom, dev):
                dom.blockJobAbort(dev, 0)
        except (libvirt.libvirtError, MoveFailed) as e:
            log.debug("aborting the copy of %s: %s", dev, e)


def _info(dom: Any, dev: str) -> dict[str, Any]:
    libvirt = libvirt_module()
    try:
        return dict(dom.blockJobInfo(dev, 0) or {})
    except libvirt.libvirtError as e:
        raise MoveFailed(f"the copy of {dev}: {e.get_error_message()}") from None


def _pivot(dom: Any, dev: str, libvirt: Any) -> bool:
    """Pivot; False while libvirt says the copy is not ready yet (it has not seen QEMU's READY)."""
    try:
        dom.blockJobAbort(dev, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, libvirt.VIR_ERR_OPERATION_INVALID):
            return False
        raise MoveFailed(f"cannot pivot {dev} to its copy: {e.get_error_message()}") from None
    return True
