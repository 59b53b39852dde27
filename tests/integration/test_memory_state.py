"""Memory and device state (issue #18) on the booted test guest.

The guest counts in RAM (/run/counter, +1 every 0.2 s from boot: the
initramfs root, never on a disk).  A backup with --with-memory saves the
RAM and device state at the disks' point in time; the guest runs on
(its counter advances); a disaster recovery with --resume brings back a
guest that answers with the same boot id, whose counter continues from
the value it had at the backup instant, with that point's checkfile on
its disk.  Beside it: the state manifest refused when it does not fit the
XML or the host (nothing defined), single use, a device that cannot be
saved (disks backed up, error record), kill -9 during the save (the guard
resumes the VM), virtnbdrestore restoring the disks of such a point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from backup_helpers import released, run_backup, run_restore
from contract_doc import undocumented

from vmbk.tree import names
from vmbk.tree import state as tree_state

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]


def counter(guest) -> int:
    return int(guest.read_file("/run/counter").decode().strip())


def boot_id(guest) -> str:
    return guest.read_file("/proc/sys/kernel/random/boot_id").decode().strip()


def memory_backup(root: Path, name: str, *argv: str) -> tuple[int, list[dict]]:
    return run_backup(root, "--vm", name, "--with-memory", *argv)


def only_state(chain: Path) -> tuple[Path, Path]:
    (state,) = chain.glob("vmstate.*.lz4")
    (manifest,) = chain.glob("vmstate.*.json")
    return state, manifest


def test_backup_with_memory_writes_the_state_and_its_manifest(test_guest, vm_workdir):
    guest = test_guest()
    root = vm_workdir / "backups"
    root.mkdir()
    before = counter(guest)
    code, recs = memory_backup(root, guest.name)
    assert code == 0, recs
    (rec,) = recs
    mem = rec["memory"]
    assert mem["saved"] and mem["error"] is None, mem
    assert 0 < mem["pause_seconds"] < 30 and mem["size"] > 0 and mem["image_size"] > mem["size"]
    assert rec["consistency"] == "paused"
    chain = Path(rec["disks"][0]["path"]).parent
    state, manifest = only_state(chain)
    assert state.name == names.state_name("virtnbdbackup.0")
    assert (state.stat().st_mode & 0o777) == 0o600
    m = tree_state.read(manifest)
    assert m.checkpoint == "virtnbdbackup.0" and m.size == state.stat().st_size
    assert m.domain["memory_kib"] == 256 * 1024 and m.domain["vcpus"] == 1
    assert m.host["arch"] == "x86_64" and m.host["page_size"] == 4096
    assert any(d.startswith("disk disk vda bus=virtio") for d in m.domain["devices"])
    agent = guest.wait_agent(timeout=60)  # QEMU was started again: the agent's channel reconnects
    assert counter(guest) >= before  # it runs on
    print(f"pause {mem['pause_seconds']} s (save {mem['save_seconds']} s), "
          f"image {mem['image_size']} bytes, stored {mem['size']} bytes; agent back {agent:.1f} s later")


def _vm_running(conn, name: str) -> bool:
    try:
        return bool(conn.lookupByName(name).isActive())
    except libvirt.libvirtError:
        return False


def test_dr_with_resume_continues_the_guest_from_the_backup_instant(test_guest, vm_workdir, libvirt_conn):
    """Back up with memory, let the guest run on, DR with --resume: the same boot, the counter from then."""
    from guest.agent import Guest

    guest = test_guest()
    name = guest.name
    root = vm_workdir / "backups"
    root.mkdir()
    check = os.urandom(100_000) + f"point 0 of {name}\n".encode()
    guest.write_file("/mnt/vda/check-0", check)
    guest.sync()
    while counter(guest) < 25:  # some seconds of counting: the value at the backup instant tells
        time.sleep(0.5)
    boot = boot_id(guest)
    c0 = counter(guest)
    code, recs = memory_backup(root, name)
    guest.wait_agent(timeout=60)
    c1 = counter(guest)
    assert code == 0 and recs[0]["memory"]["saved"], recs
    seen = list(recs)
    guest.write_file("/mnt/vda/after-backup", b"written after the backup\n")
    guest.sync()
    time.sleep(8)
    live = counter(guest)
    assert live > c1 + 20  # it ran on
    guest.dom.destroy()

    code, recs = list_points(root, name)
    assert code == 0 and [p["resumable"] for p in recs if p["type"] == "restore_point"] == [True]
    seen += recs

    dest = vm_workdir / "dr"
    t0 = time.monotonic()
    code, recs = run_restore("--backup-path", str(root), "--vm", name, "--restore-path", str(dest), "--resume",
                             "--force")
    assert code == 0, [r.get("message") for r in recs]
    seen += recs
    assert undocumented(seen) == {}  # every field in vmbk-json(7)
    summary = recs[-1]
    assert summary["type"] == "restore" and summary["mode"] == "dr"
    resumed = summary["resumed"]
    assert resumed["running"] and resumed["image_size"] > 0
    dom = libvirt_conn.lookupByName(name)
    assert dom.isActive() and str(dest) in dom.XMLDesc(0)
    back = Guest(dom)
    back.wait_agent(timeout=60)
    c2 = counter(back)
    elapsed = time.monotonic() - t0
    print(f"counter: {c0} before the backup, {c1} after it, {live} when destroyed, {c2} resumed "
          f"({elapsed:.1f} s after the restore began); resume {resumed['resume_seconds']} s, "
          f"unpack {resumed['unpack_seconds']} s")
    assert boot_id(back) == boot  # not booted: resumed
    assert c0 <= c2 < live, (c0, c1, live, c2)
    assert c2 <= c1 + elapsed / 0.2 + 10  # from the backup instant, not from where it was destroyed
    assert back.read_file("/mnt/vda/check-0") == check  # the disk checkfile of that point
    with pytest.raises(Exception):
        back.read_file("/mnt/vda/after-backup")

    # single use: the state was resumed on these disks; the guest ran on them
    dom.destroy()
    code, recs = run_restore("--backup-path", str(root), "--vm", name, "--restore-path", str(dest), "--resume")
    assert code == 5 and recs[-1]["type"] == "error" and recs[-1]["kind"] == "state", recs
    assert "resumed on these disks" in recs[-1]["message"]
    assert not libvirt_conn.lookupByName(name).isActive()
    assert not list(dest.glob(".*vmstate*"))


def list_points(root: Path, name: str) -> tuple[int, list[dict]]:
    return run_restore("--backup-path", str(root), "--list-restore-points", name)


IVSHMEM = ("<shmem name='vmbk-test-ivshmem'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>")


def test_a_device_that_cannot_be_saved_refuses_the_state_not_the_backup(test_guest, vm_workdir):
    guest = test_guest(extra_devices=IVSHMEM)
    root = vm_workdir / "backups"
    root.mkdir()
    code, recs = memory_backup(root, guest.name)
    assert code == 9, recs  # the disks: done; the state: failed
    assert undocumented(recs) == {}
    backup, error = recs
    assert backup["type"] == "backup" and backup["outcome"] == "ok" and backup["consistency"] == "frozen"
    assert backup["memory"]["saved"] is False and backup["memory"]["pause_seconds"] is None
    assert error["type"] == "error" and error["kind"] == "state" and error["code"] == 5
    assert "shmem vmbk-test-ivshmem" in error["message"], error["message"]
    chain = Path(backup["disks"][0]["path"]).parent
    assert not list(chain.glob("vmstate.*"))
    code, points = list_points(root, guest.name)
    assert [(p["complete"], p["resumable"], p["state"]) for p in points if p["type"] == "restore_point"] == [
        (True, False, None)]
    dest = vm_workdir / "disks"
    code, recs = run_restore("--backup-path", str(root), "--vm", guest.name, "--restore-path", str(dest),
                             "--skip-config")
    assert code == 0, recs
    r = subprocess.run(["qemu-img", "check", "-q", str(dest / f"{guest.name}.qcow2")], check=False)
    assert r.returncode == 0


def test_kill_9_during_the_save_the_guard_resumes_the_vm(test_guest, vm_workdir, tmp_path):
    """Killed while libvirt writes the state: the guard aborts the save and resumes the VM."""
    from kill_helpers import RUN_DIR, domain_state, marker_of, spawn_backup, wait_no_job, wait_released

    guest = test_guest(memory_mib=512)
    guest.sh("dd if=/dev/urandom of=/run/fill bs=1048576 count=200 2>/dev/null", timeout=120)  # a longer save
    root = vm_workdir / "backups"
    root.mkdir()
    aborted = 0
    for i in range(3):
        before = set(RUN_DIR.glob("backup-*/memory.spool"))
        p = spawn_backup(root, guest.name, tmp_path / f"run{i}", "--with-memory")
        deadline = time.monotonic() + 120
        while p.poll() is None and not set(RUN_DIR.glob("backup-*/memory.spool")) - before:
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        assert p.poll() is None, "the backup ended before the state save began"
        p.kill()
        p.wait()
        seconds = wait_released(guest.dom, timeout=60)  # the guard: abort the save, resume
        aborted += "aborted the memory state save" in (tmp_path / f"run{i}.err").read_text()
        assert domain_state(guest.dom) == "running"
        wait_no_job(guest.dom, timeout=30)
        assert not marker_of(guest.dom).exists()
        print(f"round {i}: running again {seconds:.2f} s after the kill")
    assert aborted >= 1, "no kill landed inside the save: the test proved nothing"
    code, recs = memory_backup(root, guest.name)
    assert code == 0 and recs[0]["memory"]["saved"], recs
    chain = Path(recs[0]["disks"][0]["path"]).parent
    assert not list(chain.glob("*.partial"))
    guest.wait_agent(timeout=60)
    assert counter(guest) > 0
    print(f"{aborted} of 3 kills aborted a save in flight")


def test_a_state_that_does_not_fit_is_refused_and_nothing_is_defined(test_guest, vm_workdir, libvirt_conn,
                                                                    cleanup_domains):
    import json
    import re

    guest = test_guest()
    root = vm_workdir / "backups"
    root.mkdir()
    code, recs = memory_backup(root, guest.name)
    assert code == 0, recs
    chain = Path(recs[0]["disks"][0]["path"]).parent
    vmconfig = chain / names.vmconfig_name("virtnbdbackup.0")
    original = vmconfig.read_text()
    clone = f"{guest.name}-c"
    cleanup_domains.append(clone)
    dest = vm_workdir / "clone"

    def refused(*extra: str) -> str:
        code, recs = run_restore("--backup-path", str(root), "--vm", guest.name, "--restore-path", str(dest),
                                 "--name", clone, "--resume", "--force", *extra)
        assert code == 5 and recs[-1]["type"] == "error" and recs[-1]["kind"] == "state", recs
        with pytest.raises(libvirt.libvirtError):
            libvirt_conn.lookupByName(clone)
        assert not dest.exists() or not list(dest.iterdir()), list(dest.iterdir())
        return recs[-1]["message"]

    # the XML to define: more memory, two vCPUs, a watchdog the saved machine did not have
    edited = re.sub(r"<memory unit='KiB'>\d+</memory>", "<memory unit='KiB'>524288</memory>", original)
    edited = re.sub(r"<currentMemory unit='KiB'>\d+</currentMemory>", "<currentMemory unit='KiB'>524288</currentMemory>",
                    edited)
    edited = re.sub(r"<vcpu([^>]*)>1</vcpu>", r"<vcpu\1>2</vcpu>", edited)
    edited = edited.replace("</devices>", "<watchdog model='i6300esb' action='reset'/></devices>")
    assert edited != original
    vmconfig.write_text(edited)
    message = refused()
    print(message)
    assert "memory (KiB): the saved state has 262144, the XML to define has 524288" in message
    assert "vCPUs: the saved state has 1, the XML to define has 2" in message
    assert "device only in the XML to define: watchdog i6300esb" in message
    code, recs = run_restore("--backup-path", str(root), "--vm", guest.name, "--restore-path", str(dest),
                             "--name", clone, "--resume", "--force", "--dry-run")
    assert code == 5 and any("vCPUs" in b for b in recs[-2]["blocked"]), recs
    vmconfig.write_text(original)

    # a state saved on another architecture
    manifest = chain / names.state_manifest_name("virtnbdbackup.0")
    body = json.loads(manifest.read_bytes())
    body["host"]["arch"] = "aarch64"
    manifest.write_text(json.dumps(body))
    message = refused()
    assert "architecture: the state was saved on aarch64, this host is x86_64" in message

    # a damaged state file: refused while unpacking, before the disks
    body["host"]["arch"] = "x86_64"
    manifest.write_text(json.dumps(body))
    state = chain / names.state_name("virtnbdbackup.0")
    with open(state, "r+b") as f:
        f.seek(state.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    message = refused()
    assert "damaged" in message or "does not match its state manifest" in message, message
    code, recs = run_restore("--backup-path", str(root), "--verify", guest.name)  # --verify finds it too
    point = [r for r in recs if r.get("point") == 0]
    assert code == 4 and point and any(state.name in p for p in point[0]["problems"]), recs


def test_the_state_goes_with_its_point_virtnbdrestore_replica_archive(test_guest, vm_workdir, tmp_path):
    """virtnbdrestore restores the disks of points with a state (it ignores the files); a replica and an
    archived chain keep the state with the point (listed resumable, bytes equal)."""
    from replicate_helpers import configure, points, replicate

    from vmbk.tree import ops

    guest = test_guest()
    root = vm_workdir / "backups"
    root.mkdir()
    for n in range(2):
        guest.write_file(f"/mnt/vda/check-{n}", os.urandom(50_000))
        guest.sync()
        code, recs = memory_backup(root, guest.name)
        assert code == 0, [r.get("message") for r in recs]
        # the full saves the state; an incremental cannot (QEMU 7.2 unloads the bitmaps): said, no error
        assert recs[0]["memory"]["saved"] == (n == 0) and bool(recs[0]["memory"]["reason"]) == (n == 1), recs
    chain = Path(recs[0]["disks"][0]["path"]).parent
    assert len(list(chain.glob("vmstate.*.lz4"))) == 1

    if shutil.which("virtnbdrestore"):
        ours = tmp_path / "ours"
        code, recs = run_restore("--backup-path", str(root), "--vm", guest.name, "--restore-path", str(ours),
                                 "--restore-point", "0", "--skip-config")
        assert code == 0, recs
        for n in (0, 1):
            out = tmp_path / f"virtnbdrestore-{n}"
            out.mkdir()
            subprocess.run(["virtnbdrestore", "-i", str(chain), "-o", str(out), "-u", f"virtnbdbackup.{n}", "-n",
                            "-L", str(out / "restore.log"), "-f", str(out / "nbd.sock")], check=True,
                           capture_output=True)
            (theirs,) = [released(p) for p in out.iterdir() if p.suffix == ".qcow2"]
            if n == 0:  # a full carries no zero frames: byte-equal to vmbk's restore of it
                r = subprocess.run(["qemu-img", "compare", "-q", str(theirs), str(ours / f"{guest.name}.qcow2")],
                                   check=False)
                assert r.returncode == 0

    (vm_workdir / "replica").mkdir()
    config = configure(tmp_path / "config", [{"name": "copy", "transport": "local",
                                              "path": str(vm_workdir / "replica")}])
    code, recs = replicate(config, root, "--vm", guest.name)
    assert code == 0, [r.get("message") for r in recs]
    replica_chain = vm_workdir / "replica" / chain.relative_to(root)
    for state in chain.glob("vmstate.*"):
        assert (replica_chain / state.name).read_bytes() == state.read_bytes()
    assert [(p["index"], p["resumable"]) for p in points(vm_workdir / "replica", guest.name)] == [(0, True), (1, False)]

    vm_dir = root / guest.name
    archived = ops.archive_chain(vm_dir, chain.relative_to(vm_dir).as_posix(),
                                 f"{chain.relative_to(vm_dir).as_posix()}/.archives/chain-2026-01-01", guest.name)
    assert len(list(archived.glob("vmstate.*"))) == 2
    assert [(p["chain"].endswith("chain-2026-01-01"), p["resumable"]) for p in points(root, guest.name)] == [
        (True, True), (True, False)]


def test_a_clone_resumes_beside_the_running_original(test_guest, vm_workdir, libvirt_conn, cleanup_domains):
    """--resume --name: a new name, UUID and MAC (libvirt holds the restore's XML against the image's: the
    image gets the clone's identity), the original runs on, the clone continues from the backup instant."""
    from guest.agent import Guest

    nic = "<interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>"
    guest = test_guest(extra_devices=nic)
    root = vm_workdir / "backups"
    root.mkdir()
    while counter(guest) < 25:
        time.sleep(0.5)
    boot = boot_id(guest)
    c0 = counter(guest)
    code, recs = memory_backup(root, guest.name)
    assert code == 0 and recs[0]["memory"]["saved"], recs
    clone = f"{guest.name}-c"
    cleanup_domains.append(clone)
    time.sleep(5)
    code, recs = run_restore("--backup-path", str(root), "--vm", guest.name, "--restore-path",
                             str(vm_workdir / "clone"), "--name", clone, "--resume")
    assert code == 0, [r.get("message") for r in recs]
    dom = libvirt_conn.lookupByName(clone)
    assert dom.isActive() and dom.UUIDString() != guest.dom.UUIDString()
    xml = dom.XMLDesc(0)
    assert "52:54:00:12:34:56" not in xml and str(vm_workdir / "clone") in xml
    c = Guest(dom)
    c.wait_agent(timeout=60)
    resumed, original = counter(c), counter(guest)
    print(f"counter: {c0} at the backup, clone resumed at {resumed}, original at {original}")
    assert boot_id(c) == boot and c0 <= resumed < original
    assert guest.dom.isActive()


def test_a_save_past_its_timeout_is_aborted_and_the_domain_stays_as_it_was(test_guest, vm_workdir):
    """The bound (memory_pause_timeout): libvirt's job aborted, nothing saved, the domain paused as
    before (the caller resumes it), no job left; the backup then goes on without the state."""
    from vmbk.virt import memstate

    guest = test_guest(memory_mib=512)
    guest.sh("dd if=/dev/urandom of=/run/fill bs=1048576 count=200 2>/dev/null", timeout=120)
    work = vm_workdir / "job"
    work.mkdir()
    guest.dom.suspend()
    try:
        with pytest.raises(memstate.StateError, match="longer than memory_pause_timeout"):
            memstate.save(guest.dom, work / "memory.spool", timeout=0.05)
        state, reason = guest.dom.state()
        assert state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER
        assert guest.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    finally:
        guest.dom.resume()
    assert counter(guest) > 0


def test_guard_killed_too_the_next_backup_ends_the_save_and_resumes(test_guest, vm_workdir, tmp_path):
    """vmbk and its guard both killed while libvirt writes the state: the next vmbk-backup of the VM
    (before anything else, under its lock) ends what is left of the save, resumes the VM and says so."""
    from kill_helpers import RUN_DIR, domain_state, marker_of, no_job, spawn_backup
    from test_backup_hold import GuardStopper

    guest = test_guest(memory_mib=512)
    guest.sh("dd if=/dev/urandom of=/run/fill bs=1048576 count=200 2>/dev/null", timeout=120)
    root = vm_workdir / "backups"
    root.mkdir()
    before = set(RUN_DIR.glob("backup-*/memory.spool"))
    guard = GuardStopper(guest.dom)
    p = spawn_backup(root, guest.name, tmp_path / "killed", "--with-memory")
    while p.poll() is None and not set(RUN_DIR.glob("backup-*/memory.spool")) - before:
        time.sleep(0.0005)
    guard()
    p.kill()
    p.wait()
    guard.kill()
    time.sleep(1)
    assert domain_state(guest.dom).startswith("paused"), "killed outside the window"
    code, recs = memory_backup(root, guest.name)
    assert code == 0, recs
    healed = [e for e in recs[0]["events"] if e["event"] == "resumed"]
    assert len(healed) == 1 and "did not finish" in healed[0]["reason"], recs[0]["events"]
    assert recs[0]["memory"]["saved"]
    assert domain_state(guest.dom) == "running" and no_job(guest.dom) and not marker_of(guest.dom).exists()


def test_memory_full_every_backup_is_a_full_and_every_point_resumes(test_guest, vm_workdir, tmp_path, monkeypatch):
    """``memory = "full"`` (no --with-memory): two backups in one period are two fulls, the first chain
    archived within the period by the second; both points carry a state: both listed resumable."""
    guest = test_guest()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text(f'policy = "monthly"\n[vm."{guest.name}"]\nmemory = "full"\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    root = vm_workdir / "backups"
    root.mkdir()
    for n in range(2):
        code, recs = run_backup(root, "--vm", guest.name)
        assert code == 0, [r.get("message") for r in recs]
        (rec,) = recs
        assert rec["action"] == "full" and rec["memory"]["saved"], rec
        assert [e["event"] for e in rec["events"] if e["event"] == "archived"] == (["archived"] if n else [])
        guest.wait_agent(timeout=60)
    code, recs = list_points(root, guest.name)
    assert code == 0, recs
    got = [(p["index"], ".archives/" in p["chain"], p["resumable"]) for p in recs if p["type"] == "restore_point"]
    assert sorted(got) == [(0, False, True), (0, True, True)], recs
