#!/usr/bin/env python3
"""vmbk-restore against virtnbdrestore and qemu-img convert, same backups, same run (by hand).

    .venv/bin/python bench/restore.py [--no-page-reporting] [--runs N] [--quick]
                                      [--size-gib 3.5] [--out-dir DIR] [--only a,z,c]
                                      [--alternatives]

Backups are made with the real tools on a running no-OS domain whose disk
is bench/run.py's cached test image (3.5 GiB of data in 6 GiB), changes
written into the running disk through the device (HMP ``qemu-io``), so the
dirty bitmaps see them.  Three phases, one after the other (only one
phase's backups exist at a time, see "Memory" in bench/README.md):

a. ``vmbk-backup`` full + 3 incrementals (256 MiB changed before each):
   ``vmbk-restore --vm PATH --restore-path DIR --skip-config`` vs
   ``virtnbdrestore -i CHAIN -o DIR`` vs ``qemu-img convert -O qcow2`` of
   a raw image of the same content (the state after the last incremental);
z. ``vmbk-backup`` full with lz4 (level 2) of that state: vmbk-restore vs
   virtnbdrestore;
c. ``vmbk-backup`` full + 29 incrementals (4 MiB changed before each):
   vmbk-restore of point 29 (the 30th) vs of point 0 (its full).

Every timed run holds /var/tmp/vmbk-bench-timing.lock (``flock``; the
wait is not timed), and so does the making of the backups; every output
is fsynced before the clock stops (vmbk-restore fsyncs by itself).  The
first run of each case is checked with ``qemu-img compare`` against the
raw image of that state (or the domain's disk, for point 29).  Best of N,
interleaved in rotating order; a table with ratios, CPU, peak RSS and the
targets (PASS/FAIL) at the end.  The domain, the work directory and all
outputs are removed at the end, on failure and on Ctrl-C/SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # bench/run.py: image, measure, page reporting
from run import GiB, KiB, MiB, Proc, measure, rotate, sync_tree

ROOT = common.ROOT
BENCH_DIR = common.BENCH_DIR
TIMING_LOCK = Path("/var/tmp/vmbk-bench-timing.lock")
DOMAIN_PREFIX = "vmbk-rbench-"  # not run.py's vmbk-bench-: its stale cleanup must not take ours
WORK_PREFIX = "rwork-"
VENV_BIN = Path(sys.executable).parent
CHANGE_A = 256 * MiB   # changed before each incremental of chain a
CHANGE_C = 4 * MiB     # ... of chain c
C_POINTS = 30

A_VMBK, A_VNB, A_CONV = "a: vmbk-restore full+3 inc", "a: virtnbdrestore full+3 inc", \
    "a: qemu-img convert -O qcow2 (raw)"
A_BUILD, A_BUILD_SEQ, A_OLD, A_NBD = "a: image.build(verify=True), overlapped", \
    "a: verify_sources + image.build", "a: (old) write_raw + convert -W", "a: (alt) nbdkit raw -> convert"
Z_VMBK, Z_VNB = "z: vmbk-restore lz4 full", "z: virtnbdrestore lz4 full"
C_FULL, C_LAST = "c: vmbk-restore point 0 (full)", f"c: vmbk-restore point {C_POINTS - 1} of {C_POINTS}"
TARGETS = [  # (vmbk line, reference line, kind, limit): speedup >= limit, or slowdown <= limit
    (A_VMBK, A_VNB, ">=", 2.5), (Z_VMBK, Z_VNB, ">=", 2.5), (A_VMBK, A_CONV, ">=", 1.2),
    (C_LAST, C_FULL, "<=", 1.3),
]
VS = {A_VNB: A_VMBK, A_CONV: A_VMBK, Z_VNB: Z_VMBK, C_LAST: C_FULL, A_BUILD: A_VMBK, A_BUILD_SEQ: A_VMBK,
      A_OLD: A_VMBK, A_NBD: A_VMBK}


@contextlib.contextmanager
def timing_lock() -> Iterator[None]:
    """The machine-wide lock of timed bench runs (what ``flock LOCK cmd`` takes)."""
    with open(TIMING_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------ worker
#
# The image.build lines run in a child (its own RSS, timed after imports).


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="restore.py --worker")
    ap.add_argument("kind", choices=("overlap", "sequential", "old"))
    ap.add_argument("out")
    ap.add_argument("sources", nargs="+")
    a = ap.parse_args(argv)
    from vmbk.restore import image

    srcs = tuple(Path(p) for p in a.sources)
    job = image.DiskRestore("vda", srcs, Path(a.out), 0, 0, ())
    t0 = time.perf_counter()
    if a.kind == "old":
        image.write_raw(srcs, job.raw)
        subprocess.run(["qemu-img", "convert", "-q", "-W", "-f", "raw", "-O", "qcow2", str(job.raw),
                        str(job.partial)], check=True)
        os.unlink(job.raw)
        subprocess.run(["qemu-img", "check", "-q", str(job.partial)], check=True)
    else:
        if a.kind == "sequential":
            image.verify_sources(srcs)
        image.build(job, verify=a.kind == "overlap")
    image.commit([job])
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    return 0


# ------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    name: str
    nbytes: int = 0
    runs: list[Proc] = dataclasses.field(default_factory=list)
    checked: str = ""

    @property
    def best(self) -> Proc:
        return min(self.runs, key=lambda r: r.seconds)


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.runs = 1 if opts.quick else opts.runs
        self.cases: dict[str, Case] = {}
        self.facts: list[str] = []
        self.conn: Any = None
        self.dom: Any = None
        self.name = ""
        self.work: Path | None = None
        self.out: Path | None = None
        self.image: Any = None

    # -- setup / teardown

    def setup(self) -> None:
        import libvirt
        from guest.domain import nos_domain_xml, start_domain

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        self.conn = common.open_libvirt()
        self.cleanup_stale()
        self.image = img = common.build_image(self.opts.size_gib)
        self.work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=BENCH_DIR))
        os.chmod(self.work, 0o755)
        base = Path(self.opts.out_dir) if self.opts.out_dir else Path("/dev/shm")
        base.mkdir(parents=True, exist_ok=True)
        self.out = Path(tempfile.mkdtemp(prefix="vmbk-rbench-out-", dir=base))
        need = 3 * img.data + CHANGE_A * 3 + GiB
        avail = meminfo("MemAvailable")
        if common.fs_type(self.out) == "tmpfs" and avail < need:
            raise SystemExit(f"{self.out} is tmpfs and the machine has {avail / GiB:.1f} GiB available; a phase "
                             f"needs ~{need / GiB:.1f} GiB: use --size-gib or --out-dir on a disk")
        if self.opts.no_page_reporting:
            tmp = self.out / "warm"
            size = min(need, avail // 2) // MiB
            common.run(["dd", "if=/dev/zero", f"of={tmp}", "bs=1M", f"count={size}", "status=none"])
            tmp.unlink()
        disk = self.work / "vda.qcow2"
        common.run(["cp", "--sparse=always", str(img.path), str(disk)])
        sync_tree(disk)
        os.chmod(disk, 0o644)
        self.change_file = self.work / "change.bin"
        with open(self.change_file, "wb") as f:
            f.writelines(os.urandom(16 * MiB) for _ in range(CHANGE_A // (16 * MiB)))
        os.chmod(self.change_file, 0o644)
        self.name = f"{DOMAIN_PREFIX}{uuid.uuid4().hex[:8]}"
        self.dom = start_domain(self.conn, nos_domain_xml(self.name, [disk]))
        self.disk = disk
        self.vnb_dir = self.work / "virtnbdrestore"
        self.vnb_dir.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "VMBK_INSTANCE")}
        self.env["PYTHONPYCACHEPREFIX"] = str(self.work / "pycache")
        for kind, text in (("plain", ""), ("lz4", 'compression = "lz4"\ncompression_level = 2\n')):
            d = self.work / f"config-{kind}"
            d.mkdir()
            if text:
                (d / "default.toml").write_text(text)
        run_env = dict(self.env, VMBK_CONFIG_DIR=str(self.work / "config-plain"))
        common.run([sys.executable, "-c", "import vmbk.commands.restore, vmbk.commands.backup"], env=run_env,
                   cwd=ROOT)
        print(f"domain {self.name} running on {disk}; outputs in {self.out}", flush=True)

    def cleanup_stale(self) -> None:
        common.remove_stale(self.conn, DOMAIN_PREFIX, WORK_PREFIX)

    def teardown(self) -> None:
        common.remove_all([self.dom] if self.dom is not None else [], [self.work, self.out], self.conn)

    # -- the domain

    def delete_checkpoints(self) -> None:
        import libvirt
        for cp in reversed(self.dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)):
            cp.delete(0)

    def guest_write(self, offset: int, length: int) -> None:
        """``length`` random bytes at ``offset`` through the device (the dirty bitmap sees them)."""
        import libvirt_qemu
        reply = libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d {common.VDA_BACKEND} "write -q -s {self.change_file} {offset} {length}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if reply.strip():
            raise RuntimeError(f"qemu-io in the domain said: {reply}")

    def backup(self, root: Path, config: str, action: str) -> None:
        env = dict(self.env, VMBK_CONFIG_DIR=str(self.work / f"config-{config}"))  # type: ignore[operator]
        p = common.run([str(VENV_BIN / "vmbk-backup"), "--vm", self.name, "--backup-path", str(root), "--json"],
                       env=env)
        recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        got = [(r.get("action"), r.get("outcome")) for r in recs if r.get("type") == "backup"]
        if got != [(action, "ok")]:
            raise RuntimeError(f"vmbk-backup: expected a {action} backup, got {got}: {p.stderr[-2000:]}")

    def chain(self, root: Path, config: str, changes: list[tuple[int, int]]) -> Path:
        """A new chain under root: full, then one incremental after each change; its directory."""
        root.mkdir()
        with timing_lock():
            t0 = time.monotonic()
            self.delete_checkpoints()
            self.backup(root, config, "full")
            for off, n in changes:
                self.guest_write(off, n)
                self.backup(root, config, "inc")
        (d,) = [p for p in (root / self.name).iterdir() if p.is_dir() and not p.name.startswith(".")]
        size = sum(p.stat().st_size for p in d.glob("*.data"))
        print(f"  chain {d} ({1 + len(changes)} points, {size / GiB:.2f} GiB of streams) made in "
              f"{time.monotonic() - t0:.0f} s", flush=True)
        return d

    def raw_of_disk(self, target: Path) -> None:
        """The domain's disk as it is now, as a sparse raw file (the reference, and convert's input)."""
        with timing_lock():
            common.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(self.disk), str(target)])

    # -- timed runs

    def timed(self, name: str, nbytes: int, fn: Callable[[Path], Proc], out: Path, ref: Path | None,
              force_share: bool = False) -> None:
        c = self.cases.setdefault(name, Case(name, nbytes))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        with timing_lock():
            proc = fn(out)
        c.runs.append(proc)
        (img,) = list(out.rglob("*.qcow2"))
        if ref is not None and not c.checked:
            r = subprocess.run(["qemu-img", "compare", *(["-U"] if force_share else []), str(img), str(ref)],
                               capture_output=True, text=True, check=False)
            c.checked = "same" if r.returncode == 0 else f"DIFFERENT: {(r.stdout + r.stderr).strip()[:200]}"
            if r.returncode == 0:
                info = json.loads(common.run(["qemu-img", "check", "--output=json", str(img)]).stdout)
                alloc = info.get("allocated-clusters", 0) * info.get("cluster-size", 65536) if info else 0
                c.checked += f", {alloc / GiB:.2f} GiB allocated"
        shutil.rmtree(out)
        print(f"  {name:44} {proc.seconds:7.2f} s  CPU {proc.cpu:5.2f} s  RSS {proc.rss / MiB:5.0f} MiB"
              f"{'  ' + c.checked if len(c.runs) == 1 else ''}", flush=True)

    def vmbk_restore(self, vm_dir: Path, point: str | None = None) -> Callable[[Path], Proc]:
        env = dict(self.env, VMBK_CONFIG_DIR=str(self.work / "config-plain"))  # type: ignore[operator]
        extra = ["--restore-point", point] if point is not None else []

        def go(out: Path) -> Proc:
            p = measure([str(VENV_BIN / "vmbk-restore"), "--vm", str(vm_dir), "--restore-path", str(out),
                         "--skip-config", "--json", *extra], env=env)
            recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
            if not any(r.get("type") == "restore" and r.get("outcome") == "ok" for r in recs):
                raise RuntimeError(f"vmbk-restore: {p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            return p
        return go

    def virtnbdrestore(self, chain: Path) -> Callable[[Path], Proc]:
        def go(out: Path) -> Proc:
            return measure(["virtnbdrestore", "-i", str(chain), "-o", str(out), "-n",
                            "-f", str(self.vnb_dir / "nbd.sock"), "-L", str(self.vnb_dir / "log")], fsync_dir=out)
        return go

    def worker(self, kind: str, sources: list[Path]) -> Callable[[Path], Proc]:
        def go(out: Path) -> Proc:
            p = measure([sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(out / "vda.qcow2"),
                         *map(str, sources)], env=self.env)
            p.seconds = json.loads(p.stdout.strip().splitlines()[-1])["seconds"]
            return p
        return go

    def rounds(self, cases: list[tuple[str, int, Callable[[Path], Proc], Path | None]], force_share: bool = False) -> None:
        out = self.out / "restored"  # type: ignore[operator]
        for i in range(self.runs):
            print(f" run {i + 1}/{self.runs}", flush=True)
            for name, nbytes, fn, ref in rotate(cases, i):
                self.timed(name, nbytes, fn, out, ref, force_share=force_share and ref == self.disk)

    # -- phases

    def phase_a(self) -> None:
        assert self.out is not None and self.image is not None
        print("\nphase a: vmbk-backup full + 3 incrementals (256 MiB changed before each)", flush=True)
        root = self.out / "a"
        off = self.image.change_offset
        chain = self.chain(root, "plain", [(off + k * CHANGE_A // 2, CHANGE_A) for k in range(3)])
        raw = self.out / "state-a.raw"
        self.raw_of_disk(raw)
        self.raw_a = raw
        data = self.image.data
        conv_out = "vda.qcow2"

        def convert(out: Path) -> Proc:
            return measure(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / conv_out)],
                           fsync_dir=out)
        cases = [(A_VMBK, data, self.vmbk_restore(root / self.name), raw),
                 (A_VNB, data, self.virtnbdrestore(chain), raw),
                 (A_CONV, data, convert, None)]
        if self.opts.alternatives:
            srcs = sorted(chain.glob("*.full.data")) + sorted(chain.glob("*.inc.*.data"),
                                                               key=lambda p: int(p.name.split(".")[-2]))
            cases += [(A_BUILD, data, self.worker("overlap", srcs), raw),
                      (A_BUILD_SEQ, data, self.worker("sequential", srcs), None),
                      (A_OLD, data, self.worker("old", srcs), None),
                      (A_NBD, data, self.nbdkit_convert(raw), None)]
        self.rounds(cases)
        shutil.rmtree(root)

    def nbdkit_convert(self, raw: Path) -> Callable[[Path], Proc]:
        """What a convert from an NBD server costs at best: nbdkit (C) serving the raw file."""
        def go(out: Path) -> Proc:
            sock = self.work / "nbdkit.sock"  # type: ignore[operator]
            sock.unlink(missing_ok=True)  # nbdkit leaves it behind
            script = (f"nbdkit -U {sock} --run 'qemu-img convert -f raw -O qcow2 \"$uri\" {out / 'vda.qcow2'}' "
                      f"file {raw}")
            return measure(["sh", "-c", script], fsync_dir=out)
        return go

    def phase_z(self) -> None:
        assert self.out is not None and self.image is not None
        print("\nphase z: vmbk-backup full, lz4 level 2, of the same state", flush=True)
        root = self.out / "z"
        chain = self.chain(root, "lz4", [])
        self.rounds([(Z_VMBK, self.image.data, self.vmbk_restore(root / self.name), self.raw_a),
                     (Z_VNB, self.image.data, self.virtnbdrestore(chain), self.raw_a)])
        shutil.rmtree(root)

    def phase_c(self) -> None:
        assert self.out is not None and self.image is not None
        print(f"\nphase c: vmbk-backup full + {C_POINTS - 1} incrementals ({CHANGE_C // MiB} MiB changed before "
              "each)", flush=True)
        root = self.out / "c"
        base = self.image.change_offset + 2 * CHANGE_A
        self.chain(root, "plain", [(base + k * 3 * CHANGE_C, CHANGE_C) for k in range(C_POINTS - 1)])
        vm_dir = root / self.name
        self.rounds([(C_FULL, self.image.data, self.vmbk_restore(vm_dir, "full"), self.raw_a),
                     (C_LAST, self.image.data, self.vmbk_restore(vm_dir, str(C_POINTS - 1)), self.disk)],
                    force_share=True)
        shutil.rmtree(root)

    # -- report

    def report(self) -> None:
        width = 118
        print("\n" + "=" * width)
        print("\n".join(self.facts))
        data = f"{self.image.data / GiB:.2f} GiB" if self.image else "?"
        print(f"best of {self.runs} run(s); MB/s: bytes of data of the disk ({data}) per second; 'vs': this line's "
              "time / the vmbk-restore line's (>1: vmbk is faster); CPU: user+sys of the process and its children "
              "(GNU time); RSS: peak of all runs; check: qemu-img compare of the first run's image with the "
              "reference")
        print("-" * width)
        print(f"  {'':44} {'best s':>7} {'MB/s':>6} {'vs':>6} {'CPU s':>6} {'RSS MiB':>7}  {'all runs, s':24} check")
        for c in self.cases.values():
            if not c.runs:
                continue
            b = c.best
            ref = self.cases.get(VS.get(c.name, ""))
            vs = f"{b.seconds / ref.best.seconds:5.2f}x" if ref is not None and ref.runs else ""
            runs = " ".join(f"{r.seconds:.2f}" for r in c.runs)
            print(f"  {c.name:44} {b.seconds:7.2f} {c.nbytes / b.seconds / 1e6:6.0f} {vs:>6} {b.cpu:6.2f} "
                  f"{max(r.rss for r in c.runs) / MiB:7.0f}  {runs:24} {c.checked}")
        print("-" * width)
        print("targets (time ratios of best runs):")
        for mine, theirs, kind, limit in TARGETS:
            ca, cb = self.cases.get(mine), self.cases.get(theirs)
            if ca is None or cb is None or not (ca.runs and cb.runs):
                continue
            if kind == ">=":
                r = cb.best.seconds / ca.best.seconds
                ok = r >= limit
                what = f"{mine} >= {limit:g}x as fast as {theirs}"
            else:
                r = ca.best.seconds / cb.best.seconds
                ok = r <= limit
                what = f"{mine} <= {limit:g}x the time of {theirs}"
            print(f"  {'PASS' if ok else 'FAIL'}  {what:96} {r:5.2f}x")
        bad = [c.name for c in self.cases.values() if c.checked.startswith("DIFFERENT")]
        if bad:
            print(f"  FAIL  images differ from the reference: {', '.join(bad)}")


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * KiB
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=3.5, help="GiB of data in the test disk (default 3.5)")
    ap.add_argument("--runs", type=int, default=3, help="runs per case, the best counts (default 3)")
    ap.add_argument("--quick", action="store_true", help="one run per case")
    ap.add_argument("--out-dir", help="where backups and restores go (default: a directory on /dev/shm)")
    ap.add_argument("--only", default="a,z,c", help="phases: a (chain), z (lz4 full), c (30 points)")
    ap.add_argument("--alternatives", action="store_true",
                    help="phase a also times image.build with the checksums overlapped / first, the former "
                    "raw + convert path, and qemu-img convert from nbdkit serving the raw image")
    ap.add_argument("--no-page-reporting", action="store_true",
                    help="turn virtio-balloon free page reporting off meanwhile (see bench/README.md)")
    opts = ap.parse_args()
    phases = set(opts.only.split(","))
    _lock = common.start_session("restore.lock", "bench/restore.py")  # referenced: held until exit
    bench = Bench(opts)
    started = time.monotonic()
    import platform

    import vmbk
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    bench.facts += [
        f"machine: {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, {platform.release()}",
        common.machine_load("start"),
        (f"versions: vmbk {vmbk.__version__}, {common.version(['qemu-img', '--version'])}, "
         f"virtnbdrestore {common.version(['virtnbdrestore', '--version'])}"),
    ]
    reporting = common.page_reporting()
    bench.facts.append("free page reporting: " + ("none" if reporting is None else
                       "off while the bench ran (--no-page-reporting)" if opts.no_page_reporting else
                       "ON: writes into freed memory take host page faults (see --no-page-reporting)"))
    print("\n".join(bench.facts), flush=True)
    code = 0
    try:
        if reporting is not None and opts.no_page_reporting:
            common.PAGE_REPORTING.write_text("11\n")
        bench.setup()
        assert bench.out is not None
        bench.facts.append(f"outputs and backups in {bench.out} ({common.fs_type(bench.out)}); disk "
                           f"{bench.image.virtual / GiB:.0f} GiB virtual, {bench.image.data / GiB:.2f} GiB data")
        bench.phase_a()  # always: its raw image is the reference of the others
        if "z" in phases:
            bench.phase_z()
        if "c" in phases:
            bench.phase_c()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        code = 130
    except Exception:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.teardown()
        if reporting is not None and opts.no_page_reporting:
            common.PAGE_REPORTING.write_text(f"{reporting}\n")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    bench.facts.append(common.machine_load("end"))
    bench.facts.append(f"total bench time {time.monotonic() - started:.0f} s")
    if any(c.runs for c in bench.cases.values()):
        bench.report()
    return code


if __name__ == "__main__":
    sys.exit(main())
