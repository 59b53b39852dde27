"""``--list``'s health line: from the tree, by the rule of the restore-point
listing; the catalogue adds the last failed attempt."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import orjson
import pytest
from backup_helpers import backup_ok, run_backup

from vmbk.catalogue import db_path
from vmbk.commands.restore import main as restore_main

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def listing(root: Path) -> dict:
    out = io.StringIO()
    code = restore_main(["--json", "--backup-path", str(root), "--list"], io.StringIO(""), out)
    recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0 and len(recs) == 1, recs
    return recs[0]


def test_health_line_counts_active_and_broken_chains(nos_domain, vm_workdir):
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    last = backup_ok(root, nd.name)
    rec = listing(root)
    assert (rec["chains_active"], rec["chains_broken"], rec["broken_chains"]) == (1, 0, [])
    assert rec["catalogue"]["last_outcome"] == "ok"
    assert rec["health"] == f"Chains: 1 active, 0 broken, last backup {rec['last_backup']}"

    Path(last["disks"][0]["path"]).unlink()  # a data file of the chain is gone
    rec = listing(root)
    assert (rec["chains_broken"], rec["broken_chains"]) == (1, [last["period"]])
    assert (rec["incomplete_points"], rec["health"].split(", ")[1]) == (1, "1 broken")

    copy = vm_workdir / "copy"
    root.rename(copy)  # the tree mounted elsewhere
    rec = listing(copy)
    assert (rec["chains_active"], rec["chains_broken"]) == (1, 1)
    db_path(copy).unlink()  # a recovery host with the tree alone: the same health, no history
    rec = listing(copy)
    assert rec["catalogue"] is None and rec["restore_points"] >= 1
    assert rec["health"] == f"Chains: 1 active, 1 broken, last backup {rec['last_backup']}"


def write(nd, pattern: int, offset_mib: int, length: str) -> None:
    """Write into the running domain's vda through QEMU (it has no OS)."""
    import libvirt_qemu

    libvirt_qemu.qemuMonitorCommand(
        nd.dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P {pattern} {offset_mib}M {length}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def chain_records(root: Path, vm: str) -> list[dict]:
    out = io.StringIO()
    code = restore_main(["--json", "--backup-path", str(root), "--list-restore-points", vm], io.StringIO(""), out)
    recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, recs
    return [r for r in recs if r["type"] == "chain" and not r["archived"]]


@pytest.fixture
def small_fs(vm_workdir):
    """A 12 MiB tmpfs: room for a full of a few MiB, not for a 16 MiB incremental."""
    mnt = vm_workdir / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_failed_incremental_cleaned_up_breaks_no_chain(nos_domain, small_fs):
    """The health line agrees with the restore points: an incremental that
    failed (disk full) and left nothing behind does not break the chain
    (the catalogue's "newest attempt failed" called it broken)."""
    nd = nos_domain(1, size="64M", writes=[(0x11, 0, MiB)])
    root = small_fs / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    write(nd, 0x22, 8, "16M")
    code, recs = run_backup(root, "--vm", nd.name)
    assert code == 4 and recs[0]["type"] == "error" and "space" in recs[0]["message"], recs
    assert not list(root.rglob("*.partial"))

    (chain,) = chain_records(root, nd.name)
    assert chain["complete"] and chain["restore_points"] == 1
    rec = listing(root)
    assert rec["health"].startswith("Chains: 1 active, 0 broken, last backup "), rec["health"]
    assert rec["incomplete_points"] == 0
    # the catalogue's history is still told: the newest attempt failed
    assert rec["catalogue"]["last_outcome"] == "failed"
    assert rec["health"].endswith(f"; last attempt {rec['catalogue']['last_attempt']} failed")


def test_an_archived_chain_with_incrementals_leaves_no_broken_chain(nos_domain, vm_workdir, tmp_path, monkeypatch):
    """Archiving moves the chain's files: the period (here the accumulate
    chain in the VM directory) holds a new, complete chain, not a broken one
    (the catalogue's file paths from before the move called it broken)."""
    nd = nos_domain(1, size="64M", writes=[(0x31, 0, MiB)])
    cfg = tmp_path / "etc"
    cfg.mkdir()
    (cfg / "default.toml").write_text(f'[vm."{nd.name}"]\npolicy = "accumulate"\n[retention]\naccumulate_limit = 3\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(cfg))
    root = vm_workdir / "backups"
    root.mkdir()
    for day in range(1, 5):
        write(nd, 0x40 + day, day, "64k")
        rec = backup_ok(root, nd.name, "--now", f"2026-11-{day:02d}T01:30:00+00:00")
    assert rec["action"] == "full" and [e["event"] for e in rec["events"]] == ["archived"]

    (chain,) = chain_records(root, nd.name)
    assert chain["complete"]
    rec = listing(root)
    assert rec["archived_chains"] == 1
    assert rec["health"].startswith("Chains: 1 active, 0 broken, last backup "), rec["health"]
