"""The README demo: a demo VM of its own, then the vmbk pipeline on it.

Run through scripts/demo (which sets the host up first).  Everything lives
in /var/lib/vmbk-demo: the VM's disk, the backup tree, the restored clone.
The VM is the tiny test guest (tests/guest), named ``vmbk-demo``; running
the demo again reuses it.

Steps: create/boot the VM, write a file in it through the guest agent,
``vmbk-discover | vmbk-plan | vmbk-backup | vmbk-rotate | vmbk-replicate |
vmbk-report`` (retention after each backup: what it keeps and removes is
said; replication to a local copy in /var/lib/vmbk-demo/replica, checked
by content, through the demo's own configuration instance in
/var/lib/vmbk-demo/etc; the report writes its HTML page), change 4 MiB,
back up again
(an incremental), restore the latest point as a clone with vmbk-restore,
compare the clone's disk byte for byte with the disk at the backup's
instant, boot the clone and read the checkfile through its agent, list
the replica's restore points, drill the latest point with ``vmbk-drill``
(restored into a throwaway VM on an isolated network, booted, its
checkfile read through the agent, removed), then ``vmbk-status`` and where
the HTML report of ``vmbk-report`` (at the end of each round's pipe) is.
The clone is removed at the end; the demo VM, its backups and the report
stay.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import libvirt  # noqa: E402
import orjson  # noqa: E402
from guest.agent import Guest  # noqa: E402
from guest.build import build_guest  # noqa: E402
from guest.domain import guest_domain_xml, make_qcow2, remove_domain, start_domain  # noqa: E402


NAME = os.environ.get("VMBK_DEMO_NAME", "vmbk-demo")
HOME = Path(os.environ.get("VMBK_DEMO_DIR", "/var/lib/vmbk-demo"))
BIN = ROOT / ".venv" / "bin"
REPORT = HOME / "report.html"
REPLICA = HOME / "replica"


def say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def ensure_vm(conn: libvirt.virConnect) -> Guest:
    HOME.mkdir(parents=True, exist_ok=True)
    os.chmod(HOME, 0o755)
    disk = HOME / f"{NAME}-data.qcow2"
    try:
        dom = conn.lookupByName(NAME)
    except libvirt.libvirtError:
        say(f"creating the demo VM {NAME!r} (tiny Debian kernel + busybox + qemu-guest-agent)")
        if not disk.exists():
            make_qcow2(disk, "256M")
        xml = guest_domain_xml(NAME, build_guest(), [disk], console_log=HOME / f"{NAME}.console.log")
        dom = start_domain(conn, xml)
    if not dom.isActive():
        dom.create()
    guest = Guest(dom, console_log=HOME / f"{NAME}.console.log", disks=[disk])
    took = guest.wait_agent(120)
    say(f"{NAME} is up, guest agent answered after {took:.1f} s")
    return guest


def pipeline(*stages: list[str]) -> tuple[list[dict], int]:
    """Run stage | stage | ... and return the last stage's records and exit code."""
    procs: list[subprocess.Popen[bytes]] = []
    prev = None
    for argv in stages:
        p = subprocess.Popen(argv, stdin=prev, stdout=subprocess.PIPE)
        if prev is not None:
            prev.close()
        prev = p.stdout
        procs.append(p)
    out = procs[-1].communicate()[0]
    for p in procs[:-1]:
        p.wait()
    return [orjson.loads(line) for line in out.splitlines()], procs[-1].returncode


def backup_round(guest: Guest, backups: Path, label: str, reference: Path) -> dict:
    """discover | plan | backup, with the guest paused so the reference is the backup's instant."""
    common = ["--json", "--backup-path", str(backups)]
    guest.dom.suspend()
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(guest.disks[0]), str(reference)], check=True)
        recs, code = pipeline(
            [str(BIN / "vmbk-discover"), "--json", "--vm", NAME],
            [str(BIN / "vmbk-plan"), *common],
            [str(BIN / "vmbk-backup"), *common],
            [str(BIN / "vmbk-rotate"), *common],
            [str(BIN / "vmbk-replicate"), *common],
            [str(BIN / "vmbk-report"), *common, "--tee", "--html", str(REPORT)],
        )
    finally:
        guest.dom.resume()
    for r in recs:
        if r["type"] == "error":
            raise SystemExit(f"demo: {r['stage']}: {r['message']}")
    (rec,) = [r for r in recs if r["type"] == "backup"]
    say(f"{label}: vmbk-backup {rec['action']} {rec['checkpoint']} ({rec['consistency']}), "
        f"{sum(d['data_size'] for d in rec['disks']) / 2**20:.1f} MiB of data in {rec['duration']:.2f} s"
        f" — {'; '.join(rec['reasons'])}")
    (rot,) = [r for r in recs if r["type"] == "rotate"]
    say(f"{label}: vmbk-rotate ({rot['policy']} keeps {rot['keep'] if rot['keep'] is not None else 'all'}): "
        f"{len(rot['kept'])} kept, {len(rot['removed'])} removed ({rot['freed_bytes'] / 2**20:.1f} MiB freed)"
        + "".join(f"; removed {Path(r['path']).name}: {r['reason']}" for r in rot["removed"]))
    (rep,) = [r for r in recs if r["type"] == "replicate"]
    say(f"{label}: vmbk-replicate to {rep['path']}: {rep['files']} files, {rep['bytes'] / 2**20:.1f} MiB copied, "
        f"{rep['moved']} renamed, {rep['verified']} checked by {rep['verify']} in {rep['duration']:.2f} s")
    return rec


