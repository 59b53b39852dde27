"""vmbk on a tree vmbackup writes to, on a real domain (issue #14).

vmbackup itself is not run in CI (docs/vmbackup-interop.md runs it by
hand); what it does to the tree is done here with the engine it drives,
Debian's virtnbdbackup, as its log on this host shows it
(``virtnbdbackup -d VM -l full|auto -o <root>/<vm>/<period>``) and with
the marker it writes.  Around New Year 2026/2027:

1. 2027-01-01 "vmbackup": a full in its ``2027-W53`` (``date +%Y-W%V``);
2. 2027-01-02 vmbk: an incremental in ``2027-W53``, not a full in its own
   ``2026-W53``; it writes vmbackup's ``config/`` files there;
3. 2027-01-04 vmbk: a full in ``2027-W01`` with ``.full-backup-month`` and
   ``config/``, so that
4. 2027-01-05 "vmbackup" (``-l auto``, its marker check passing) adds an
   incremental to vmbk's chain.

Every point restores byte-exact against the disk at its instant, the
listing counts no broken chain (the chains mix files with and without
``.chksum``), and the backup root got vmbackup's owner and mode.
"""

from __future__ import annotations

import datetime as dt
import grp
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from backup_helpers import backup_ok, run_restore
from vmbackup_helpers import vmbackup_level

pytestmark = [pytest.mark.libvirt, pytest.mark.guest, pytest.mark.compat]

if not shutil.which("virtnbdbackup"):
    pytest.skip("virtnbdbackup is needed", allow_module_level=True)


def snapshot(disk: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(dest)], check=True)
    return dest


def virtnbdbackup(name: str, level: str, out: Path) -> None:
    r = subprocess.run(["virtnbdbackup", "-d", name, "-l", level, "-o", str(out), "-n"],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


def test_vmbk_and_vmbackup_continue_each_other_s_chains(test_guest, vm_workdir, tmp_path, monkeypatch):
    cfg = tmp_path / "etc"
    cfg.mkdir()
    (cfg / "default.toml").write_text('policy = "weekly"\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(cfg))
    root = vm_workdir / "backups"
    root.mkdir(mode=0o755)
    guest = test_guest()
    disk = guest.disks[0]
    vm_dir = root / guest.name
    refs = []

    def night(label: str, backup) -> object:
        guest.write_file(f"/mnt/vda/{label}", os.urandom(200_000))
        guest.sync()
        guest.dom.suspend()  # the reference is the disk at the backup's instant
        try:
            refs.append(snapshot(disk, tmp_path / f"{label}.raw"))
            return backup()
        finally:
            guest.dom.resume()

    # 1. vmbackup on 2027-01-01: its directory, its marker
    theirs = vm_dir / "2027-W53"
    theirs.mkdir(parents=True)
    night("d1", lambda: virtnbdbackup(guest.name, "full", theirs))
    (theirs / ".full-backup-month").write_text("2027-W53\n")

    # 2. vmbk on 2027-01-02 continues it
    rec = night("d2", lambda: backup_ok(root, guest.name, "--now", "2027-01-02T01:00:00+00:00"))
    assert (rec["action"], rec["period"], rec["checkpoint"]) == ("inc", "2027-W53", "virtnbdbackup.1"), rec["reasons"]
    assert (theirs / ".full-backup-month").read_text() == "2027-W53\n"
    assert (theirs / "config" / f"{guest.name}_config_2027-W53_FIRST.xml").is_file()
    assert not (vm_dir / "2026-W53").exists()

    # 3. vmbk on 2027-01-04: a new week, vmbackup's state files with it
    rec = night("d3", lambda: backup_ok(root, guest.name, "--now", "2027-01-04T01:00:00+00:00"))
    ours = vm_dir / "2027-W01"
    assert (rec["action"], rec["period"]) == ("full", "2027-W01")
    assert (ours / ".full-backup-month").read_text() == "2027-W01\n"
    first = ours / "config" / f"{guest.name}_config_2027-W01_FIRST.xml"
    assert f"<name>{guest.name}</name>" in first.read_text()
    assert first.read_text() == (ours / "config" / f"{guest.name}_config_20270104_010000.xml").read_text()

    # 4. vmbackup on 2027-01-05: its marker check passes, virtnbdbackup -l auto adds to vmbk's chain
    assert vmbackup_level(ours, "weekly", dt.datetime(2027, 1, 5, 1)) == "auto"
    night("d4", lambda: virtnbdbackup(guest.name, "auto", ours))
    assert (ours / "vda.inc.virtnbdbackup.1.data").is_file()

    code, recs = run_restore("--list-restore-points", str(vm_dir))
    assert code == 0
    points = [(r["period"], r["index"], r["complete"]) for r in recs if r["type"] == "restore_point"]
    assert points == [("2027-W53", 0, True), ("2027-W53", 1, True), ("2027-W01", 0, True), ("2027-W01", 1, True)]
    for (period, n), ref in zip([("2027-W53", 0), ("2027-W53", 1), ("2027-W01", 0), ("2027-W01", 1)], refs):
        dest = tmp_path / f"r-{period}-{n}"
        code, recs = run_restore("--vm", str(vm_dir), "--period", period, "--restore-point", str(n),
                                 "--skip-config", "--restore-path", str(dest))
        assert code == 0, recs
        (image,) = dest.glob("*.qcow2")
        assert subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(image), str(ref)]).returncode == 0, \
            (period, n)

    try:
        gid = grp.getgrnam("backup").gr_gid
    except KeyError:
        return
    st = root.stat()
    assert (st.st_gid, st.st_mode & 0o7777) == (gid, 0o2750)
