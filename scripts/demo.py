"""The README demo: a demo VM of its own, then the vmbk pipeline on it.

Run through scripts/demo (which sets the host up first).  Everything lives
in /var/lib/vmbk-demo: the VM's disk, the backup tree, the restored clone.
The VM is the tiny test guest (tests/guest), named ``vmbk-demo``; running
the demo again reuses it.

Steps that exist today: create/boot the VM, write a file in it through
the guest agent, discover it, plan its backup.  Backup, restore of a clone
and the byte-for-byte comparison come with those stages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import libvirt  # noqa: E402
import orjson  # noqa: E402
from guest.agent import Guest  # noqa: E402
from guest.build import build_guest  # noqa: E402
from guest.domain import guest_domain_xml, make_qcow2, start_domain  # noqa: E402

NAME = "vmbk-demo"
HOME = Path(os.environ.get("VMBK_DEMO_DIR", "/var/lib/vmbk-demo"))
BIN = ROOT / ".venv" / "bin"


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


def main() -> int:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we report errors ourselves
    conn = libvirt.open("qemu:///system")
    guest = ensure_vm(conn)
    backups = HOME / "backups"
    backups.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    guest.write_file("/mnt/vda/checkfile", f"written by the vmbk demo at {stamp}\n".encode())
    guest.sync()
    say("wrote /mnt/vda/checkfile in the guest")

    common = ["--json", "--backup-path", str(backups)]
    recs, code = pipeline([str(BIN / "vmbk-discover"), "--json", "--vm", NAME])
    vm = next(r for r in recs if r["type"] == "vm")
    say(f"vmbk-discover: {vm['name']} {vm['state']}, {len(vm['disks'])} disk(s), agent answers: {vm['agent']}")

    recs, code = pipeline([str(BIN / "vmbk-discover"), "--json", "--vm", NAME], [str(BIN / "vmbk-plan"), *common])
    for r in recs:
        if r["type"] == "plan":
            say(f"vmbk-plan: {r.get('action')} — {'; '.join(r.get('reasons') or [])}")
        elif r["type"] == "error":
            say(f"vmbk-plan: {r['message']}")
    say("backup, clone restore and the byte-for-byte check arrive with vmbk-backup and vmbk-restore")
    print(f"summary: VM {NAME} discovered and planned; backup tree {backups}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
