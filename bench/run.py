#!/usr/bin/env python3
"""vmbk against the reference tools, measured in the same run (by hand, not a test).

    .venv/bin/python bench/run.py [--size-gib 3.5] [--quick] [--runs N]
                                  [--out-dir DIR] [--cold] [--no-keep-cache]
                                  [--only engine,file,cli] [--no-page-reporting]

Builds (once, then cached under /var/tmp/vmbk-bench/cache/) a qcow2 with
mixed content -- random data (most of it), compressible text, a
fragmented region, explicitly zeroed clusters and holes -- copies it to a
work directory, starts a no-OS domain on it and measures:

1. engine: vmbk's NBD Reader reading every allocated extent of a libvirt
   pull-mode backup export to nowhere, vs ``nbdcopy EXPORT null:``;
2. to a file: vmbk's ``backup_disk`` (a full stream, uncompressed and lz4
   level 2) vs ``nbdcopy`` into a sparse raw file and vs the whole
   ``virtnbdbackup -l full`` (``-z``: lz4 level 2, its default);
3. the whole command: ``vmbk-backup`` full, incremental after a 256 MiB
   random write into the running domain, incremental without change, vs
   ``virtnbdbackup -l full`` / ``-l inc`` on the same domain;
4. peak RSS and CPU of every process measured (GNU time), and the CPU
   the domain's QEMU and the rest of the machine used meanwhile.

Every figure is the best of N runs (3, ``--quick``: 1); runs of the cases
are interleaved in rotating order, and a run during which the rest of the
machine was busy is repeated.  See bench/README.md for what each line
means, the targets, and the noise of shared VMs (``--no-page-reporting``).

Everything is removed at the end, also on failure or Ctrl-C: the domain
(with its checkpoint metadata), the work directory and the outputs.  The
cached source image stays (``--no-keep-cache`` removes it too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

KiB, MiB, GiB = 1024, 1024**2, 1024**3
BENCH_DIR = Path(os.environ.get("VMBK_BENCH_DIR", "/var/tmp/vmbk-bench"))
CACHE_DIR = BENCH_DIR / "cache"
LAYOUT_VERSION = 2
DOMAIN_PREFIX = "vmbk-bench-"
VDA_BACKEND = "/machine/peripheral/virtio-disk0/virtio-backend"
TICK = os.sysconf("SC_CLK_TCK")
VENV_BIN = Path(sys.executable).parent


# ----------------------------------------------------------------- workers
#
# vmbk's engine runs in a child process (this script with --worker), so its
# peak RSS is its own, not that of the bench, and a crash cannot take the
# bench (and its cleanup) down.  The worker times itself after its imports
# and prints one JSON line.


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="run.py --worker")
    ap.add_argument("kind", choices=("read", "disk"))
    ap.add_argument("socket")
    ap.add_argument("export")
    ap.add_argument("--out")
    ap.add_argument("--compression", type=int)
    ap.add_argument("--connections", type=int)
    a = ap.parse_args(argv)
    from vmbk.nbd import Address, Reader

    addr = Address.unix(a.socket, a.export)
    kw = {"connections": a.connections} if a.connections else {}
    t0 = time.perf_counter()
    out: dict[str, float]
    if a.kind == "read":
        total = 0
        with Reader(addr, **kw) as r:
            conns = r.connections
            for chunk in r.read(e for e in r.extents() if not e.zero):
                if chunk.data is not None:
                    total += chunk.length
        out = {"bytes": total, "stored": 0, "connections": conns}
    else:
        from vmbk.backup.disk import DiskBackup, backup_disk

        res = backup_disk(DiskBackup(a.export, addr, "full", Path(a.out), compression=a.compression,
                                  connections=a.connections))
        out = {"bytes": res.data_size, "stored": res.stored_size}
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------ image
#
# Layout for 3.5 GiB of data in a 6 GiB disk (scaled with --size-gib, in
# MiB, in disk order).  "frag" alternates 128 KiB of random data and a
# 128 KiB hole (2048 extents in 512 MiB, like a used file system);
# "zero" is written with qemu-io 'write -z' (qcow2 zero clusters: block
# status ZERO, not data); "hole" is never written.

LAYOUT: list[tuple[str, int]] = [
    ("random", 16), ("hole", 48), ("random", 960), ("text", 256), ("hole", 256),
    ("frag", 512), ("zero", 256), ("random", 1024), ("hole", 512), ("text", 256),
    ("zero", 256), ("random", 768),
]
TAIL_HOLE = 512 * MiB  # at least this much hole at the end, then up to the next GiB
FRAG = 128 * KiB
CHANGE = 256 * MiB  # the incremental's change, inside the first large random region


@dataclasses.dataclass
class Image:
    path: Path
    virtual: int
    data: int             # bytes of data (what block status calls allocated, not zero)
    zero: int             # bytes of qcow2 zero clusters
    change_offset: int    # where the 256 MiB change of section 3 goes
    regions: dict[str, int]


def layout(size_gib: float) -> tuple[list[tuple[str, int, int]], int, int]:
    """[(kind, offset, length)], virtual size, change offset (bytes, 1 MiB aligned)."""
    data_mib = sum(n for k, n in LAYOUT if k in ("random", "text")) + sum(n for k, n in LAYOUT if k == "frag") // 2
    scale = size_gib * 1024 / data_mib
    out = []
    pos = 0
    change = None
    for kind, mib in LAYOUT:
        n = max(1, round(mib * scale)) * MiB
        if kind == "random" and change is None and n >= 2 * CHANGE:
            change = pos + n // 4 // MiB * MiB
        out.append((kind, pos, n))
        pos += n
    virtual = -(-(pos + TAIL_HOLE) // GiB) * GiB
    if change is None:
        raise SystemExit(f"--size-gib {size_gib} is too small for a {CHANGE // MiB} MiB change")
    return out, virtual, change


def _text_block(size: int) -> bytes:
    """Log-like text: compresses ~4-6x with lz4, not trivially."""
    import random
    rnd = random.Random(42)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(3, 10))) for _ in range(600)]
    lines = []
    n = 0
    i = 0
    while n < size:
        line = b"2024-%02d-%02dT%02d:%02d:%02d.%06d host%03d %s[%d]: %s id=%08x\n" % (
            1 + i % 12, 1 + i % 28, i % 24, i % 60, (i * 7) % 60, rnd.randrange(10**6), rnd.randrange(200),
            rnd.choice(words), rnd.randrange(1, 65536), b" ".join(rnd.choices(words, k=rnd.randint(4, 14))),
            rnd.getrandbits(32))
        lines.append(line)
        n += len(line)
        i += 1
    return b"".join(lines)[:size]


def build_image(size_gib: float) -> Image:
    regions, virtual, change = layout(size_gib)
    key = hashlib.sha256(json.dumps([LAYOUT_VERSION, regions, virtual]).encode()).hexdigest()[:12]
    path = CACHE_DIR / f"mixed-{size_gib:g}g-{key}.qcow2"
    facts = path.with_suffix(".json")
    totals: dict[str, int] = {}
    for kind, _, n in regions:
        totals[kind] = totals.get(kind, 0) + n
    if path.exists() and facts.exists():
        info = json.loads(facts.read_text())
        return Image(path, virtual, info["data"], info["zero"], change, totals)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for old in CACHE_DIR.glob("mixed-*"):
        old.unlink()
    raw = CACHE_DIR / f"build-{os.getpid()}.raw"
    tmp = CACHE_DIR / f"build-{os.getpid()}.qcow2"
    t0 = time.monotonic()
    print(f"building the source image ({size_gib:g} GiB of data in {virtual / GiB:.0f} GiB), cached as {path} ...",
          flush=True)
    try:
        text = _text_block(8 * MiB)
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, virtual)
            jobs: list[tuple[int, int, str]] = []
            for kind, off, n in regions:
                if kind == "random":
                    jobs += [(o, min(16 * MiB, off + n - o), "r") for o in range(off, off + n, 16 * MiB)]
                elif kind == "frag":
                    jobs += [(o, FRAG, "r") for o in range(off, off + n, 2 * FRAG)]
                elif kind == "text":
                    jobs += [(o, min(len(text), off + n - o), "t") for o in range(off, off + n, len(text))]

            def write(job: tuple[int, int, str]) -> None:
                o, n, k = job
                # os.urandom releases the GIL: two threads, two cores
                os.pwrite(fd, os.urandom(n) if k == "r" else text[:n], o)

            with ThreadPoolExecutor(2) as ex:
                list(ex.map(write, jobs))
        finally:
            os.close(fd)
        run(["qemu-img", "convert", "-q", "-W", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
        raw.unlink()
        zeros = [c for kind, off, n in regions if kind == "zero" for c in ("-c", f"write -q -z {off} {n}")]
        run(["qemu-io", "-f", "qcow2", *zeros, str(tmp)])
        data, zero = measure_map(tmp)
        facts.write_text(json.dumps({"data": data, "zero": zero, "regions": regions}))
        os.chmod(tmp, 0o644)
        tmp.rename(path)
    finally:
        for p in (raw, tmp):
            p.unlink(missing_ok=True)
    print(f"  built in {time.monotonic() - t0:.0f} s", flush=True)
    return Image(path, virtual, data, zero, change, totals)


def measure_map(path: Path) -> tuple[int, int]:
    """(data bytes, zero-cluster bytes) from qemu-img map."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
                         check=True, capture_output=True, text=True).stdout
    data = zero = 0
    for e in json.loads(out):
        if e["data"]:
            data += e["length"]
        elif e["zero"] and e.get("offset") is None and e.get("present", True) and e["depth"] == 0:
            zero += e["length"]
    return data, zero