def configure(stamp: str) -> None:
    """The demo's own configuration instance: one local replication destination,
    the drill's scratch space and the check it makes in the booted copy."""
    etc = HOME / "etc"
    etc.mkdir(exist_ok=True)
    REPLICA.mkdir(exist_ok=True)
    (etc / "default.toml").write_text(f"""# written by scripts/demo
[[replication]]
name = "demo-copy"
transport = "local"
path = "{REPLICA}"
verify = "checksum"

[drill]
scratch_dir = "{HOME / 'drill-scratch'}"

[drill.vm."{NAME}"]
file = "/mnt/vda/checkfile"
pattern = "at {stamp}$"
""")
    os.environ["VMBK_CONFIG_DIR"] = str(etc)


def remove_clone(conn: libvirt.virConnect, name: str) -> None:
    try:
        remove_domain(conn.lookupByName(name))
    except libvirt.libvirtError:
        pass  # no such domain


def drill(conn: libvirt.virConnect, backups: Path) -> bool:
    """vmbk-drill of the latest point: a throwaway copy booted, its checkfile checked, removed."""
    recs, code = pipeline([str(BIN / "vmbk-drill"), "--json", "--backup-path", str(backups), "--vm", NAME])
    (rec,) = [r for r in recs if r["type"] == "drill"]
    checks = ", ".join(f"{c['check']} {c['verdict']} ({c['seconds']:.1f} s)" for c in rec["checks"])
    say(f"vmbk-drill: point {rec['point']['chain']}:{rec['point']['restore_point']} restored into {rec['name']} "
        f"on {rec['network'] or 'no network'}, booted and checked in {rec['seconds']:.1f} s: {checks}")
    left = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(f"{NAME}-drill-")]
    say(f"vmbk-drill: outcome {rec['outcome']}, level {rec['level']}"
        + (f"; left behind: {', '.join(left)}" if left else "; the throwaway VM and its files are gone"))
    return code == 0 and rec["outcome"] == "ok" and rec["level"] == "check" and not left


def main() -> int:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we report errors ourselves
    conn = libvirt.open("qemu:///system")
    guest = ensure_vm(conn)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    configure(stamp)
    backups = HOME / "backups"
    backups.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=HOME))
    os.chmod(work, 0o755)  # QEMU (libvirt-qemu) must reach the clone's disk
    try:
        guest.write_file("/mnt/vda/checkfile", f"written by the vmbk demo at {stamp}\n".encode())
        guest.sync()
        first = backup_round(guest, backups, "round 1", work / "ref-1.raw")

        guest.write_file("/mnt/vda/changed", os.urandom(4 << 20))
        guest.sync()
        say("changed 4 MiB in the guest")
        second = backup_round(guest, backups, "round 2", work / "ref-2.raw")

        # Restore the latest point as a clone, compare its disk byte for byte
        # with the disk at the backup's instant, boot it and read the file.
        clone = f"{NAME}-clone"
        remove_clone(conn, clone)
        recs, code = pipeline([str(BIN / "vmbk-restore"), "--json", "--backup-path", str(backups), "--vm", NAME,
                               "--restore-path", str(work), "--name", clone])
        errors = [r for r in recs if r["type"] == "error"]
        if code != 0 or errors:
            raise SystemExit(f"demo: vmbk-restore failed: {errors[0]['message'] if errors else code}")
        (image,) = [Path(r["target"]) for r in recs if r["type"] == "restore_disk"]
        same = subprocess.run(["qemu-img", "compare", "-q", str(image), str(work / "ref-2.raw")]).returncode == 0
        say(f"vmbk-restore: clone {clone!r} of {second['checkpoint']}: disk "
            + ("identical to the disk at backup time" if same else "DIFFERENT from the disk at backup time"))
        dom = conn.lookupByName(clone)
        dom.create()
        try:
            cg = Guest(dom, disks=[image])
            cg.wait_agent(120)
            text = cg.read_file("/mnt/vda/checkfile").decode().strip()
            booted = text == f"written by the vmbk demo at {stamp}"
            say(f"the clone booted and its checkfile says: {text!r}")
        finally:
            remove_clone(conn, clone)
        recs, code = pipeline([str(BIN / "vmbk-restore"), "--json", "--backup-path", str(REPLICA),
                               "--list-restore-points", NAME])
        listed = [r for r in recs if r["type"] == "restore_point"]
        replicated = code == 0 and bool(listed) and all(r["complete"] for r in listed)
        say(f"the replica {REPLICA} lists {len(listed)} restore point(s) of {NAME}, "
            + ("all complete" if replicated else "NOT all complete"))
        drilled = drill(conn, backups)
        ok = same and booted and replicated and drilled
        print(f"summary: {NAME}: {first['action']} + {second['action']} backup in {second['target_dir']}; "
              f"clone of the latest point {'verified OK' if ok else 'FAILED'}", flush=True)
        # How the backups are doing (a table on a terminal, records in a pipe),
        # and the page vmbk-report wrote at the end of each round's pipe.
        say("vmbk-status:")
        status = subprocess.run([str(BIN / "vmbk-status"), "--backup-path", str(backups)]).returncode
        say(f"vmbk-status exit status {status} (0: every VM has a fresh complete restore point)")
        print(f"report: the HTML report of the last run is {REPORT} (open it in a browser)", flush=True)
        return 0 if ok and status == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
