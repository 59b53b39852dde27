"""What vmbackup does with the tree, as tests check vmbk against it (issue #14).

Facts from vmbackup 0.5.3 (read, and run by hand: docs/vmbackup-interop.md);
no code of it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def vmbackup_level(chain_dir: Path, default_policy: str, now: dt.datetime) -> str:
    """vmbackup's ``backup_vm`` (0.5.3): ``full`` unless ``.full-backup-month``
    holds ``get_current_month`` (its default policy's period, ``date`` formats);
    an empty marker counts as the current one (its self-heal)."""
    fmt = {"daily": "%Y%m%d", "weekly": "%Y-W%V", "monthly": "%Y%m"}
    current = now.strftime(fmt[default_policy]) if default_policy in fmt else default_policy
    try:
        marker = (chain_dir / ".full-backup-month").read_text().split("\n")[0]
    except FileNotFoundError:
        return "full"
    return "auto" if marker in ("", current) else "full"