# ----------------------------------------------------------------- helpers


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        return subprocess.run(argv, check=kw.pop("check", True), **kw)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"{' '.join(argv)} failed ({e.returncode}):\n{e.stdout}\n{e.stderr}") from None


@dataclasses.dataclass
class Proc:
    seconds: float     # wall time (for workers: as they measured it)
    cpu: float         # user + system of the process (and its children it waited for)
    rss: int           # peak RSS, bytes
    stdout: str
    stderr: str
    qemu: float = 0.0  # CPU seconds of the domain's QEMU meanwhile
    others: float = 0.0  # CPU seconds of everything else on the machine meanwhile
    result: dict[str, Any] = dataclasses.field(default_factory=dict)


TIME = "/usr/bin/time"


def stop_group(p: subprocess.Popen[str]) -> None:
    """SIGTERM the process group of p, SIGKILL after 10 s, reap p."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def measure(argv: list[str], env: dict[str, str] | None = None, fsync_dir: Path | None = None) -> Proc:
    """Run argv to completion; wall time (+ fsync of what it wrote), CPU, peak RSS.

    CPU and peak RSS come from /usr/bin/time (GNU time), not from our own
    wait4: a child's ru_maxrss starts at its parent's high-water mark at
    fork/exec, so the bench's size would hide a small process's.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", prefix="vmbk-bench-time-") as tf:
        wrapped = [TIME, "-f", "%e %U %S %M", "-o", tf.name, *argv] if os.path.exists(TIME) else argv
        t0 = time.perf_counter()
        # its own session: a Ctrl-C reaches us only, and we stop the whole group
        p = subprocess.Popen(wrapped, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, text=True,
                             start_new_session=True)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            stop_group(p)
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode == 0 and fsync_dir is not None:
            sync_tree(fsync_dir)
        secs = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        cpu, rss = ru.ru_utime + ru.ru_stime, ru.ru_maxrss * KiB
        if wrapped is not argv:
            last = tf.read().strip().splitlines()[-1:]
            with contextlib.suppress(ValueError, IndexError):
                _, user, system, kib = last[0].split()
                cpu, rss = float(user) + float(system), int(kib) * KiB
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return Proc(secs, cpu, rss, stdout, stderr)


