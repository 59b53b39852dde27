"""Orchestration of vmbk-plan: a ``vm`` record in, a ``plan`` record out.

Reads the VM's backup tree (`vmbk.tree`), hands the facts to the pure
planner (`vmbk.policy.decide`) and builds the self-contained ``plan``
record (DESIGN, "The record contract"): it carries the whole ``vm``
record, so ``vmbk-backup`` needs nothing else.  vmbk-backup's standalone
mode (``--vm NAME``) plans through here too.  Never writes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbk import records
from vmbk.config import POLICIES, Config
from vmbk.errors import InputError, VmError
from vmbk.policy import Plan, VmFacts, decide
from vmbk.tree import VmTree, find_uuid, scan_vm
from vmbk.tree.scan import host_root


def plan_vm(rec: Mapping[str, Any], cfg: Config, backup_path: Path, now: _dt.datetime) -> tuple[Plan, VmTree]:
    """The plan of the VM of one ``vm`` record, and the tree it was made on.

    Policy, exclusion and ``memory`` come from the record (discover
    resolved them from the same configuration); a hand-written record
    without them gets the configuration's.
    """
    facts = VmFacts.from_record(rec)
    if facts.name in (".", "..", "_state") or "/" in facts.name or "\0" in facts.name:
        # The name is a directory under the backup root: it must not
        # escape it or land on vmbk's own state directory.
        raise VmError(f"VM name {facts.name!r} cannot be a backup directory name", vm=facts.name)
    policy = facts.policy or cfg.policy_for(facts.name)[0]
    if policy not in POLICIES:
        raise InputError(f"vm record of {facts.name!r}: unknown policy {policy!r}", vm=facts.name)
    if "excluded" not in rec:
        why = cfg.exclusion(facts.name)
        facts = dataclasses.replace(facts, excluded=why is not None, reason=why)
    if "memory" not in rec:
        facts = dataclasses.replace(facts, memory=cfg.memory_mode(facts.name))
    if facts.excluded or policy == "never":
        tree = VmTree.empty(backup_path, facts.name)
    else:
        tree = scan_vm(backup_path, facts.name)
        if tree.last_backup is None and facts.uuid and backup_path.is_dir():  # a host's first backup: no root yet
            tree = dataclasses.replace(tree, renamed_from=find_uuid(backup_path, facts.uuid, exclude=facts.name))
    return decide(facts, tree, policy, cfg.retention, now), tree


def plan_record(rec: Mapping[str, Any], cfg: Config, backup_path: Path, now: _dt.datetime,
                session: str | None) -> records.Record:
    """The ``plan`` record of one ``vm`` record.

    With several hosts configured the VM's tree is under its host's
    directory (``<backup_path>/<host>/<vm>/``, the record's ``host``).
    """
    backup_path = host_root(backup_path, rec.get("host"), layered=cfg.host_level)
    plan, tree = plan_vm(rec, cfg, backup_path, now)
    if plan.error:
        raise VmError(plan.error, vm=plan.name)
    fields = plan.to_dict()
    del fields["error"]
    target = fields["target"]
    fields["target_dir"] = str(tree.path if target == "." else tree.path / target) if target else None
    fields["vm_dir"] = str(tree.path)
    fields["now"] = now.isoformat()
    return records.make("plan", session, **fields, vm=dict(rec))
