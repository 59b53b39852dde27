"""vmbk-restore reads trees that Debian's virtnbdbackup wrote.

The booted test guest is backed up by ``virtnbdbackup`` itself (a full and
two incrementals, online, with checkpoints), into a vmbackup-style period
directory.  Every point is restored by vmbk-restore and compared with what
``virtnbdrestore -u <checkpoint>`` makes of the same chain (its
incrementals carry no zero frames, so the two must agree exactly), and the
checkfile of each round is read out of the restored ext4 with debugfs:
present up to that round, absent after.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from backup_helpers import released

from vmbk.commands.restore import main as restore_main

pytestmark = [pytest.mark.libvirt, pytest.mark.guest, pytest.mark.compat]

if not all(shutil.which(t) for t in ("virtnbdbackup", "virtnbdrestore", "debugfs")):
    pytest.skip("virtnbdbackup, virtnbdrestore and debugfs are needed", allow_module_level=True)


def restore(*argv: str) -> tuple[int, list[dict]]:
    out = io.StringIO()
    code = restore_main(["--json", *argv], io.StringIO(""), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def tool(*argv: str | Path) -> None:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{argv[0]} exited {r.returncode}: {r.stderr[-3000:]}"


def guest_file(image: Path, raw: Path, path: str) -> bytes | None:
    """A file of the ext4 inside ``image``, read with debugfs (None: absent)."""
    if not raw.exists():
        tool("qemu-img", "convert", "-O", "raw", image, raw)
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, check=False)
    if b"File not found" in r.stderr or r.returncode != 0:
        return None
    return r.stdout


def test_virtnbdbackup_chain_restores_point_by_point(test_guest, vm_workdir, tmp_path):
    guest = test_guest()
    chain = vm_workdir / "backups" / guest.name / "202611"
    chain.parent.mkdir(parents=True)
    contents = []
    for n in range(3):
        contents.append(f"virtnbdbackup round {n}\n".encode() * 1000)
        guest.write_file(f"/mnt/vda/check-{n}", contents[-1])
        guest.sync()
        # the default socket (/var/tmp/virtnbdbackup.<pid>): QEMU, not root, binds it
        tool("virtnbdbackup", "-d", guest.name, "-l", "full" if n == 0 else "inc", "-o", chain, "-n")

    code, recs = restore("--list-restore-points", str(chain.parent))
    assert code == 0
    assert [(r["index"], r["kind"], r["complete"]) for r in recs if r["type"] == "restore_point"] == [
        (0, "FULL", True), (1, "Incremental", True), (2, "Incremental", True)]

    for n in range(3):
        dest = tmp_path / f"vmbk-{n}"
        code, recs = restore("--vm", str(chain.parent), "--restore-path", str(dest), "--restore-point", str(n),
                             "--skip-config")
        assert code == 0, recs
        ours = dest / f"{guest.name}.qcow2"
        theirs = tmp_path / f"virtnbdrestore-{n}"
        tool("virtnbdrestore", "-i", chain, "-o", theirs, "-u", f"virtnbdbackup.{n}", "-n",
             "-L", tmp_path / f"vr-{n}.log", "-f", tmp_path / f"vr-{n}.sock")
        (image,) = theirs.glob("*.qcow2")
        assert subprocess.run(["qemu-img", "compare", "-q", str(ours), str(released(image))], check=False).returncode == 0
        raw = tmp_path / f"vmbk-{n}.raw"
        for k in range(3):
            got = guest_file(ours, raw, f"/check-{k}")
            assert got == (contents[k] if k <= n else None), (n, k)
