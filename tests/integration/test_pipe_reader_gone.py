"""A backup never depends on its downstream reader (DESIGN, the second wave).

Real processes on real pipes: the reader of vmbk-backup's output goes away
after the first record -- the next VMs are still backed up, stderr names
what was not delivered, the exit status is 1 (vmbk-json(7), "When standard
output closes").  A restore does the same; the stages that only read stop
quietly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from backup_helpers import ROOT, backup_ok, run_restore

from vmbk.catalogue import Catalogue
from vmbk.errors import Exit

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def command(name: str, *argv: str, config_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMBK_CONFIG_DIR": str(config_dir)}
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / name), "--json", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def finish(p: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        err = p.stderr.read().decode() if p.stderr else ""
        return p.wait(300), err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def same(image: Path, source: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-U", str(image), str(source)]).returncode == 0


def test_backup_goes_on_for_every_vm_when_its_reader_goes(nos_domain, vm_workdir, tmp_path):
    vms = [nos_domain(1, size="64M", writes=[(0x61 + i, i, MiB)]) for i in range(3)]
    root = vm_workdir / "b"
    root.mkdir()
    p = command("vmbk-backup", "--backup-path", str(root), "--vm", ",".join(v.name for v in vms),
                config_dir=tmp_path)
    first = orjson.loads(p.stdout.readline())
    p.stdout.close()  # the next stage died after one record
    code, err = finish(p)

    assert (first["type"], first["name"], first["outcome"]) == ("backup", vms[0].name, "ok")
    for v in vms[1:]:  # backed up all the same, and they restore
        restored, recs = run_restore("--backup-path", str(root), "--vm", v.name, "--restore-path",
                                     str(tmp_path / v.name), "--skip-config")
        assert restored == 0, recs
        assert same(Path(recs[-1]["files"][0]), v.disks[0])
    assert code == Exit.GENERAL, err
    lost = err.splitlines()[-1]
    assert lost == (f"vmbk-backup: 2 record(s) not delivered, standard output was closed: "
                    f"backup of {vms[1].name!r}, backup of {vms[2].name!r}"), err
    with Catalogue.open(root) as cat:
        assert [r["exit_code"] for r in cat.query("SELECT exit_code FROM sessions")] == [Exit.GENERAL]
        assert sorted(r["vm"] for r in cat.query("SELECT vm FROM vm_backups WHERE outcome = 'ok'")) == \
            sorted(v.name for v in vms)


def test_a_restore_goes_on_without_its_reader(nos_domain, vm_workdir, tmp_path):
    nd = nos_domain(1, size="64M", writes=[(0x71, 0, MiB)])
    root = vm_workdir / "b"
    root.mkdir()
    backup_ok(root, nd.name)
    out = tmp_path / "restored"
    p = command("vmbk-restore", "--backup-path", str(root), "--vm", nd.name, "--restore-path", str(out),
                "--skip-config", config_dir=tmp_path)
    p.stdout.close()  # nobody reads
    code, err = finish(p)
    assert code == Exit.GENERAL, err
    assert err.splitlines()[-1].startswith("vmbk-restore: 2 record(s) not delivered, standard output was closed: "
                                           f"restore_disk of {nd.name!r}, restore of "), err
    (image,) = out.iterdir()
    assert same(image, nd.disks[0])


@pytest.mark.parametrize("cmd, argv", [
    ("vmbk-discover", ["--vm", "{vm}"]),
    ("vmbk-status", ["--backup-path", "{root}"]),
    ("vmbk-restore", ["--backup-path", "{root}", "--list"]),
    ("vmbk-restore", ["--backup-path", "{root}", "--list-restore-points", "{vm}"]),
    ("vmbk-restore", ["--backup-path", "{root}", "--verify", "{vm}"]),
    ("vmbk-restore", ["--backup-path", "{root}", "--vm", "{vm}", "--restore-path", "{out}", "--dry-run"]),
    ("vmbk-backup", ["--backup-path", "{root}", "--vm", "{vm}", "--dry-run"]),
])
def test_a_stage_that_only_reads_stops_quietly_without_its_reader(nos_domain, vm_workdir, tmp_path, cmd, argv):
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "b"
    root.mkdir()
    backup_ok(root, nd.name)
    argv = [a.format(vm=nd.name, root=root, out=tmp_path / "out") for a in argv]
    p = command(cmd, *argv, config_dir=tmp_path)
    p.stdout.close()
    assert finish(p) == (0, "")
    assert not (tmp_path / "out").exists()
