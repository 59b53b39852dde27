#!/usr/bin/env python3
"""The cost of saving a guest's memory state with its backup (issue #18), by hand, not a test.

    .venv/bin/python bench/memory.py [--mib 512,2048] [--fill 40] [--runs 3] [--no-page-reporting]

Per RAM size: the test guest (tests/guest) with that much RAM, ``--fill``
percent of it holding random data (a tmpfs file: pages QEMU must write
as they are, no zero pages to skip), a 1 GiB data disk with 64 MiB of
random data.  Then, interleaved, N full backups each (a new tree every
time, as ``bin/vmbk-backup`` processes):

* **disks only**: ``vmbk-backup --vm VM`` (the guest frozen through its agent);
* **with memory**: ``vmbk-backup --vm VM --with-memory``; from its record:
  the guest's pause (``memory.pause_seconds``: the state save and the
  backup job's start), the save alone, the state's size stored (lz4) and
  as libvirt's image;

and for both the whole command's time and its peak RSS (``wait4``).
Target: the pause under 1 s plus the time to write the used RAM at the
backup file system's speed (here the page cache: libvirt writes the image
into the job directory, vmbk compresses it into the tree behind the
pause); vmbk's memory must not grow with the RAM.  Every timed run holds
/var/tmp/vmbk-bench-timing.lock (shared with the other benches; the wait
is not timed).  Everything is removed at the end, on failure and on
Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import libvirt  # noqa: E402
import run as common  # noqa: E402  bench/run.py
from drill import timing_lock, work_dir  # noqa: E402  bench/drill.py: the shared timing lock, the work root
from guest.agent import Guest  # noqa: E402
from guest.build import build_guest  # noqa: E402
from guest.domain import guest_domain_xml, make_qcow2, remove_domain, start_domain  # noqa: E402

PREFIX = "vmbk-mbench-"


def backup(vm: str, root: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    """One full backup into a new tree: seconds, peak RSS (MiB), its record."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    argv = [sys.executable, str(ROOT / "bin" / "vmbk-backup"), "--json", "--backup-path", str(root), "--vm", vm,
            *extra]
    out_path, err_path = root.parent / "backup.out", root.parent / "backup.err"
    with timing_lock(), open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
        t = time.monotonic()
        p = subprocess.Popen(argv, env=env, stdout=out_f, stderr=err_f)
        _, status, usage = os.wait4(p.pid, 0)  # the child's own peak RSS
        seconds = time.monotonic() - t
        p.returncode = os.waitstatus_to_exitcode(status)
    out = out_path.read_bytes()
    if p.returncode != 0:
        raise SystemExit(f"vmbk-backup failed ({p.returncode}): {err_path.read_text()[-2000:]}")
    (rec,) = [json.loads(line) for line in out.splitlines()]
    assert rec["outcome"] == "ok" and rec["action"] == "full", rec
    return {"seconds": seconds, "rec": rec, "rss_mib": usage.ru_maxrss / 1024}


def one_size(conn: Any, mib: int, fill: int, runs: int, work: Path, env: dict[str, str]) -> dict[str, Any]:
    vm = f"{PREFIX}{uuid.uuid4().hex[:6]}"
    disk = make_qcow2(work / f"{vm}-vda.qcow2", "1G")
    dom = start_domain(conn, guest_domain_xml(vm, build_guest(), [disk], memory_mib=mib, data=["vda"],
                                              console_log=work / f"{vm}-console.log"))
    try:
        g = Guest(dom, console_log=work / f"{vm}-console.log", disks=[disk])
        g.wait_agent(300)
        g.sh("dd if=/dev/urandom of=/mnt/vda/fill bs=1M count=64 2>/dev/null", timeout=600)
        g.sh(f"dd if=/dev/urandom of=/run/fill bs=1M count={mib * fill // 100} 2>/dev/null", timeout=1200)
        g.sync()
        plain, memory = [], []
        for i in range(runs):
            for what in (("plain", "memory") if i % 2 == 0 else ("memory", "plain")):
                if what == "plain":
                    plain.append(backup(vm, work / "backups", env))
                else:
                    memory.append(backup(vm, work / "backups", env, "--with-memory"))
                    m = memory[-1]["rec"]["memory"]
                    assert m["saved"], m
                g.wait_agent(120)
        return {"mib": mib, "plain": plain, "memory": memory}
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            remove_domain(dom)


def report(rows: list[dict[str, Any]], fill: int) -> None:
    def med(vals: list[float]) -> float:
        return statistics.median(vals)

    print(f"full backups, medians of {len(rows[0]['plain'])} runs each; guest RAM {fill}% random data, "
          f"1 GiB disk with 64 MiB of data")
    head = (f"{'RAM':>6} {'disks only s':>13} {'with memory s':>14} {'ratio':>6} {'pause s':>8} {'save s':>7} "
            f"{'image MiB':>10} {'stored MiB':>11} {'save MB/s':>10} {'RSS MiB':>15}")
    print(head)
    for r in rows:
        p = med([x["seconds"] for x in r["plain"]])
        w = med([x["seconds"] for x in r["memory"]])
        mem = [x["rec"]["memory"] for x in r["memory"]]
        pause, save = med([m["pause_seconds"] for m in mem]), med([m["save_seconds"] for m in mem])
        image, stored = med([m["image_size"] for m in mem]), med([m["size"] for m in mem])
        rss_p = max((x["rss_mib"] or 0) for x in r["plain"])
        rss_m = max((x["rss_mib"] or 0) for x in r["memory"])
        print(f"{r['mib']:>5}M {p:>13.2f} {w:>14.2f} {w / p:>6.2f} {pause:>8.2f} {save:>7.2f} "
              f"{image / 2**20:>10.0f} {stored / 2**20:>11.0f} {image / save / 1e6:>10.0f} "
              f"{rss_p:>6.0f} / {rss_m:>6.0f}")
        pauses = [m["pause_seconds"] for m in mem]
        print(f"       pauses of every run: {', '.join(f'{x:.2f}' for x in pauses)} s")
    print("RSS: peak of the vmbk-backup process, disks only / with memory")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mib", default="512,2048")
    ap.add_argument("--fill", type=int, default=40, help="percent of the RAM filled with random data")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-page-reporting", action="store_true")
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("qemu:///system")
    work = work_dir("mwork-")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        with common.reporting_off(args.no_page_reporting):
            rows = [one_size(conn, int(m), args.fill, args.runs, work, env) for m in args.mib.split(",")]
        report(rows, args.fill)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