def sync_tree(path: Path) -> None:
    """fsync every file under path: what the tools wrote is durable before the clock stops."""
    targets = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in targets:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def machine_cpu() -> float:
    """CPU seconds the machine's processes and kernel used so far (user, nice, system, irq, softirq)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "not installed"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


# ---------------------------------------------------------------- results

# Names of the cases, in the order of the table; the vmbk line each
# reference line is compared with; the targets.
R_VMBK, R_VMBK1 = "vmbk Reader, default conns -> null", "vmbk Reader --connections=1 -> null"
R_COPY, R_COPY1 = "nbdcopy URL null: (default: 4 conns)", "nbdcopy --connections=1 URL null:"
F_VMBK, F_VMBKZ = "vmbk backup_disk full stream", "vmbk backup_disk full stream, lz4 level 2"
F_COPY, F_VNB, F_VNBZ = "nbdcopy URL sparse.raw", "virtnbdbackup -l full (whole command)", \
    "virtnbdbackup -l full -z (whole command)"
F_DD = "(floor) dd the same bytes from /dev/zero"
C_FULL, C_INC, C_INC0 = "vmbk-backup full", "vmbk-backup inc, 256 MiB changed", "vmbk-backup inc, no change"
V_FULL, V_INC, V_INC0 = "virtnbdbackup -l full", "virtnbdbackup -l inc, 256 MiB changed", \
    "virtnbdbackup -l inc, no change"

SECTIONS = {
    "1.read": "1. engine: read every data extent of the pull-mode export, throw it away",
    "2.file": "2. export -> one file (fsync included)",
    "3.cli": "3. whole commands on the running domain (job, checkpoint, streams, side files)",
}
ORDER = [("1.read", n) for n in (R_VMBK, R_COPY, R_VMBK1, R_COPY1)] + \
    [("2.file", n) for n in (F_VMBK, F_COPY, F_VNB, F_DD, F_VMBKZ, F_VNBZ)] + \
    [("3.cli", n) for n in (C_FULL, V_FULL, C_INC, V_INC, C_INC0, V_INC0)]
VS = {  # reference -> the vmbk line it is compared with
    R_COPY: R_VMBK, R_COPY1: R_VMBK1, F_COPY: F_VMBK, F_VNB: F_VMBK, F_DD: F_VMBK, F_VNBZ: F_VMBKZ,
    V_FULL: C_FULL, V_INC: C_INC, V_INC0: C_INC0,
}
TARGETS = [  # (vmbk line, reference line, vmbk must be at least this many times faster)
    (R_VMBK, R_COPY, 1.0), (R_VMBK1, R_COPY1, 1.0), (F_VMBK, F_COPY, 1.0), (F_VMBK, F_VNB, 3.0),
    (F_VMBKZ, F_VNBZ, 3.0), (C_FULL, V_FULL, 3.0), (C_FULL, F_COPY, 1.0), (C_INC0, V_INC0, 3.0),
]  # (C_FULL, F_COPY): the whole command, job and side files included, against nbdcopy's copy alone
BUSY = 0.35      # a run (section 3: a chain) is repeated if others kept more than this much of a core busy
RETRIES = 2      # at most this many times per run
RETRY_BUDGET = 90.0  # seconds of repeated runs per bench at most

RSS_TARGETS = [("engine (Reader, backup_disk)", [R_VMBK, R_VMBK1, F_VMBK, F_VMBKZ], 150),
               ("vmbk-backup", [C_FULL, C_INC, C_INC0], 200)]


@dataclasses.dataclass
class Case:
    section: str
    name: str
    nbytes: int = 0                 # what MB/s is of (0: show seconds only)
    runs: list[Proc] = dataclasses.field(default_factory=list)
    stored: int = 0

    @property
    def best(self) -> Proc:
        return min(self.runs, key=lambda r: r.seconds)

    @property
    def rate(self) -> float:
        return self.nbytes / self.best.seconds / 1e6 if self.nbytes else 0.0

    @property
    def rss(self) -> int:
        return max(r.rss for r in self.runs)


# ------------------------------------------------------------------ bench


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.runs = 1 if opts.quick else opts.runs
        self.cases: dict[str, Case] = {name: Case(section, name) for section, name in ORDER}
        self.dom: Any = None
        self.conn: Any = None
        self.job: Any = None
        self.name = ""
        self.work: Path | None = None
        self.out: Path | None = None
        self.image: Image | None = None
        self.qemu_pid: int | None = None
        self.facts: list[str] = []
        self.notes: list[str] = []
        self.overhead: list[float] = []
        self.retries = 0
        self.retry_budget = RETRY_BUDGET
        self.busy_log: list[float] = []

    # -- bookkeeping

    def timed(self, name: str, fn: Callable[[], Proc], nbytes: int = 0,
              stored: Callable[[], int] | None = None, retry: Callable[[], None] | None = None) -> Proc:
        """One timed run of a case: fn() runs it and returns its Proc.

        With ``retry`` (it undoes the run: removes its output), a run during
        which the rest of the machine kept more than BUSY of a core busy is
        done again, at most RETRIES times and while the retry budget lasts;
        every run counts (the best is what the table shows).
        """
        c = self.cases[name]
        c.nbytes = nbytes
        for attempt in range(RETRIES + 1):
            if self.opts.cold:
                drop_caches()
            q0, m0 = self.qemu_cpu(), machine_cpu()
            proc = fn()
            proc.qemu = self.qemu_cpu() - q0
            proc.others = max(0.0, machine_cpu() - m0 - proc.qemu - proc.cpu)
            c.runs.append(proc)
            if stored is not None:
                c.stored = stored()
            busy = proc.others / max(proc.seconds, 1e-3)
            self.busy_log.append(busy)
            rate = f"{nbytes / proc.seconds / 1e6:6.0f} MB/s" if nbytes else " " * 11
            print(f"  {name:46} {proc.seconds:7.2f} s {rate}  CPU {proc.cpu:5.2f} s  QEMU {proc.qemu:5.2f} s  "
                  f"others {proc.others:5.2f} s  RSS {proc.rss / MiB:4.0f} MiB", flush=True)
            if retry is None or busy <= BUSY or attempt == RETRIES or self.retry_budget <= 0:
                break
            self.retries += 1
            self.retry_budget -= proc.seconds
            print(f"    the rest of the machine kept {busy:.0%} of a core busy: again", flush=True)
            retry()
        return proc

    def qemu_cpu(self) -> float:
        if self.qemu_pid is None:
            return 0.0
        try:
            f = Path(f"/proc/{self.qemu_pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(f[11]) + int(f[12])) / TICK

    # -- setup and teardown

    def setup(self) -> None:
        import libvirt
        from guest.domain import nos_domain_xml, start_domain

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        self.conn = open_libvirt()
        self.cleanup_stale()
        self.image = img = build_image(self.opts.size_gib)
        self.work = Path(tempfile.mkdtemp(prefix="work-", dir=BENCH_DIR))
        os.chmod(self.work, 0o755)
        out_base = Path(self.opts.out_dir) if self.opts.out_dir else default_out_base()
        out_base.mkdir(parents=True, exist_ok=True)
        self.out = Path(tempfile.mkdtemp(prefix="vmbk-bench-out-", dir=out_base))
        if self.opts.no_page_reporting:
            self.warm_memory(2 * img.data + GiB)
        disk = self.work / "vda.qcow2"
        t0 = time.monotonic()
        run(["cp", "--sparse=always", str(img.path), str(disk)])
        sync_tree(disk)  # so that no writeback of the copy runs during the measurements
        os.chmod(disk, 0o644)
        print(f"work copy of the image made in {time.monotonic() - t0:.1f} s: {disk}", flush=True)
        # 256 MiB of random data for the incrementals' change; QEMU reads it
        self.change_file = self.work / "change.bin"
        with open(self.change_file, "wb") as f:
            f.writelines(os.urandom(16 * MiB) for _ in range(CHANGE // (16 * MiB)))
        os.chmod(self.change_file, 0o644)
        self.name = f"{DOMAIN_PREFIX}{uuid.uuid4().hex[:8]}"
        self.dom = start_domain(self.conn, nos_domain_xml(self.name, [disk]))
        with contextlib.suppress(OSError, ValueError):
            self.qemu_pid = int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())
        print(f"domain {self.name} running (type {domain_type()}), QEMU pid {self.qemu_pid}", flush=True)
        # virtnbdbackup's scratch file and socket: QEMU must create files there
        self.vnb_dir = self.work / "virtnbdbackup"
        self.vnb_dir.mkdir()
        with contextlib.suppress(KeyError):
            import pwd
            q = pwd.getpwnam("libvirt-qemu")
            os.chown(self.vnb_dir, q.pw_uid, q.pw_gid)
        # vmbk-backup: no configuration file, so the built-in defaults (uncompressed)
        self.cfg_dir = self.work / "vmbk-config"
        self.cfg_dir.mkdir()
        # vmbk's processes keep their bytecode (outside the tree), as an installed
        # package does: PYTHONDONTWRITEBYTECODE=1 would compile every module at
        # every start (~0.05-0.1 s of a 0.4 s incremental)
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "VMBK_INSTANCE")}
        self.env.update(PYTHONPYCACHEPREFIX=str(self.work / "pycache"), VMBK_CONFIG_DIR=str(self.cfg_dir))
        run([sys.executable, "-c", "import vmbk.commands.backup, vmbk.backup.disk"], env=self.env, cwd=ROOT)

    def warm_memory(self, size: int) -> None:
        """Write and delete a file of ``size`` bytes in the output directory.

        Memory the hypervisor took back (free page reporting, before it was
        turned off) costs a host page fault per page at its next use; with
        reporting off, memory used once stays backed: so use it once now.
        """
        assert self.out is not None
        avail = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))) * KiB
        size = min(size, avail // 2) // MiB
        t0 = time.monotonic()
        tmp = self.out / "warm"
        run(["dd", "if=/dev/zero", f"of={tmp}", "bs=1M", f"count={size}", "status=none"])
        tmp.unlink()
        print(f"memory warmed: {size} MiB written and freed in {time.monotonic() - t0:.1f} s", flush=True)

    def cleanup_stale(self) -> None:
        remove_stale(self.conn, DOMAIN_PREFIX, "work-")

    def teardown(self) -> None:
        from guest.domain import remove_domain
        errors = []
        if self.job is not None:
            with contextlib.suppress(Exception):
                self.job.end()
        if self.dom is not None:
            try:
                remove_domain(self.dom)
            except Exception as e:  # noqa: BLE001
                errors.append(f"domain: {e}")
        for p in (self.work, self.out):
            if p is not None:
                shutil.rmtree(p, ignore_errors=True)
        if not self.opts.keep_cache:
            shutil.rmtree(CACHE_DIR, ignore_errors=True)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        if errors:
            print("cleanup problems: " + "; ".join(errors), file=sys.stderr)

    # -- libvirt helpers

    def delete_checkpoints(self) -> None:
        """Both tools name checkpoints virtnbdbackup.N: each chain starts from none."""
        import libvirt
        cps = self.dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
        for cp in reversed(cps):  # leaves first
            cp.delete(0)

    def guest_write(self) -> None:
        """256 MiB of random data into the running domain's disk, as a guest would write it.

        Through the device's BlockBackend, so the dirty bitmaps see it
        (tests/integration/test_testbed.py); ``-s FILE`` takes the data
        from a file of random bytes.
        """
        import libvirt_qemu
        assert self.image is not None
        reply = libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d {VDA_BACKEND} "write -q -s {self.change_file} {self.image.change_offset} '
            f'{CHANGE}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if reply.strip():
            raise RuntimeError(f"qemu-io in the domain said: {reply}")

    @contextlib.contextmanager
    def backup_job(self) -> Iterator[Path]:
        """A pull-mode backup job of vda (no checkpoint); yields its NBD socket."""
        from vmbk.virt.backupjob import BackupJob, job_dir
        with job_dir("bench-") as d:
            sock = d / "nbd.sock"
            job = BackupJob(self.dom, socket=sock, disks=["vda"], scratch_dir=d, checkpoint=None, parent=None)
            job.begin()
            self.job = job
            try:
                deadline = time.monotonic() + 30
                while not sock.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no NBD socket {sock}")
                    time.sleep(0.02)
                yield sock
            finally:
                job.end()
                self.job = None
                self.wait_no_job()

    def wait_no_job(self) -> None:
        import libvirt
        deadline = time.monotonic() + 30
        while self.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- sections 1 and 2: one pull-mode export, vmbk's engine vs nbdcopy

    def worker(self, *args: str) -> Proc:
        p = measure([sys.executable, str(Path(__file__).resolve()), "--worker", *args], env=self.env)
        res = json.loads(p.stdout.strip().splitlines()[-1])
        self.overhead.append(p.seconds - res["seconds"])
        p.seconds = res["seconds"]
        p.result = res
        return p

    def sections_engine_and_file(self) -> None:
        assert self.out is not None and self.image is not None
        engine, tofile = "engine" in self.opts.only, "file" in self.opts.only
        print("\nsections 1-2: a libvirt pull-mode backup job of vda (no checkpoint), export 'vda'", flush=True)
        with self.backup_job() as sock:
            url = f"nbd+unix:///vda?socket={sock}"
            raw_out = self.out / "sparse.raw"
            stream_out = self.out / "vda.full.data"
            # Untimed warm-up: the image is read once into the page cache, the
            # output file system has seen a file of this size.
            w = self.worker("disk", str(sock), "vda", "--out", str(stream_out))
            self.clean_out(raw_out, stream_out)
            data = w.result["bytes"]
            if data != self.image.data:
                self.notes.append(f"NB: the export has {data} bytes of data, qemu-img map said {self.image.data}")
            self.export_data = data
            w = self.worker("read", str(sock), "vda")
            self.notes.append(f"export: vmbk's Reader opened {w.result['connections']} connection(s) "
                              f"(QEMU advertises multi-conn: {'yes' if w.result['connections'] > 1 else 'no'})")

            def nbdcopy_file() -> Proc:
                # a fresh sparse file of the disk's size is all zeroes, as a new stream file is empty
                fd = os.open(raw_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.ftruncate(fd, self.image.virtual)  # type: ignore[union-attr]
                os.close(fd)
                return measure(["nbdcopy", "--destination-is-zero", url, str(raw_out)], fsync_dir=raw_out)

            def disk(*extra: str) -> Callable[[], Proc]:
                return lambda: self.worker("disk", str(sock), "vda", "--out", str(stream_out), *extra)

            def stream_size() -> int:
                return stream_out.stat().st_size

            reads = [
                (R_VMBK, lambda: self.worker("read", str(sock), "vda"), None),
                (R_COPY, lambda: measure(["nbdcopy", url, "null:"]), None),
                (R_VMBK1, lambda: self.worker("read", str(sock), "vda", "--connections", "1"), None),
                (R_COPY1, lambda: measure(["nbdcopy", "--connections=1", url, "null:"]), None),
            ]
            writes = [
                (F_VMBK, disk(), stream_size),
                (F_COPY, nbdcopy_file, lambda: raw_out.stat().st_blocks * 512),
                (F_DD, lambda: measure(["dd", "if=/dev/zero", f"of={raw_out}", "bs=1M", f"count={data // MiB}",
                                        "conv=fsync", "status=none"]), None),
                (F_VMBKZ, disk("--compression", "2"), stream_size),
            ]
            for i in range(self.runs):
                print(f"run {i + 1}/{self.runs}", flush=True)
                # each run starts with another case: no case always follows the same one
                for name, fn, stored in rotate(reads if engine else [], i) + rotate(writes if tofile else [], i):
                    self.timed(name, fn, data, stored=stored, retry=lambda: self.clean_out(raw_out, stream_out))
                    self.clean_out(raw_out, stream_out)

    @staticmethod
    def clean_out(*paths: Path) -> None:
        for p in paths:
            p.unlink(missing_ok=True)
            Path(f"{p}.chksum").unlink(missing_ok=True)

    # -- sections 2 (virtnbdbackup) and 3: whole commands on the same domain

    def vmbk_backup(self, root: Path, action: str) -> Callable[[], Proc]:
        def go() -> Proc:
            p = measure([str(VENV_BIN / "vmbk-backup"), "--vm", self.name, "--backup-path", str(root), "--json"],
                        env=self.env, fsync_dir=root)
            recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
            backups = [r for r in recs if r.get("type") == "backup"]
            if len(backups) != 1 or backups[0].get("outcome") != "ok":
                raise RuntimeError(f"vmbk-backup did not back up: {p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            if backups[0].get("action") != action:
                raise RuntimeError(f"vmbk-backup made a {backups[0].get('action')!r} backup, not {action!r}")
            p.result = backups[0]
            return p
        return go

    def virtnbdbackup(self, level: str, out: Path, *extra: str) -> Callable[[], Proc]:
        argv = ["virtnbdbackup", "-d", self.name, "-l", level, "-o", str(out), "-n",
                "-S", str(self.vnb_dir), "-f", str(self.vnb_dir / "nbd.sock"), *extra]
        return lambda: measure(argv, fsync_dir=out)

    def section_cli(self) -> None:
        assert self.out is not None and self.image is not None
        data = getattr(self, "export_data", self.image.data)
        root, vout = self.out / "vmbk", self.out / "virtnbdbackup"
        print("\nsections 2-3: whole commands on the running domain, one chain after the other", flush=True)

        def vmbk_chain() -> None:
            self.delete_checkpoints()
            root.mkdir()
            self.timed(C_FULL, self.vmbk_backup(root, "full"), data, stored=lambda: data_files(root))
            self.guest_write()
            self.timed(C_INC, self.vmbk_backup(root, "inc"), CHANGE)
            self.timed(C_INC0, self.vmbk_backup(root, "inc"))
            shutil.rmtree(root)

        def vnb_chain() -> None:
            self.delete_checkpoints()
            p = self.timed(V_FULL, self.virtnbdbackup("full", vout), data, stored=lambda: data_files(vout))
            f = self.cases[F_VNB]  # the same run, also shown in section 2
            f.runs.append(p)
            f.nbytes, f.stored = data, self.cases[V_FULL].stored
            self.guest_write()
            self.timed(V_INC, self.virtnbdbackup("inc", vout), CHANGE)
            self.timed(V_INC0, self.virtnbdbackup("inc", vout))
            shutil.rmtree(vout)

        def vnb_z() -> None:
            self.delete_checkpoints()
            self.timed(F_VNBZ, self.virtnbdbackup("full", vout, "-z"), data, stored=lambda: data_files(vout))
            shutil.rmtree(vout)

        chains = [vmbk_chain, vnb_chain] + ([vnb_z] if "file" in self.opts.only else [])
        for i in range(self.runs):
            print(f"run {i + 1}/{self.runs}", flush=True)
            for chain in rotate(chains, i):
                # a chain is stateful: when the machine was busy during one of its
                # steps, the whole chain runs once more (all its runs count)
                for attempt in range(2):
                    mark, t0 = len(self.busy_log), time.monotonic()
                    chain()
                    worst = max(self.busy_log[mark:], default=0.0)
                    if worst <= BUSY or attempt == 1 or self.retry_budget <= 0:
                        break
                    self.retries += 1
                    self.retry_budget -= time.monotonic() - t0
                    print(f"    the rest of the machine kept {worst:.0%} of a core busy: the chain again", flush=True)
        self.delete_checkpoints()

    # -- report

    def report(self) -> None:
        width = 122
        print("\n" + "=" * width)
        print("\n".join(self.facts + self.notes))
        if self.retries:
            print(f"{self.retries} run(s) or chain(s) were repeated because the rest of the machine was busy "
                  f"(> {BUSY:.0%} of a core; all runs count, the best is shown)")
        if self.overhead:
            self.overhead.sort()
            print(f"vmbk engine lines are timed inside the worker (connect .. last byte); its interpreter start "
                  f"and imports, {self.overhead[len(self.overhead) // 2]:.2f} s (median), are not counted")
        print(f"best of {self.runs} run(s); MB/s: bytes of data (allocated, not zero; inc: the 256 MiB changed) "
              "per second; 'vs vmbk': this line's time / vmbk's time (>1: vmbk is faster); CPU: the client "
              "process (user+sys), QEMU: the domain's QEMU, others: the rest of the machine, all during the "
              "best run; RSS: peak of all runs")
        print("-" * width)
        print(f"  {'':46} {'best s':>7} {'MB/s':>6} {'vs vmbk':>8} {'CPU s':>6} {'QEMU s':>6} {'others':>6} "
              f"{'RSS MiB':>7} {'written':>9}  {'all runs, s'}")
        for section, title in SECTIONS.items():
            cases = [c for c in self.cases.values() if c.section == section and c.runs]
            if not cases:
                continue
            print(title)
            for c in cases:
                b = c.best
                ref = self.cases.get(VS.get(c.name, ""))
                vs = f"{b.seconds / ref.best.seconds:7.2f}x" if ref is not None and ref.runs else ""
                rate = f"{c.rate:6.0f}" if c.nbytes else f"{'-':>6}"
                stored = f"{c.stored / MiB:7.0f}Mi" if c.stored else ""
                runs = " ".join(f"{r.seconds:.2f}" for r in c.runs)
                print(f"  {c.name:46} {b.seconds:7.2f} {rate} {vs:>8} {b.cpu:6.2f} {b.qemu:6.2f} {b.others:6.2f} "
                      f"{c.rss / MiB:7.0f} {stored:>9}  {runs}")
        parts = []
        for name in (C_FULL, C_INC, C_INC0):
            c = self.cases[name]
            if c.runs and c.best.result.get("disks"):
                disk = sum(d.get("seconds", 0.0) for d in c.best.result["disks"])
                parts.append(f"{name.removeprefix('vmbk-backup ')}: {disk:.2f} of {c.best.seconds:.2f} s")
        if parts:
            print("  vmbk-backup's disk copy (backup_disk, seconds from its record) in its best runs: "
                  + "; ".join(parts))
        print("-" * width)
        print("targets (time: reference best s / vmbk best s; CPU: the same with the least client + QEMU CPU "
              "seconds of any run, less sensitive to a busy machine):")
        for mine, theirs, want in TARGETS:
            va, vb = self.cases[mine], self.cases[theirs]
            if not (va.runs and vb.runs):
                continue
            r = vb.best.seconds / va.best.seconds
            cpu = min(x.cpu + x.qemu for x in vb.runs) / max(1e-3, min(x.cpu + x.qemu for x in va.runs))
            print(f"  {'PASS' if r >= want else 'FAIL'}  {mine:42} >= {want:g}x {theirs:40} time {r:5.2f}x"
                  f"  CPU {cpu:5.2f}x")
        _floor_targets(self.cases)
        for label, names, limit in RSS_TARGETS:
            measured = [self.cases[n] for n in names if self.cases[n].runs]
            if measured:
                peak = max(m.rss for m in measured)
                print(f"  {'PASS' if peak < limit * MiB else 'FAIL'}  peak RSS of {label:30} < {limit} MiB"
                      f"{'':35} {peak / MiB:5.0f} MiB")


def _floor_targets(cases: dict[str, Case]) -> None:
    """Issue #22's: the full <= 1.25x the machine's floor, lz4 <= 1.5x uncompressed; with what the CPU says."""
    full, z, dd = cases[F_VMBK], cases[F_VMBKZ], cases[F_DD]
    reads = [cases[n].best.seconds for n in (R_VMBK, R_COPY) if cases[n].runs]
    cores = len(os.sched_getaffinity(0))
    if full.runs and dd.runs and reads:
        floor = max(dd.best.seconds, min(reads))
        r = full.best.seconds / floor
        b = full.best
        print(f"  {'PASS' if r <= 1.25 else 'FAIL'}  {F_VMBK:42} <= 1.25x the floor (max of the export read to "
              f"null and dd: {floor:.2f} s)  {r:5.2f}x")
        print(f"        its best run: client {b.cpu:.2f} s + QEMU {b.qemu:.2f} s of CPU = at least "
              f"{(b.cpu + b.qemu) / cores:.2f} s on {cores} CPUs (the floor counts neither side's CPU)")
    if full.runs and z.runs:
        r = z.best.seconds / full.best.seconds
        print(f"  {'PASS' if r <= 1.5 else 'FAIL'}  {F_VMBKZ:42} <= 1.5x {F_VMBK}  {r:5.2f}x  (CPU "
              f"{min(x.cpu for x in z.runs) / max(1e-3, min(x.cpu for x in full.runs)):.2f}x)")


