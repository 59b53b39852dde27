"""The backup tree of a VM, read-only: periods, chains, archives.

``names``: period ids, file names, archive names (pure);
``model``: `DataFile`, `Chain`, `VmTree` (what the planner looks at);
``scan``: `scan_vm`, `scan_chain`, `vm_dirs`, `next_archive_name`, `find_uuid` (reads);
``ops``: `inside`, `cleanup_partials`, `archive_chain` (the writes that are not data);
``points``: the restore points of a chain and what makes one incomplete or
unverifiable -- the one place that decides, for the listing, verify, the
restore, rotate and status -- with ``sidefiles`` (checkpoint and vmconfig
XML, qcow.json: readable, and the virtual sizes).
"""

from vmbk.tree.model import Chain, DataFile, VmTree
from vmbk.tree.names import (
    ARCHIVES,
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    archive_name,
    checkpoint_name,
    checkpoint_number,
    parse_data_name,
    period_id,
    policy_of_period,
)
from vmbk.tree.scan import find_uuid, is_vm_dir, next_archive_name, scan_chain, scan_vm, vm_dirs

__all__ = [
    "ARCHIVES",
    "CHECKPOINTS",
    "CHECKPOINT_PREFIX",
    "Chain",
    "DataFile",
    "VmTree",
    "archive_name",
    "checkpoint_name",
    "checkpoint_number",
    "find_uuid",
    "is_vm_dir",
    "next_archive_name",
    "parse_data_name",
    "period_id",
    "policy_of_period",
    "scan_chain",
    "scan_vm",
    "vm_dirs",
]
