"""Pure decisions over facts: tonight's backup plan (and, later, retention).

``facts``: `VmFacts` from a ``vm`` record; ``disks``: which disks, how;
``health``: can a chain take an incremental; ``plan``: `decide` -> `Plan`.
"""

from vmbk.policy.disks import DiskChoice, classify
from vmbk.policy.facts import Bitmap, DiskFacts, VmFacts
from vmbk.policy.plan import ACTIONS, COPY, FULL, INC, SKIP, DiskPlan, Plan, PlannedVm, decide

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
