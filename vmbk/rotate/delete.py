"""Carrying out a retention decision: one directory at a time, crash-safe.

For each removal, in this order (a kill at any instant leaves the
directory whole, or gone from every listing with its catalogue rows
saying so or completed by the next run):

1. the catalogue's rows of the deletion, marked under way
   (`vmbk.rotate.history.History.intent`);
2. the rename to ``.deleting-<name>`` and the fsync of its directory
   (`vmbk.tree.ops.remove_dir`): the commit;
3. the rows marked done (`History.done`);
4. the hidden directory removed, depth first.

`finish` runs first for every VM a non-dry run handles (under its lock):
hidden directories a killed run left are removed and their rows
completed; rows of deletions killed before their rename are marked
abandoned.  `finish_vms` does the same for whole VM directories
(``--prune all``) at the backup root.

``VMBK_TEST_ROTATE_HOOK`` exists for the kill tests only: ``pause:STEP``
or ``pause:STEP:N`` stops for good at a step (``renamed``, ``committed``,
``removing``; the N-th time it comes), ``slow:SECONDS`` sleeps before
each entry removed, so a test can kill the process mid-deletion.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbk.policy.retention import VM, Decision, Removal, TreeFacts
from vmbk.rotate.history import History
from vmbk.tree import ops
from vmbk.tree.ops import Step

HOOK_ENV = "VMBK_TEST_ROTATE_HOOK"


def test_hook(env: Mapping[str, str] | None = None) -> Step | None:
    """The step callback ``VMBK_TEST_ROTATE_HOOK`` asks for (None: none; the normal case)."""
    spec = (os.environ if env is None else env).get(HOOK_ENV)
    if not spec:
        return None
    what, _, rest = spec.partition(":")
    if what == "slow":
        delay = float(rest)

        def slow(step: str) -> None:
            if step == "removing":
                time.sleep(delay)
        return slow
    at, _, nth = rest.partition(":")
    seen = [0]

    def pause(step: str) -> None:
        if step != at:
            return
        seen[0] += 1
        if seen[0] >= int(nth or 1):
            sys.stderr.write(f"vmbk-rotate: test hook: paused at {step}\n")
            sys.stderr.flush()
            while True:
                time.sleep(3600)
    return pause


class Deleter:
    def __init__(self, root: Path, history: History, step: Step | None = None) -> None:
        self.root = root
        self.history = history
        self.step = step

    def apply(self, session: str, facts: TreeFacts, d: Decision, triggered_by: str) -> list[Removal]:
        """Remove what ``d`` says, in its order; the removals done."""
        done: list[Removal] = []
        for r in d.removed:
            path = self.root / d.vm if r.kind == VM else self.root / d.vm / r.rel
            event = self.history.intent(session, d, r, facts, triggered_by)

            def committed(event: int | None = event, r: Removal = r, path: Path = path) -> None:
                self.history.done(event, d.vm, r.rel, path)
                if self.step is not None:
                    self.step("committed")

            if r.kind == VM:
                ops.remove_vm_dir(self.root, d.vm, committed=committed, step=self.step)
            else:
                ops.remove_dir(self.root, d.vm, r.rel, committed=committed, step=self.step)
            done.append(r)
        return done

    def finish(self, session: str, vm: str) -> list[dict[str, Any]]:
        """What killed runs left in ``vm``'s tree: finished now."""
        out = []
        for rel, hidden in ops.leftovers(self.root, vm):
            out.append(self._finish(session, vm, rel, hidden, self.root / vm / rel))
        vm_dir = self.root / vm
        self.history.abandoned(vm, lambda rel: (vm_dir / rel).is_dir())
        return out

    def finish_vms(self, session: str) -> list[dict[str, Any]]:
        """Whole VM directories killed runs left half deleted: finished now."""
        return [self._finish(session, vm, ".", hidden, self.root / vm) for vm, hidden in ops.vm_leftovers(self.root)]

    def _finish(self, session: str, vm: str, rel: str, hidden: Path, path: Path) -> dict[str, Any]:
        self.history.finished(session, vm, rel, path)
        ops.finish(hidden, self.step)
        return {"path": str(path)}
