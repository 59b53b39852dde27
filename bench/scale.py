#!/usr/bin/env python3
"""Speed that scales with the data, not the disk or the fleet (issue #22), by hand.

    .venv/bin/python bench/scale.py --sparse-tib [--runs 3]          # ~3 min
    .venv/bin/python bench/scale.py --fleet [--vms 20] [--runs 2]    # ~4 min
    (bench/run.py --sparse-tib / --fleet run this script)

--sparse-tib: a 1 TiB qcow2 holding 64 MiB in 1024 extents of 64 KiB,
1 GiB apart, under a running no-OS domain.  Timed, interleaved: QEMU's
own extent map of the image (``nbdinfo --map`` on a qemu-nbd export),
the data alone (vmbk's Reader reading the 1024 known extents from that
export, no block status), and two chains on the domain: ``vmbk-backup``
full, a change of 256 x 64 KiB through the device, ``vmbk-backup`` inc,
``vmbk-restore`` of the inc point; ``virtnbdbackup -l full`` / ``-l inc``
the same way; ``qemu-img convert -O qcow2`` of the image for scale.  The
targets compare the disk copy (backup_disk, image build: the seconds in
vmbk's JSON records) with 1.5 x (map + data).

--fleet: N no-OS domains (default 20) with 128 MiB of random data each
in a 1 GiB disk.  Timed, interleaved: one ``vmbk-backup --vm a,b,...
--jobs J`` for J = 1, 2, 4 (full backups; every domain's checkpoints
deleted first) and the same N domains through a loop of ``virtnbdbackup
-l full``, one process after the other (what a shell loop does; timed as
the sum of its processes).  Total time, peak RSS (GNU time), the CPU of
the domains' QEMUs.  Targets: --jobs 4 >= 1.8x --jobs 1, >= 12x the loop.

Outputs on /dev/shm, domains ``vmbk-sbench-*``, work directories
``/var/tmp/vmbk-bench/swork-*``; all removed at the end (also on error or
Ctrl-C); the cached images stay in ``/var/tmp/vmbk-bench/cache``.  Every
timed run holds the benches' timing lock (bench/restore.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # bench/run.py: measure, helpers
import restore  # bench/restore.py: Case, the timing lock
from run import GiB, KiB, MiB, Proc, measure, rotate

ROOT = common.ROOT
BENCH_DIR = common.BENCH_DIR
CACHE_DIR = common.CACHE_DIR
DOMAIN_PREFIX = "vmbk-sbench-"
WORK_PREFIX = "swork-"
VENV_BIN = Path(sys.executable).parent
TIB = 1024 * GiB
SPARSE_EXTENT = 64 * KiB
SPARSE_COUNT = 1024           # one extent per GiB
CHANGE_EVERY = 4              # the incremental: 64 KiB in every 4th GiB (256 x 64 KiB)
CHANGE_AT = 512 * KiB         # ... this far into the GiB (next to no data: new allocations)
FLEET_DATA = 128 * MiB
FLEET_DISK = GiB

# sparse lines
S_MAP, S_DATA = "(QEMU) nbdinfo --map of a qemu-nbd export", "(data) 1024 x 64 KiB read, no block status"
S_FULL, S_INC, S_REST = "vmbk-backup full", "vmbk-backup inc (256 x 64 KiB changed)", "vmbk-restore of the inc point"
S_VFULL, S_VINC = "virtnbdbackup -l full", "virtnbdbackup -l inc"
S_CONV = "qemu-img convert -O qcow2 of the image"
# fleet lines
F_JOBS = {j: f"vmbk-backup --jobs {j}" for j in (1, 2, 4)}
F_LOOP = "virtnbdbackup -l full, one VM after the other"


def worker_main(argv: list[str]) -> int:
    """The data alone: read the known extents from the export (one process, timed inside)."""
    sock, export = argv
    from vmbk.nbd import Address, Reader
    t0 = time.perf_counter()
    total = 0
    with Reader(Address.unix(sock, export)) as r:
        for chunk in r.read((i * GiB, SPARSE_EXTENT) for i in range(SPARSE_COUNT)):
            total += chunk.length
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": total}), flush=True)
    return 0


# ------------------------------------------------------------------ images


def sparse_image() -> Path:
    path = CACHE_DIR / "sparse-1t-v1.qcow2"
    if path.exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_DIR / f"build-{os.getpid()}.qcow2"
    common.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(TIB)])
    writes = [a for i in range(SPARSE_COUNT) for a in ("-c", f"write -q -P {1 + i % 250} {i * GiB} {SPARSE_EXTENT}")]
    common.run(["qemu-io", "-f", "qcow2", *writes, str(tmp)])
    os.chmod(tmp, 0o644)
    tmp.rename(path)
    return path


def fleet_image() -> Path:
    path = CACHE_DIR / "fleet-128m-v1.qcow2"
    if path.exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    raw = CACHE_DIR / f"build-{os.getpid()}.raw"
    tmp = CACHE_DIR / f"build-{os.getpid()}.qcow2"
    try:
        with open(raw, "wb") as f:
            f.truncate(FLEET_DISK)
            for i in range(8):  # 8 x 16 MiB, 64 MiB apart
                f.seek(i * 64 * MiB)
                f.write(os.urandom(FLEET_DATA // 8))
        common.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
        os.chmod(tmp, 0o644)
        tmp.rename(path)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------- bench


@dataclasses.dataclass
class Case(restore.Case):
    engine: list[float] = dataclasses.field(default_factory=list)  # seconds of the disk copy (records)


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.runs = 1 if opts.quick else opts.runs
        self.cases: dict[str, Case] = {}
        self.conn: Any = None
        self.doms: list[Any] = []
        self.qemu_pids: list[int] = []
        self.work: Path | None = None
        self.out: Path | None = None
        self.nbd: subprocess.Popen[str] | None = None
        self.facts: list[str] = []
        self.env: dict[str, str] = {}
        self.checked = ""

    # -- setup and teardown

    def setup(self, disks: list[Path]) -> None:
        """Work dir, outputs, one running domain per disk (copied into the work dir)."""
        import libvirt
        from guest.domain import nos_domain_xml, start_domain

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        self.conn = common.open_libvirt()
        common.remove_stale(self.conn, DOMAIN_PREFIX, WORK_PREFIX)
        self.work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=BENCH_DIR))
        os.chmod(self.work, 0o755)
        self.out = Path(tempfile.mkdtemp(prefix="vmbk-sbench-out-", dir=self.opts.out_dir or "/dev/shm"))
        tag = uuid.uuid4().hex[:6]
        for i, src in enumerate(disks):
            disk = self.work / f"disk{i:02d}.qcow2"
            common.run(["cp", "--sparse=always", str(src), str(disk)])
            os.chmod(disk, 0o644)
            name = f"{DOMAIN_PREFIX}{tag}-{i:02d}"
            self.doms.append(start_domain(self.conn, nos_domain_xml(name, [disk])))
            with contextlib.suppress(OSError, ValueError):
                self.qemu_pids.append(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()))
        common.sync_tree(self.work)
        self.vnb_dir = self.work / "virtnbdbackup"
        self.vnb_dir.mkdir()
        with contextlib.suppress(KeyError):
            import pwd
            q = pwd.getpwnam("libvirt-qemu")
            os.chown(self.vnb_dir, q.pw_uid, q.pw_gid)
        cfg = self.work / "vmbk-config"
        cfg.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "VMBK_INSTANCE")}
        self.env.update(PYTHONPYCACHEPREFIX=str(self.work / "pycache"), VMBK_CONFIG_DIR=str(cfg))
        common.run([sys.executable, "-c", "import vmbk.commands.backup, vmbk.commands.restore, vmbk.backup.disk"],
                   env=self.env, cwd=ROOT)
        print(f"{len(self.doms)} domain(s) running; outputs in {self.out}", flush=True)

    def teardown(self) -> None:
        if self.nbd is not None:
            common.stop_group(self.nbd)
        common.remove_all(self.doms, [self.work, self.out], self.conn)

    # -- helpers

    def qemu_cpu(self) -> float:
        total = 0.0
        for pid in self.qemu_pids:
            with contextlib.suppress(OSError, IndexError):
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(f[11]) + int(f[12])) / common.TICK
        return total

    def timed(self, name: str, fn: Callable[[], Proc]) -> Proc:
        c = self.cases.setdefault(name, Case(name))
        with restore.timing_lock():
            q0, m0 = self.qemu_cpu(), common.machine_cpu()
            p = fn()
            p.qemu = self.qemu_cpu() - q0
            p.others = max(0.0, common.machine_cpu() - m0 - p.qemu - p.cpu)
        c.runs.append(p)
        eng = p.result.get("engine")
        if eng is not None:
            c.engine.append(eng)
        print(f"  {name:46} {p.seconds:7.2f} s" + (f"  (disk copy {eng:.2f} s)" if eng is not None else "")
              + f"  CPU {p.cpu:5.2f} s  QEMU {p.qemu:5.2f} s  others {p.others:5.2f} s  RSS {p.rss / MiB:4.0f} MiB",
              flush=True)
        return p

    def delete_checkpoints(self) -> None:
        import libvirt
        for dom in self.doms:
            for cp in reversed(dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)):
                cp.delete(0)

    def vmbk_backup(self, root: Path, action: str, jobs: int = 1) -> Proc:
        names = ",".join(d.name() for d in self.doms)
        p = measure([str(VENV_BIN / "vmbk-backup"), "--vm", names, "--backup-path", str(root), "--json",
                     "--jobs", str(jobs)], env=self.env, fsync_dir=root)
        recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        got = [(r.get("action"), r.get("outcome")) for r in recs if r.get("type") == "backup"]
        if got != [(action, "ok")] * len(self.doms):
            raise RuntimeError(f"vmbk-backup: wanted {len(self.doms)} {action} backups, got {got}:\n"
                               f"{p.stderr[-3000:]}")
        disks = [d for r in recs if r.get("type") == "backup" for d in r.get("disks", [])]
        p.result = {"engine": sum(d.get("seconds", 0.0) for d in disks)} if len(self.doms) == 1 else {}
        return p

    def virtnbdbackup(self, dom: Any, level: str, out: Path) -> Proc:
        return measure(["virtnbdbackup", "-d", dom.name(), "-l", level, "-o", str(out), "-n",
                        "-S", str(self.vnb_dir), "-f", str(self.vnb_dir / "nbd.sock")], fsync_dir=out)

    # -- --sparse-tib

    def sparse(self) -> None:
        img = sparse_image()
        self.setup([img])
        assert self.work is not None and self.out is not None
        dom = self.doms[0]
        sock = self.work / "qemu-nbd.sock"
        self.nbd = subprocess.Popen(  # noqa: S603 -- argv, no shell
            ["qemu-nbd", "-r", "-f", "qcow2", "-x", "vda", "-k", str(sock), "-t", "--shared=8", str(img)],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)
        url = f"nbd+unix:///vda?socket={sock}"
        change = self.work / "change.bin"
        change.write_bytes(os.urandom(SPARSE_EXTENT))
        os.chmod(change, 0o644)
        data = SPARSE_COUNT * SPARSE_EXTENT
        self.facts.append(f"disk: 1 TiB virtual qcow2, {data // MiB} MiB of data in {SPARSE_COUNT} extents of "
                          f"{SPARSE_EXTENT // KiB} KiB, 1 GiB apart ({img.stat().st_blocks * 512 / MiB:.0f} MiB file)"
                          f"; inc: {SPARSE_COUNT // CHANGE_EVERY} x 64 KiB changed")

        def guest_change() -> None:
            import libvirt_qemu
            for i in range(0, SPARSE_COUNT, CHANGE_EVERY):
                reply = libvirt_qemu.qemuMonitorCommand(
                    dom, f'qemu-io -d {common.VDA_BACKEND} "write -q -s {change} {i * GiB + CHANGE_AT} '
                    f'{SPARSE_EXTENT}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
                if reply.strip():
                    raise RuntimeError(f"qemu-io in the domain said: {reply}")

        def data_alone() -> Proc:
            p = measure([sys.executable, str(Path(__file__).resolve()), "--worker", str(sock), "vda"], env=self.env)
            res = json.loads(p.stdout.strip().splitlines()[-1])
            p.seconds = res["seconds"]
            return p

        def restore_point(root: Path) -> Proc:
            assert self.out is not None
            vm_dir = root / dom.name()
            dest = self.out / "restored"
            dest.mkdir()
            p = measure([str(VENV_BIN / "vmbk-restore"), "--vm", str(vm_dir), "--restore-path", str(dest),
                         "--skip-config", "--json"], env=self.env)
            recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
            done = [r for r in recs if r.get("type") == "restore" and r.get("outcome") == "ok"]
            if not done:
                raise RuntimeError(f"vmbk-restore: {p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            p.result = {"engine": sum(r.get("seconds", 0.0) for r in recs if r.get("type") == "restore_disk")}
            c = self.cases.get(S_REST)
            if c is None or not c.checked:
                (out,) = list(dest.rglob("*.qcow2"))
                disk = dom_disk(dom)
                r = subprocess.run(["qemu-img", "compare", "-U", str(out), str(disk)], capture_output=True,
                                   text=True, check=False)
                self.checked = "same as the domain's disk" if r.returncode == 0 else \
                    f"DIFFERENT: {(r.stdout + r.stderr).strip()[:300]}"
            shutil.rmtree(dest)
            return p

        def vmbk_chain() -> None:
            assert self.out is not None
            self.delete_checkpoints()
            root = self.out / "vmbk"
            root.mkdir()
            self.timed(S_FULL, lambda: self.vmbk_backup(root, "full"))
            guest_change()
            self.timed(S_INC, lambda: self.vmbk_backup(root, "inc"))
            self.timed(S_REST, lambda: restore_point(root))
            self.cases[S_REST].checked = self.checked
            shutil.rmtree(root)

        def vnb_chain() -> None:
            assert self.out is not None
            self.delete_checkpoints()
            out = self.out / "vnb"
            self.timed(S_VFULL, lambda: self.virtnbdbackup(dom, "full", out))
            guest_change()
            self.timed(S_VINC, lambda: self.virtnbdbackup(dom, "inc", out))
            shutil.rmtree(out)

        def convert() -> None:
            assert self.out is not None
            out = self.out / "convert.qcow2"
            self.timed(S_CONV, lambda: measure(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(img),
                                                str(out)], fsync_dir=out))
            out.unlink()

        def qemu_map() -> None:
            self.timed(S_MAP, lambda: measure(["nbdinfo", "--map", url]))

        def data_step() -> None:
            self.timed(S_DATA, data_alone)

        steps: list[Callable[[], None]] = [qemu_map, data_step, vmbk_chain, vnb_chain, convert]
        for i in range(self.runs):
            print(f"run {i + 1}/{self.runs}", flush=True)
            for step in rotate(steps, i):
                step()
        self.delete_checkpoints()

    def sparse_report(self) -> None:
        self.table([S_MAP, S_DATA, S_FULL, S_INC, S_REST, S_VFULL, S_VINC, S_CONV])
        c = self.cases
        if not all(n in c and c[n].runs for n in (S_MAP, S_DATA, S_FULL, S_INC, S_REST)):
            return
        qmap, data = c[S_MAP].best.seconds, c[S_DATA].best.seconds
        share = 1 / CHANGE_EVERY  # the incremental's data, of the full's
        print("targets (the disk copy: seconds from vmbk's records, best run; bound: 1.5 x (QEMU's map + data)):")
        for name, bound in ((S_FULL, qmap + data), (S_INC, qmap + data * share), (S_REST, qmap + data)):
            eng = min(c[name].engine)
            print(f"  {'PASS' if eng <= 1.5 * bound else 'FAIL'}  {name:42} disk copy {eng:5.2f} s <= 1.5 x "
                  f"{bound:5.2f} s = {1.5 * bound:5.2f} s  (whole command {c[name].best.seconds:5.2f} s)")
        for mine, theirs in ((S_FULL, S_VFULL), (S_INC, S_VINC)):
            if c.get(theirs) and c[theirs].runs:
                print(f"  info  {mine:42} whole command {c[theirs].best.seconds / c[mine].best.seconds:5.2f}x "
                      f"faster than {theirs}")

    # -- --fleet

    def fleet(self) -> None:
        img = fleet_image()
        self.setup([img] * self.opts.vms)
        assert self.out is not None
        n = len(self.doms)
        self.facts.append(f"fleet: {n} running no-OS domains, {FLEET_DATA // MiB} MiB of random data each in a "
                          f"{FLEET_DISK // GiB} GiB qcow2; full backups")

        def vmbk(jobs: int) -> Callable[[], None]:
            def go() -> None:
                assert self.out is not None
                self.delete_checkpoints()
                root = self.out / "vmbk"
                root.mkdir()
                self.timed(F_JOBS[jobs], lambda: self.vmbk_backup(root, "full", jobs))
                shutil.rmtree(root)
            return go

        def loop() -> None:
            assert self.out is not None
            self.delete_checkpoints()
            out = self.out / "vnb"

            def each() -> Proc:
                procs = [self.virtnbdbackup(dom, "full", out / dom.name()) for dom in self.doms]
                return Proc(sum(p.seconds for p in procs), sum(p.cpu for p in procs), max(p.rss for p in procs),
                            "", "")
            self.timed(F_LOOP, each)
            shutil.rmtree(out)

        steps = [vmbk(1), vmbk(2), vmbk(4), loop]
        for i in range(self.runs):
            print(f"run {i + 1}/{self.runs}", flush=True)
            for step in rotate(steps, i):
                step()
        self.delete_checkpoints()

    def fleet_report(self) -> None:
        self.table([*F_JOBS.values(), F_LOOP])
        c = self.cases
        if not all(n in c and c[n].runs for n in (F_JOBS[1], F_JOBS[4])):
            return
        j1, j4 = c[F_JOBS[1]].best.seconds, c[F_JOBS[4]].best.seconds
        print("targets (time ratios of the best runs):")
        print(f"  {'PASS' if j1 / j4 >= 1.8 else 'FAIL'}  {F_JOBS[4]} >= 1.8x {F_JOBS[1]}: {j1 / j4:5.2f}x")
        if c.get(F_LOOP) and c[F_LOOP].runs:
            r = c[F_LOOP].best.seconds / j4
            print(f"  {'PASS' if r >= 12 else 'FAIL'}  {F_JOBS[4]} >= 12x {F_LOOP}: {r:5.2f}x")
        b = c[F_JOBS[4]].best
        cores = len(os.sched_getaffinity(0))
        print(f"  why: --jobs 4's best run used {b.cpu:.1f} s of vmbk's CPU, {b.qemu:.1f} s of the QEMUs' and "
              f"{b.others:.1f} s of the rest of the machine (libvirtd among them) in {b.seconds:.1f} s on {cores} "
              f"CPUs: {(b.cpu + b.qemu + b.others) / (b.seconds * cores):.0%} of them")
        print("  peak RSS of vmbk-backup: " + ", ".join(f"--jobs {j} {max(p.rss for p in c[n].runs) / MiB:.0f} MiB"
                                                      for j, n in F_JOBS.items() if c.get(n) and c[n].runs))

    # -- report

    def table(self, order: list[str]) -> None:
        print("\n" + "=" * 110)
        print("\n".join(self.facts))
        print(f"best of {self.runs}; CPU: the process (user+sys), QEMU: the domains' QEMUs, others: the rest "
              "of the machine, during the best run; RSS: peak of all runs")
        print(f"  {'':46} {'best s':>7} {'copy s':>7} {'CPU s':>6} {'QEMU s':>6} {'others':>6} {'RSS MiB':>7}  "
              "all runs, s")
        for name in order:
            c = self.cases.get(name)
            if c is None or not c.runs:
                continue
            b = c.best
            eng = f"{min(c.engine):7.2f}" if c.engine else f"{'':7}"
            runs = " ".join(f"{r.seconds:.2f}" for r in c.runs)
            print(f"  {name:46} {b.seconds:7.2f} {eng} {b.cpu:6.2f} {b.qemu:6.2f} {b.others:6.2f} "
                  f"{max(r.rss for r in c.runs) / MiB:7.0f}  {runs}" + (f"  [{c.checked}]" if c.checked else ""))


def dom_disk(dom: Any) -> Path:
    import xml.etree.ElementTree as ET
    src = ET.fromstring(dom.XMLDesc(0)).find("./devices/disk/source")
    assert src is not None
    return Path(src.get("file", ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sparse-tib", action="store_true", help="the 1 TiB thinly used disk")
    mode.add_argument("--fleet", action="store_true", help="N VMs through vmbk-backup --jobs 1, 2, 4")
    ap.add_argument("--vms", type=int, default=20, help="--fleet: how many domains (default 20)")
    ap.add_argument("--runs", type=int, default=3, help="runs per case, the best counts (default 3)")
    ap.add_argument("--quick", action="store_true", help="one run per case")
    ap.add_argument("--out-dir", help="where outputs go (default /dev/shm)")
    ap.add_argument("--no-page-reporting", action="store_true", help="as for run.py")
    opts = ap.parse_args(argv)
    _lock = common.start_session("scale.lock", "bench/scale.py")
    bench = Bench(opts)
    started = time.monotonic()
    bench.facts.append(common.machine_load("start"))
    code = 0
    try:
        with common.reporting_off(opts.no_page_reporting):
            try:
                bench.fleet() if opts.fleet else bench.sparse()
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                bench.teardown()
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up", file=sys.stderr)
        code = 130
    except Exception:  # noqa: BLE001 -- report what was measured
        import traceback
        traceback.print_exc()
        code = 1
    bench.facts.append(common.machine_load("end"))
    bench.facts.append(f"total bench time {time.monotonic() - started:.0f} s")
    bench.fleet_report() if opts.fleet else bench.sparse_report()
    return code


if __name__ == "__main__":
    sys.exit(main())
