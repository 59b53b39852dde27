#!/usr/bin/env python3
"""vmbk-drill against a restore by vmbk-restore plus a manual boot, same backup, same run (by hand).

    .venv/bin/python bench/drill.py [--runs N] [--data-mib 256] [--keep]

The test guest (tests/guest: a Debian kernel, busybox, qemu-guest-agent)
with a data disk of 1 GiB holding ``--data-mib`` of random data and a
checkfile, backed up once with ``vmbk-backup``.  Then, interleaved, N
times each:

* **drill**: ``bin/vmbk-drill --vm VM`` (a process, as cron runs it), its
  ``[drill.vm]`` check reading the checkfile; the time of the whole
  process, and its split from the record: restore (the ``disks`` check),
  start, boot to agent (``agent``), checks (``check``) and the rest (the
  process, the sweep, the marker, the network, the screenshot, the
  cleanup, the catalogue rows);
* **by hand**: ``bin/vmbk-restore --vm VM --restore-path DIR --name CLONE``
  (a process), then ``virDomainCreate`` of the clone, ``guest-ping`` until
  it answers, the checkfile read through the agent: what a person does to
  prove the same; the clone's removal is timed apart (the drill's total
  includes its own cleanup).

Target: drill <= 1.10 x (restore + boot + check + cleanup by hand),
medians: a drill removes its VM, so the comparison does too (the ratio
without the cleanup is printed as well).  Every
timed run holds /var/tmp/vmbk-bench-timing.lock (flock, shared with the
other benches; the wait is not timed).  The domain, the backups and every
clone are removed at the end, on failure and on Ctrl-C too (--keep keeps
the work directory).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import libvirt  # noqa: E402
from guest.agent import Guest  # noqa: E402
from guest.build import build_guest  # noqa: E402
from guest.domain import guest_domain_xml, make_qcow2, remove_domain, start_domain  # noqa: E402

TIMING_LOCK = Path("/var/tmp/vmbk-bench-timing.lock")
WORK = Path("/var/tmp/vmbk-bench")
PREFIX = "vmbk-dbench-"
TARGET = 1.10


@contextlib.contextmanager
def timing_lock() -> Iterator[None]:
    with open(TIMING_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def run(argv: list[str], env: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
    with timing_lock():
        t = time.monotonic()
        r = subprocess.run(argv, env=env, capture_output=True, check=False)
        seconds = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"{argv[1]} failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
    return seconds, [json.loads(line) for line in r.stdout.splitlines()]


def drill(vm: str, root: Path, env: dict[str, str]) -> dict[str, float]:
    seconds, recs = run([sys.executable, str(ROOT / "bin" / "vmbk-drill"), "--json", "--backup-path", str(root),
                         "--vm", vm], env)
    (rec,) = recs
    assert rec["outcome"] == "ok" and rec["level"] == "check", rec
    by = {c["check"]: c["seconds"] for c in rec["checks"]}
    out = {"restore": by["disks"], "start": by["start"], "boot to agent": by["agent"], "checks": by["check"]}
    out["rest"] = seconds - sum(out.values())
    out["total"] = seconds
    return out


def by_hand(conn: Any, vm: str, root: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    clone = f"{vm}-clone"
    dest = work / "clone"
    restore_s, _ = run([sys.executable, str(ROOT / "bin" / "vmbk-restore"), "--json", "--backup-path", str(root),
                        "--vm", vm, "--restore-path", str(dest), "--name", clone], env)
    dom = conn.lookupByName(clone)
    try:
        with timing_lock():
            t = time.monotonic()
            dom.create()
            start = time.monotonic() - t
            g = Guest(dom)
            g.wait_agent(300)
            boot = time.monotonic() - t - start
            t2 = time.monotonic()
            assert g.read_file("/mnt/vda/checkfile").startswith(b"bench-")
            check = time.monotonic() - t2
    finally:
        t3 = time.monotonic()
        remove_domain(dom)
        shutil.rmtree(dest)
        cleanup = time.monotonic() - t3
    return {"restore": restore_s, "start": start, "boot to agent": boot, "checks": check, "cleanup": cleanup,
            "total": restore_s + start + boot + check}


def work_dir(prefix: str) -> Path:
    """A fresh directory under WORK that QEMU (libvirt-qemu) can traverse, whatever the umask."""
    WORK.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o755)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK))
    os.chmod(work, 0o755)
    return work


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("qemu:///system")
    work = work_dir("dwork-")
    vm = f"{PREFIX}{uuid.uuid4().hex[:6]}"
    dom = None
    try:
        disk = make_qcow2(work / f"{vm}-vda.qcow2", "1G")
        dom = start_domain(conn, guest_domain_xml(vm, build_guest(), [disk], data=["vda"],
                                                  console_log=work / f"{vm}-console.log"))
        g = Guest(dom, console_log=work / f"{vm}-console.log", disks=[disk])
        g.wait_agent(300)
        g.sh(f"dd if=/dev/urandom of=/mnt/vda/fill bs=1M count={args.data_mib} 2>/dev/null", timeout=600)
        g.write_file("/mnt/vda/checkfile", f"bench-{vm}\n".encode())
        g.sync()
        root = work / "backups"
        root.mkdir()
        etc = work / "etc"
        etc.mkdir()
        (etc / "default.toml").write_text(f'[drill]\nscratch_dir = "{work / "scratch"}"\n[drill.vm."{vm}"]\n'
                                          f'file = "/mnt/vda/checkfile"\npattern = "^bench-"\n')
        env = {**os.environ, "VMBK_CONFIG_DIR": str(etc), "PYTHONPATH": str(ROOT)}
        run([sys.executable, str(ROOT / "bin" / "vmbk-backup"), "--json", "--backup-path", str(root), "--vm", vm],
            env)
        print(f"bench/drill.py: {vm}, {args.data_mib} MiB of data in a 1 GiB disk, {args.runs} runs each",
              file=sys.stderr)
        drills, hands = [], []
        for i in range(args.runs):
            for what in (("drill", "hand") if i % 2 == 0 else ("hand", "drill")):
                if what == "drill":
                    drills.append(drill(vm, root, env))
                else:
                    hands.append(by_hand(conn, vm, root, work, env))
        report(drills, hands)
    finally:
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                remove_domain(dom)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(drills: list[dict[str, float]], hands: list[dict[str, float]]) -> None:
    def med(rows: list[dict[str, float]], key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else None

    keys = ["restore", "start", "boot to agent", "checks", "rest", "cleanup", "total"]
    print(f"{'median seconds':<16}{'vmbk-drill':>12}{'by hand':>12}")
    for k in keys:
        d, h = med(drills, k), med(hands, k)
        print(f"{k:<16}{'-' if d is None else f'{d:.2f}':>12}{'-' if h is None else f'{h:.2f}':>12}")
    boots = [r["boot to agent"] for r in drills + hands]
    print(f"boot to agent, every run of both: {min(boots):.2f} .. {max(boots):.2f} s (the noise of a TCG boot)")
    drill_total, hand_total = med(drills, "total") or 0.0, med(hands, "total") or 1.0
    with_cleanup = hand_total + (med(hands, "cleanup") or 0.0)
    ratio = drill_total / with_cleanup
    print(f"drill / (restore + boot + check + cleanup by hand) = {ratio:.3f}  (target <= {TARGET:.2f}: "
          f"{'PASS' if ratio <= TARGET else 'FAIL'})")
    print(f"drill / (restore + boot + check by hand, no cleanup) = {drill_total / hand_total:.3f}  (the drill's "
          "total includes removing its VM)")

if __name__ == "__main__":
    sys.exit(main())
