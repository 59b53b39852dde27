"""``sync_mode = "append-only"``: ssh to a far side that only lets us add files.

The far side runs `vmbk.replicate.receive` as the key's forced command
(rrsync ``-wo -no-del -no-overwrite`` underneath), so this host -- or
whoever has taken it over -- cannot overwrite or delete a file there.
New files go with rsync ``--ignore-existing`` (rrsync refuses
``--partial-dir``/``--delay-updates`` under ``-no-overwrite``; rsync's own
temporary name is what a killed copy leaves).  The two changes a growing
tree needs besides new files are *staged*: a longer ``.cpt``, a new TPM
state, and the renames of a chain the source archived go to
``_state/incoming/<id>/`` with a manifest, and the far side applies them
when that connection ends, after checking that they lose nothing.

The replica cannot be read back through this key: listing, free space and
sha256 sums come from the far side's own answers (``vmbk-receive``); a
pull needs another key (or runs on the far side).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmbk.errors import StorageError, UsageError
from vmbk.replicate import files
from vmbk.replicate.receive import INCOMING, MANIFEST, sha256_file
from vmbk.replicate.ssh import SshTransport
from vmbk.replicate.transport import Batch, Space, ToolFailed, failure
from vmbk.settings import Replication
from vmbk.tree import names


class AppendOnlyTransport(SshTransport):
    readable = False

    def __init__(self, dest: Replication, workdir: Path) -> None:
        super().__init__(dest, workdir, safe_writes=False, ignore_existing=True)

    def _query(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        out = self.remote(f"vmbk-receive {op}", json.dumps(request).encode(), what=f"{op} of {self.where()}")
        try:
            answer = json.loads(out)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise failure(ToolFailed, f"{self.where()} does not answer as 'vmbk-replicate --receive' does: is "
                          "that the forced command of this key on the far side?", None)
        return answer

    def space(self) -> Space:
        a = self._query("space", {})
        return Space(a.get("free"), a.get("total"))

    def listing(self, vms: Sequence[str] | None = None) -> files.Listing:
        a = self._query("list", {"vms": None if vms is None else list(vms)})
        return {str(rel): files.Entry(int(size), float(mtime)) for rel, size, mtime in a.get("files") or []}

    def send(self, src_root: Path, phases: Sequence[Batch]) -> None:
        self.connect()
        for new, updates in phases:
            if new:
                sent = set(self.rsync.push(src_root, sorted(new), what=f"copy to {self.where()}"))
                there = sorted(set(new) - sent)
                if there:
                    raise StorageError(f"{self.where()}: already there in another version, left as it is: "
                                       f"{', '.join(there[:5])}{' ...' if len(there) > 5 else ''}")
            if updates:
                self._stage(src_root, updates, [])

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        if moves:
            self._stage(None, [], moves)

    def _stage(self, src_root: Path | None, updates: Sequence[str], moves: Sequence[tuple[str, str]]) -> None:
        """Send ``updates`` and ``moves`` for the far side to apply (`receive.settle`)."""
        self.connect()
        stage = self.workdir / "stage"
        shutil.rmtree(stage, ignore_errors=True)
        base = f"{INCOMING}/{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        wanted = set(updates)
        if src_root is not None:
            # a TPM state is replaced whole: every file of the tpm-state/ it belongs to
            for rel in updates:
                if files.is_secret(rel):
                    tpm = f"{files.chain_dir(rel)}/{names.TPM_STATE}"
                    wanted |= {r for r in files.walk(src_root, files.vm_of(rel)) if r.startswith(tpm + "/")}
        listed = []
        for rel in sorted(wanted):
            assert src_root is not None
            dst = stage / base / "files" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_root / rel, dst)
            listed.append([rel, dst.stat().st_size])
        manifest = stage / base / MANIFEST
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"moves": [list(m) for m in moves], "updates": listed}))
        rels = [f"{base}/files/{rel}" for rel, _ in listed] + [f"{base}/{MANIFEST}"]
        try:
            self.rsync.push(stage, rels, what=f"staged changes to {self.where()}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def remove(self, rels: Sequence[str], dirs: Sequence[str]) -> None:
        if rels or dirs:
            raise failure(ToolFailed, "an append-only destination never deletes (its pruning runs on the far side)",
                          None)

    def mismatches(self, local_root: Path, rels: Sequence[str]) -> list[str]:
        theirs = self._query("sha256", {"files": list(rels)}).get("sha256") or {}
        return sorted(rel for rel in rels
                      if theirs.get(rel) is None or theirs[rel] != sha256_file(local_root / rel))

    def fetch(self, rels: Sequence[str], local_root: Path) -> None:
        raise UsageError(f"{self.dest.name} is append-only: this host's key cannot read it; restore on the far "
                         "side (vmbk-restore --backup-path there) or pull through a destination with a read key")


__all__ = ["AppendOnlyTransport"]
