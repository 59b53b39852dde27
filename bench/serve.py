#!/usr/bin/env python3
"""Instant access: the NBD export against vmbk-restore, instant recovery against restore-then-boot (by hand).

    .venv/bin/python bench/serve.py [--runs N] [--only read,instant] [--out-dir DIR] [--keep]

The test guest (tests/guest) with a data disk, backed up once (full) by
``vmbk-backup``; the guest is not told to mount the disk (its content is
bench/run.py's mixed image: random, text, zero clusters and holes), so
nothing but the backup decides what the disks hold.  Two disks: bench/run.py's
cached image (3.5 GiB of data in 6 GiB) and a small one (256 MiB of random
data in 1 GiB).  One benchmark at a time, every timed run under
/var/tmp/vmbk-bench-timing.lock (shared with the other benches; the wait
is not timed), N runs each, interleaved, medians:

read (the 6 GiB point):
  * ``vmbk-restore --vm CHAIN --restore-path DIR --skip-config`` (checks
    the .chksum while it writes), and with ``--no-verify``;
  * ``vmbk-restore --vm CHAIN --serve``: the check before serving, then
    ``nbdcopy -C 4`` of the export into a sparse raw file, to ``null:``,
    and ``nbdcopy -C 1`` to ``null:``.
  Rates are the point's data bytes over the time.  Targets: nbdcopy -C 4
  to a file >= 0.8 x vmbk-restore --no-verify, and >= 1 GB/s to null:.

instant (both disks):
  * ``vmbk-restore --vm VM --instant --name CLONE --restore-path DIR``:
    seconds from the command to the clone's guest agent answering, and to
    the record (the move done, the VM independent of the backup);
  * ``vmbk-restore --vm VM --name CLONE --restore-path DIR`` then
    ``virDomainCreate`` and the agent: restore-then-boot.
  Target: the time to a usable guest does not grow with the disk.

Everything is removed at the end, on failure and on Ctrl-C (--keep keeps
the work directory).
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
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import libvirt  # noqa: E402

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
import run as common  # noqa: E402  bench/run.py: the cached mixed image
from restore import timing_lock as timing  # noqa: E402  the lock every timed bench run takes
from guest.agent import Guest  # noqa: E402
from guest.build import build_guest  # noqa: E402
from guest.domain import guest_domain_xml, remove_domain, start_domain  # noqa: E402

WORK = Path("/var/tmp/vmbk-bench")
PREFIX = "vmbk-sbench-"
VMBK_RESTORE = [sys.executable, str(ROOT / "bin" / "vmbk-restore"), "--json"]
MiB, GiB = 1 << 20, 1 << 30


def sh(*argv: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def small_disk(path: Path) -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", path, "1G")
    cmds = [c for o in range(0, 256, 16) for c in ("-c", f"write -q -P {o % 251 + 1} {o * 4}M 16M")]
    sh("qemu-io", "-f", "qcow2", *cmds, path)
    return path


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conn = libvirt.open("qemu:///system")
        WORK.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="swork-", dir=WORK))
        os.chmod(self.work, 0o755)
        out_base = Path(args.out_dir) if args.out_dir else (Path("/dev/shm") if shutil.disk_usage("/dev/shm").free
                                                            > 12 * GiB else self.work)
        self.out = Path(tempfile.mkdtemp(prefix="sout-", dir=out_base))
        os.chmod(self.out, 0o755)
        self.domains: list[str] = []
        self.results: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}

    # --- setup ---

    def backed_up(self, label: str, disk: Path) -> tuple[str, Path, int]:
        """(VM name, chain directory, data bytes of the point): the guest on ``disk``, one full backup."""
        name = PREFIX + uuid.uuid4().hex[:6]
        copy = self.work / f"{name}-vda.qcow2"
        sh("cp", "--sparse=always", disk, copy)
        os.chmod(copy, 0o644)
        dom = start_domain(self.conn, guest_domain_xml(name, build_guest(), [copy], data=[]))
        self.domains.append(name)
        Guest(dom).wait_agent(timeout=180)
        root = self.work / "backups"
        root.mkdir(exist_ok=True)
        r = subprocess.run([sys.executable, str(ROOT / "bin" / "vmbk-backup"), "--json", "--backup-path", str(root),
                            "--vm", name], capture_output=True, text=True, check=False)
        rec = json.loads(r.stdout.splitlines()[-1])
        assert r.returncode == 0 and rec["outcome"] == "ok", r.stdout + r.stderr
        remove_domain(dom)  # restores and instant recoveries make clones: the original is not needed
        chain = Path(rec["target_dir"])
        data = sum(d.get("data_size") or 0 for d in rec["disks"])
        print(f"{label}: {name} backed up, {data / GiB:.2f} GiB of data in {chain}", flush=True)
        return name, chain, data

    # --- measurements ---

    def time(self, label: str, fn: Callable[[], float | None]) -> None:
        with timing():
            t0 = time.monotonic()
            got = fn()
            seconds = got if got is not None else time.monotonic() - t0
        self.results.setdefault(label, []).append(seconds)
        print(f"  {label}: {seconds:.2f} s", flush=True)

    def read(self) -> None:
        image = common.build_image(3.5)
        name, chain, data = self.backed_up("read", image.path)
        self.data = data

        def restore(*extra: str) -> Callable[[], None]:
            def go() -> None:
                dest = self.out / "restore"
                sh(*VMBK_RESTORE, "--vm", chain, "--restore-path", dest, "--skip-config", *extra)
                shutil.rmtree(dest)
            return go

        def copy(target: str, conns: int) -> Callable[[], float]:
            def go() -> float:
                proc = subprocess.Popen([*VMBK_RESTORE, "--vm", str(chain), "--serve"], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL)
                assert proc.stdout is not None
                rec = json.loads(proc.stdout.readline())
                self.notes["verify before serving"] = f"{rec['verify_seconds']:.2f} s"
                try:
                    t0 = time.monotonic()
                    dest = "null:" if target == "null" else str(self.out / "copy.raw")
                    sh("nbdcopy", f"--connections={conns}", rec["exports"][0]["uri"], dest)
                    if target != "null":
                        fd = os.open(dest, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                    return time.monotonic() - t0
                finally:
                    proc.terminate()
                    proc.wait()
                    (self.out / "copy.raw").unlink(missing_ok=True)
            return go

        cases = [("vmbk-restore (checks .chksum while writing)", restore()),
                 ("vmbk-restore --no-verify", restore("--no-verify")),
                 ("nbdcopy -C 4 of the export -> file", copy("file", 4)),
                 ("nbdcopy -C 4 of the export -> null:", copy("null", 4)),
                 ("nbdcopy -C 1 of the export -> null:", copy("null", 1))]
        for i in range(self.args.runs):
            for label, fn in cases[i % len(cases):] + cases[:i % len(cases)]:
                self.time(label, fn)

    def instant(self) -> None:
        sizes = [("1 GiB disk, 256 MiB data", small_disk(self.work / "small.qcow2")),
                 ("6 GiB disk, 3.5 GiB data", common.build_image(3.5).path)]
        for label, disk in sizes:
            name, chain, data = self.backed_up(label, disk)
            for i in range(self.args.runs):
                order = [self.instant_once, self.restore_then_boot]
                for fn in order[i % 2:] + order[:i % 2]:
                    fn(label, name)

    def instant_once(self, label: str, vm: str) -> None:
        clone = f"{vm}-i{uuid.uuid4().hex[:4]}"
        dest = self.work / clone
        self.domains.append(clone)
        with timing():
            t0 = time.monotonic()
            proc = subprocess.Popen([*VMBK_RESTORE, "--backup-path", str(self.work / "backups"), "--vm", vm,
                                     "--instant", "--name", clone, "--restore-path", str(dest)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            while True:
                try:
                    dom = self.conn.lookupByName(clone)
                    break
                except libvirt.libvirtError:
                    if proc.poll() is not None:
                        raise SystemExit(f"--instant failed: {proc.stdout.read() if proc.stdout else ''}")
                    time.sleep(0.05)
            Guest(dom).wait_agent(timeout=180)
            agent = time.monotonic() - t0
            out, _ = proc.communicate()
            independent = time.monotonic() - t0
        rec = json.loads(out.splitlines()[-1])
        for what, value in (("instant: command -> agent", agent), ("instant: command -> independent", independent),
                            ("instant: usable (record)", rec["usable_seconds"])):
            self.results.setdefault(f"{label}: {what}", []).append(value)
        print(f"  {label}: instant: agent after {agent:.1f} s, independent after {independent:.1f} s "
              f"(usable {rec['usable_seconds']} s)", flush=True)
        remove_domain(self.conn.lookupByName(clone))
        shutil.rmtree(dest, ignore_errors=True)

    def restore_then_boot(self, label: str, vm: str) -> None:
        clone = f"{vm}-r{uuid.uuid4().hex[:4]}"
        dest = self.work / clone
        self.domains.append(clone)
        with timing():
            t0 = time.monotonic()
            sh(*VMBK_RESTORE, "--backup-path", self.work / "backups", "--vm", vm, "--name", clone,
               "--restore-path", dest)
            restored = time.monotonic() - t0
            dom = self.conn.lookupByName(clone)
            dom.create()
            Guest(dom).wait_agent(timeout=180)
            agent = time.monotonic() - t0
        self.results.setdefault(f"{label}: restore-then-boot: command -> agent", []).append(agent)
        self.results.setdefault(f"{label}: restore-then-boot: restore", []).append(restored)
        print(f"  {label}: restore-then-boot: restored after {restored:.1f} s, agent after {agent:.1f} s", flush=True)
        remove_domain(dom)
        shutil.rmtree(dest, ignore_errors=True)

    # --- the end ---

    def report(self) -> None:
        print("\nmedians of", self.args.runs, "runs")
        for label, values in self.results.items():
            med = statistics.median(values)
            rate = f"  {self.data / med / 1e9:5.2f} GB/s" if getattr(self, "data", 0) and not label[0].isdigit() \
                and "instant" not in label and "boot" not in label else ""
            print(f"  {label:60s} {med:7.2f} s{rate}   (runs: {', '.join(f'{v:.2f}' for v in values)})")
        for k, v in self.notes.items():
            print(f"  {k}: {v}")
        base = self.results.get("vmbk-restore --no-verify")
        copy = self.results.get("nbdcopy -C 4 of the export -> file")
        null = self.results.get("nbdcopy -C 4 of the export -> null:")
        if base and copy and null:
            ratio = statistics.median(base) / statistics.median(copy)
            gbs = self.data / statistics.median(null) / 1e9
            print(f"  target nbdcopy -C 4 -> file >= 0.8 x vmbk-restore --no-verify: {ratio:.2f} x "
                  f"{'PASS' if ratio >= 0.8 else 'FAIL'}")
            print(f"  target nbdcopy -C 4 -> null: >= 1 GB/s: {gbs:.2f} GB/s {'PASS' if gbs >= 1 else 'FAIL'}")

    def close(self) -> None:
        for name in self.domains:
            with contextlib.suppress(libvirt.libvirtError):
                remove_domain(self.conn.lookupByName(name))
        shutil.rmtree(self.out, ignore_errors=True)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        self.conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="read,instant")
    p.add_argument("--out-dir")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    bench = Bench(args)
    try:
        for section in args.only.split(","):
            print(f"== {section}", flush=True)
            getattr(bench, section)()
        bench.report()
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