def rotate(items: list[Any], n: int) -> list[Any]:
    """items, starting at the n-th (cyclically)."""
    if not items:
        return []
    n %= len(items)
    return items[n:] + items[:n]


def data_files(path: Path) -> int:
    """Bytes in the backup's .data files (streams), what a tool wrote of the disk."""
    return sum(p.stat().st_size for p in path.rglob("*.data"))


# -------------------------------------------------------------------- main


def remove_stale(conn: Any, domain_prefix: str, work_prefix: str) -> None:
    """Domains and work dirs of an earlier bench that died (we hold the bench lock)."""
    from guest.domain import remove_domain
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(domain_prefix):
            print(f"removing stale domain {dom.name()}", flush=True)
            with contextlib.suppress(Exception):
                remove_domain(dom)
    for p in BENCH_DIR.glob(f"{work_prefix}*"):
        shutil.rmtree(p, ignore_errors=True)


def remove_all(doms: list[Any], paths: list[Path | None], conn: Any) -> None:
    """A bench's cleanup: its domains (metadata included), its directories, its libvirt connection."""
    from guest.domain import remove_domain
    for dom in doms:
        try:
            remove_domain(dom)
        except Exception as e:  # noqa: BLE001
            print(f"cleanup: domain: {e}", file=sys.stderr)
    for p in paths:
        if p is not None:
            shutil.rmtree(p, ignore_errors=True)
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def open_libvirt() -> Any:
    import libvirt
    try:
        return libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        script = ROOT / "scripts" / "start-libvirtd"
        if script.exists():
            subprocess.run([str(script)], check=False)
        return libvirt.open("qemu:///system")


