"""Pure decisions over facts: tonight's backup plan, and retention.

``facts``: `VmFacts` from a ``vm`` record; ``disks``: which disks, how;
``health``: can a chain take an incremental; ``backup``: `decide` ->
`Plan` (and `PlannedVm`, a ``plan`` record typed); ``retention``: what
vmbk-rotate keeps and removes.
"""

from vmbk.policy.backup import ACTIONS, COPY, FULL, INC, SKIP, DiskPlan, Plan, PlannedVm, decide
from vmbk.policy.disks import DiskChoice, classify
from vmbk.policy.facts import Bitmap, DiskFacts, VmFacts

__all__ = [
    "ACTIONS",
    "COPY",
    "FULL",
    "INC",
    "SKIP",
    "Bitmap",
    "DiskChoice",
    "DiskFacts",
    "DiskPlan",
    "Plan",
    "PlannedVm",
    "VmFacts",
    "classify",
    "decide",
]
