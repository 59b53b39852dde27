"""The proof of vmbk-backup: a week of rounds on the booted test guest.

Weekly policy, days steered with --now: Mon full, Tue inc, Wed offline
copy (the Mon/Tue chain archived), Thu online again (the copy archived,
a new full), next Mon a full in a new week directory.  After each round a
reference of the disk is taken at the backup's instant; at the end every
restore point — archived ones included — is rebuilt from the tree and
compared byte for byte with its reference.  Also: accumulate, whose chain
lives in the VM directory and is archived at its limit.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest
from backup_helpers import backup_ok, chain_files

from vmbk.stream import reconstruct_raw

pytestmark = pytest.mark.libvirt

MiB = 1 << 20


def snapshot(disk: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(dest)], check=True)
    return dest


def restores_to(files: list[Path], ref: Path, tmp: Path) -> bool:
    raw = tmp / "restored.raw"
    raw.unlink(missing_ok=True)
    reconstruct_raw(files, raw)
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(raw), str(ref)]).returncode == 0


@pytest.mark.guest
def test_a_week_of_weekly_backups_restores_at_every_point(test_guest, vm_workdir, tmp_path, monkeypatch):
    cfg = tmp_path / "etc"
    cfg.mkdir()
    (cfg / "default.toml").write_text('policy = "weekly"\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(cfg))
    root = vm_workdir / "backups"
    root.mkdir()
    guest = test_guest()
    disk = guest.disks[0]
    refs: dict[str, Path] = {}

    def online_round(day: str, now: str) -> dict:
        guest.write_file(f"/mnt/vda/{day}", os.urandom(300_000))
        guest.sync()
        guest.dom.suspend()  # the reference is the disk at the backup's instant
        try:
            refs[day] = snapshot(disk, tmp_path / f"{day}.raw")
            return backup_ok(root, guest.name, "--now", now)
        finally:
            guest.dom.resume()

    mon = online_round("mon", "2026-11-16T01:30:00+00:00")
    assert (mon["action"], mon["period"], mon["checkpoint"]) == ("full", "2026-W47", "virtnbdbackup.0")
    tue = online_round("tue", "2026-11-17T01:30:00+00:00")
    assert (tue["action"], tue["checkpoint"]) == ("inc", "virtnbdbackup.1")

    guest.write_file("/mnt/vda/wed", os.urandom(300_000))
    guest.shutdown()
    refs["wed"] = snapshot(disk, tmp_path / "wed.raw")
    wed = backup_ok(root, guest.name, "--now", "2026-11-18T01:30:00+00:00")
    assert wed["action"] == "copy" and wed["consistency"] == "offline"
    assert [e["event"] for e in wed["events"]] == ["archived"]

    guest.dom.create()
    guest.wait_agent(120)
    thu = online_round("thu", "2026-11-19T01:30:00+00:00")
    assert (thu["action"], thu["checkpoint"]) == ("full", "virtnbdbackup.0")
    assert [e["event"] for e in thu["events"]] == ["archived"]

    nxt = online_round("next-mon", "2026-11-23T01:30:00+00:00")
    assert (nxt["action"], nxt["period"]) == ("full", "2026-W48")

    w47 = root / guest.name / "2026-W47"
    archives = sorted((w47 / ".archives").iterdir())
    assert [a.name for a in archives] == ["chain-2026-11-18", "chain-2026-11-19"]
    monday_chain, copy_chain = archives
    assert restores_to(chain_files(monday_chain, 0), refs["mon"], tmp_path), "Mon (archived full)"
    assert restores_to(chain_files(monday_chain, 1), refs["tue"], tmp_path), "Tue (archived inc)"
    assert restores_to(chain_files(copy_chain), refs["wed"], tmp_path), "Wed (archived copy)"
    assert restores_to(chain_files(w47), refs["thu"], tmp_path), "Thu (current W47 full)"
    assert restores_to(chain_files(root / guest.name / "2026-W48"), refs["next-mon"], tmp_path), "next Mon (W48)"

    # the same through vmbk-restore: the archived chain listed inline, and restored by its path
    code, recs = restore("--backup-path", str(root), "--list-restore-points", guest.name, "--period", "2026-W47")
    assert code == 0 and [r["chain"] for r in recs if r["type"] == "chain"] == [
        "2026-W47", "2026-W47/.archives/chain-2026-11-18", "2026-W47/.archives/chain-2026-11-19"], recs
    out = tmp_path / "tue"
    code, recs = restore("--vm", str(monday_chain), "--restore-point", "1", "--restore-path", str(out),
                         "--skip-config")
    assert code == 0 and recs[-1]["chain"] == "2026-W47/.archives/chain-2026-11-18", recs
    image = Path(recs[-1]["files"][0])
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image),
                           str(refs["tue"])]).returncode == 0


def restore(*argv: str) -> tuple[int, list[dict]]:
    import io

    from vmbk.commands.restore import main

    out = io.StringIO()
    code = main(["--json", *argv], io.StringIO(""), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_accumulate_grows_one_chain_and_archives_it_at_the_limit(nos_domain, vm_workdir, tmp_path, monkeypatch):
    import libvirt_qemu

    nd = nos_domain(1, size="64M", writes=[(0x31, 0, MiB)])
    cfg = tmp_path / "etc"
    cfg.mkdir()
    (cfg / "default.toml").write_text(f'[vm."{nd.name}"]\npolicy = "accumulate"\n[retention]\naccumulate_limit = 3\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(cfg))
    root = vm_workdir / "backups"
    root.mkdir()
    actions = []
    for day in range(1, 6):
        libvirt_qemu.qemuMonitorCommand(
            nd.dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x4{day} {day}M 64k"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        rec = backup_ok(root, nd.name, "--now", f"2026-11-{day:02d}T01:30:00+00:00")
        actions.append((rec["action"], rec["checkpoint"], bool(rec["events"])))
        assert Path(rec["target_dir"]) == root / nd.name  # accumulate: the VM directory itself
    assert actions[0] == ("full", "virtnbdbackup.0", False)
    assert [a[0] for a in actions[1:3]] == ["inc", "inc"]
    assert actions[3][0] == "full" and actions[3][2]  # limit reached: archived, new chain
    assert actions[4][0] == "inc"
    archives = list((root / nd.name / ".archives").iterdir())
    assert len(archives) == 1 and (archives[0] / "vda.full.data").exists()
    assert len(orjson.loads(next(archives[0].glob("*.cpt")).read_bytes())) == 3