def domain_type() -> str:
    from vmbk.virt.host import domain_type as dt
    return dt()


def default_out_base() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir():
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 12 * GiB:
            return shm
    return BENCH_DIR


def machine_load(when: str) -> str:
    """Load average, and how busy the CPUs are over one second: others may use the machine."""
    def ticks() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait
    t0, i0 = ticks()
    time.sleep(1.0)
    t1, i1 = ticks()
    busy = 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))
    la = os.getloadavg()
    return f"load at {when}: load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; CPUs {busy:.0f}% busy over 1 s"


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def page_reporting() -> str | None:
    """The order of free page reporting (virtio-balloon), None without it.

    With reporting, freed memory goes back to the hypervisor; the next
    write into it (page cache, tmpfs) takes a host page fault per page:
    on this kind of VM a 3.5 GB file written into such memory costs
    ~2-4 s more of system time than into memory that was just used.
    """
    feats = list(Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features"))
    on = any(len(t := f.read_text().strip()) > 5 and t[5] == "1" for f in feats)
    if not on or not PAGE_REPORTING.exists():
        return None
    return PAGE_REPORTING.read_text().strip()


@contextlib.contextmanager
def reporting_off(enabled: bool) -> Iterator[str | None]:
    """Free page reporting off while the bench runs when ``enabled`` (--no-page-reporting), restored after;
    yields the setting found (None: no reporting on this machine)."""
    reporting = page_reporting()
    if reporting is not None and enabled:
        PAGE_REPORTING.write_text("11\n")  # above the largest buddy order: nothing is reported
    try:
        yield reporting
    finally:
        if reporting is not None and enabled:
            PAGE_REPORTING.write_text(f"{reporting}\n")


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of a bench on this one's image and domain (bench/trust.py, bench/remote.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=3.5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir")
    ap.add_argument("--no-page-reporting", action="store_true")
    return ap


def print_cases(bench: Bench, width: int) -> dict[str, float]:
    """The facts, notes and a line per case (best, MB/s, CPU, every run); the best seconds by case."""
    print("\n" + "\n".join(bench.facts + bench.notes))
    print(f"\n{'line':{width}} {'best s':>7} {'MB/s':>6} {'CPU s':>6}  runs")
    for c in bench.cases.values():
        if c.runs:
            runs = " ".join(f"{r.seconds:.2f}" for r in c.runs)
            print(f"{c.name:{width}} {c.best.seconds:7.2f} {c.rate:6.0f} {c.best.cpu:6.2f}  {runs}")
    return {n: c.best.seconds for n, c in bench.cases.items() if c.runs}


def run_bench(bench: Bench, body: Callable[[], None], no_page_reporting: bool) -> int:
    """setup, ``body``, teardown (also after an error or Ctrl-C), then the report; the exit code.

    For the benches built on this one's image and domain (bench/remote.py).
    """
    bench.facts.append(machine_load("start"))
    code = 0
    with reporting_off(no_page_reporting):
        try:
            bench.setup()
            body()
        except KeyboardInterrupt:
            code = 130
        except Exception:  # noqa: BLE001 -- the table of what was measured, then the error
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            bench.teardown()
    bench.facts.append(machine_load("end"))
    bench.report()
    return code


def start_session(lock_name: str, script: str) -> IO[str]:
    """Root check, SIGTERM/SIGHUP as KeyboardInterrupt (so cleanup runs), and
    the bench's lock file, held (and returned) for the life of the process."""
    if os.geteuid() != 0:
        raise SystemExit("run as root (libvirt qemu:///system, drop_caches)")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    BENCH_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    lock = open(BENCH_DIR / lock_name, "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another {script} holds {BENCH_DIR / lock_name}") from None
    return lock


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    if {"--sparse-tib", "--fleet"} & set(sys.argv[1:]):  # issue #22's cases: bench/scale.py
        import scale
        return scale.main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=3.5, help="GiB of data in the test disk (default 3.5, "
                    "in a 6 GiB disk)")
    ap.add_argument("--runs", type=int, default=3, help="runs per case, the best counts (default 3)")
    ap.add_argument("--quick", action="store_true", help="one run per case")
    ap.add_argument("--out-dir", help="where outputs are written (default: a dir on /dev/shm if it has room, "
                    "so figures show the tools, not this machine's disk)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed run "
                    "(sync; echo 3 > /proc/sys/vm/drop_caches): the source image is read from disk")
    ap.add_argument("--no-keep-cache", dest="keep_cache", action="store_false",
                    help="remove the cached source image at the end too")
    ap.add_argument("--only", default="engine,file,cli", help="sections to run: engine,file,cli")
    ap.add_argument("--no-page-reporting", action="store_true",
                    help="turn virtio-balloon free page reporting off while the bench runs (then restore it): "
                    "steadier to-file figures on a VM that has it")
    opts = ap.parse_args()
    opts.only = set(opts.only.split(","))
    _lock = start_session("lock", "bench/run.py")  # referenced: closing it would drop the lock
    bench = Bench(opts)
    started = time.monotonic()
    import platform

    import vmbk
    bench.facts += [
        (f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
         f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.0f} GiB RAM, {platform.release()}"),
        machine_load("start"),
        (f"versions: vmbk {vmbk.__version__}, python {platform.python_version()}, "
         f"{version(['qemu-system-x86_64', '--version'])}, {version(['nbdcopy', '--version'])}, "
         f"virtnbdbackup {version(['virtnbdbackup', '--version'])}"),
    ]
    reporting = page_reporting()
    if reporting is None:
        bench.facts.append("free page reporting: none")
    elif opts.no_page_reporting:
        bench.facts.append(f"free page reporting: off while the bench ran (--no-page-reporting; order {reporting} "
                           "restored after)")
    else:
        bench.facts.append("free page reporting: ON (virtio-balloon): writing into freed memory costs host page "
                           "faults, to-file times vary (see --no-page-reporting)")
    print("\n".join(bench.facts), flush=True)
    code = 0
    try:
        if reporting is not None and opts.no_page_reporting:
            PAGE_REPORTING.write_text("11\n")  # above the largest buddy order: nothing is reported
        bench.setup()
        img = bench.image
        assert img is not None
        bench.facts.append(
            f"disk: {img.virtual / GiB:.0f} GiB virtual, {img.data / GiB:.2f} GiB data "
            f"(random {(img.regions.get('random', 0) + img.regions.get('frag', 0) // 2) / GiB:.2f}, "
            f"text {img.regions.get('text', 0) / GiB:.2f}, of which {img.regions.get('frag', 0) // 2 // FRAG} "
            f"extents of {FRAG // KiB} KiB), {img.zero / GiB:.2f} GiB zero clusters, rest holes; "
            f"domain type {domain_type()}")
        bench.facts.append(
            f"outputs in {bench.out} ({fs_type(bench.out) if bench.out else '?'}); page cache "
            + ("dropped before every timed run (--cold)" if opts.cold else
               "not dropped: the source image stays cached for every tool alike (warm-up read first)"))
        if opts.only & {"engine", "file"}:
            bench.sections_engine_and_file()
        if "cli" in opts.only:
            bench.section_cli()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        code = 130
    except Exception:  # noqa: BLE001 -- report, clean up, then the table of what was measured
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.teardown()
        if reporting is not None and opts.no_page_reporting:
            PAGE_REPORTING.write_text(f"{reporting}\n")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    bench.facts.append(machine_load("end"))
    bench.facts.append(f"total bench time {time.monotonic() - started:.0f} s")
    if any(c.runs for c in bench.cases.values()):
        bench.report()
    return code


def fs_type(path: Path) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mnt, fs = line.split()[:3]
        if str(path).startswith(mnt) and len(mnt) > len(best[0]):
            best = (mnt, fs)
    return best[1]


if __name__ == "__main__":
    sys.exit(main())
