"""The nightly pipe, whole: ``discover | plan | backup | rotate | replicate``.

Two VMs, two destinations of which one cannot be reached: vmbk-replicate
passes the backup and rotate records on as they come, replicates both VMs
to the destination that works, says in an ``error`` record per VM which
copy is missing, and exits 9 (partial) -- speaking for the whole run,
since it is the last command of the pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from replicate_helpers import ROOT, configure, only, points

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def test_the_five_stage_pipe_with_one_destination_failing(nos_domain, vm_workdir, replica_dirs, tmp_path):
    vms = [nos_domain(1, size="32M", writes=[(0x11 + i, 0, MiB)]) for i in range(2)]
    names = [nd.name for nd in vms]
    root = vm_workdir / "backups"
    root.mkdir()
    near = replica_dirs / "near"
    near.mkdir()
    cfg = configure(tmp_path / "etc", [
        {"name": "near", "transport": "local", "path": str(near)},
        {"name": "away", "transport": "ssh", "host": "127.0.0.1", "port": 9, "path": "/srv/vmbk"},
    ])
    env = {**os.environ, "VMBK_CONFIG_DIR": str(cfg), "PYTHONPATH": str(ROOT)}
    common = ["--json", "--backup-path", str(root)]
    stages = [["vmbk-discover", "--json", "--vm", ",".join(names)], ["vmbk-plan", *common],
              ["vmbk-backup", *common], ["vmbk-rotate", *common], ["vmbk-replicate", *common]]
    procs: list[subprocess.Popen[bytes]] = []
    prev = None
    for argv in stages:
        p = subprocess.Popen([sys.executable, str(ROOT / "bin" / argv[0]), *argv[1:]], stdin=prev,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        if prev is not None:
            prev.close()
        prev = p.stdout
        procs.append(p)
    out, err = procs[-1].communicate(timeout=300)
    codes = [p.wait(timeout=60) for p in procs[:-1]] + [procs[-1].returncode]
    recs = [orjson.loads(line) for line in out.splitlines()]

    assert codes == [0, 0, 0, 0, 9], (codes, err.decode())
    assert sorted(r["name"] for r in only(recs, "backup") if r["outcome"] == "ok") == sorted(names)
    assert sorted(r["name"] for r in only(recs, "rotate")) == sorted(names)
    assert [(r["vm"], r["destination"], r["outcome"]) for r in only(recs, "replicate")] == [
        (n, "near", "ok") for n in names]
    assert sorted((r["vm"], r["destination"], r["code"]) for r in only(recs, "error")) == [
        (n, "away", 4) for n in sorted(names)]
    assert len({r["session"] for r in recs}) == 1
    assert [r["type"] for r in recs][:4] == ["backup", "rotate", "backup", "rotate"]  # passed on as they came
    for name in names:
        assert [p["complete"] for p in points(near, name)] == [True]
        assert [p["complete"] for p in points(root, name)] == [True]
