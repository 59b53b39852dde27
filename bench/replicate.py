"""vmbk-replicate against the tools it drives, on the same tree, in the same run.

    .venv/bin/python bench/replicate.py --no-page-reporting   # ~4 min: 2 runs of everything
    .venv/bin/python bench/replicate.py --quick               # 1 run, 1 GiB
    .venv/bin/python bench/replicate.py --size-gib 3 --runs 3 --rclone-sftp

A synthetic backup tree of ``--size-gib`` (two VMs; one monthly chain each:
a full of random data, two incrementals, the side and commit files; cached
under /var/tmp/vmbk-bench/replicate-tree-<size>) is copied, into a fresh
directory each time:

first replication   ``vmbk-replicate --all`` to a ``local`` destination
                    against ``rsync -a`` of the same tree; over ssh on
                    loopback (an sshd of the bench's own, its own keys)
                    against ``rsync -a -e ssh``; to an rclone ``local:``
                    remote against ``rclone copy`` (and, with
                    ``--rclone-sftp``, to the sftp remote of that sshd);
second replication  after one more incremental (``--inc-mib``, default 256
                    MiB of new random data: a stream, its checksum, its XMLs,
                    the longer .cpt) into each replica: ``vmbk-replicate
                    --all`` against ``rsync -a`` of the grown tree.

Timed: the whole process, and the fsync of what it wrote (both sides
alike).  vmbk runs with its defaults (``verify = "size"``: its listing of
the replica after each VM is in the figure).  The target: every vmbk line
at >= 0.9x the tool alone (a ratio of the best runs); the second
replication's time should follow the new bytes, not the tree.
``--no-page-reporting``: see bench/README.md, "Noise".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import orjson  # noqa: E402
import run as common  # noqa: E402  (bench/run.py: measure, page reporting, machine load, lock)
from fixtures.replication import make_sshd  # noqa: E402
from replicate_helpers import configure  # noqa: E402
from run import GiB, MiB, measure, sync_tree  # noqa: E402

from vmbk.virt.remote import AES_GCM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = common.BENCH_DIR
VMS = ("bench-a", "bench-b")
BLOCK = 64 * MiB


def random_file(path: Path, size: int, seed: bytes) -> None:
    """``size`` bytes of random data (64 MiB random blocks, each unique)."""
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        left, n = size, 0
        while left > 0:
            chunk = min(left, BLOCK)
            f.write(seed + n.to_bytes(8, "little") + block[len(seed) + 8:chunk])
            left -= chunk
            n += 1


def chain(vm_dir: Path, full: int, incs: int, inc_size: int) -> None:
    d = vm_dir / "202603"
    (d / "checkpoints").mkdir(parents=True, exist_ok=True)
    random_file(d / "vda.full.data", full, vm_dir.name.encode())
    (d / "vda.full.data.chksum").write_text("1")
    for n in range(incs + 1):
        (d / "checkpoints" / f"virtnbdbackup.{n}.xml").write_text("<domaincheckpoint/>")
        (d / f"vmconfig.virtnbdbackup.{n}.xml").write_text("<domain/>")
        (d / f"vda.virtnbdbackup.{n}.qcow.json").write_text("{}")
        if n:
            random_file(d / f"vda.inc.virtnbdbackup.{n}.data", inc_size, f"{vm_dir.name}{n}".encode())
            (d / f"vda.inc.virtnbdbackup.{n}.data.chksum").write_text("1")
    (d / f"{vm_dir.name}.cpt").write_bytes(orjson.dumps([f"virtnbdbackup.{n}" for n in range(incs + 1)]))


def tree(size_gib: float) -> Path:
    """The cached source tree: ~size_gib GiB over two VMs."""
    path = BENCH / f"replicate-tree-{size_gib:g}"
    if (path / ".done").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    total = int(size_gib * GiB)
    inc = 128 * MiB
    for vm, share in zip(VMS, (0.75, 0.25), strict=True):
        chain(path / vm, int(total * share) - 2 * inc, 2, inc)
    sync_tree(path)
    (path / ".done").write_text("")
    return path


def add_incremental(src: Path, vm: str, size: int) -> int:
    """One more incremental of ``vm``: its stream and side files, the longer .cpt; the bytes added."""
    d = src / vm / "202603"
    cpt = orjson.loads((d / f"{vm}.cpt").read_bytes())
    n = len(cpt)
    random_file(d / f"vda.inc.virtnbdbackup.{n}.data", size, f"{vm}-{n}-{time.time()}".encode())
    (d / f"vda.inc.virtnbdbackup.{n}.data.chksum").write_text("1")
    (d / "checkpoints" / f"virtnbdbackup.{n}.xml").write_text("<domaincheckpoint/>")
    (d / f"vmconfig.virtnbdbackup.{n}.xml").write_text("<domain/>")
    (d / f"vda.virtnbdbackup.{n}.qcow.json").write_text("{}")
    (d / f"{vm}.cpt").write_bytes(orjson.dumps([*cpt, f"virtnbdbackup.{n}"]))
    sync_tree(d)
    return size + 4 * 20


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.work = Path(tempfile.mkdtemp(prefix="replicate-work-", dir=BENCH))
        # SHLVL=1 in every session: bash then skips ~/.bashrc, which Debian's bash
        # otherwise reads for each ssh command (root's here runs `pyenv init`:
        # 0.08 s a session, 13 sessions a run); --root-bashrc keeps it.
        extra = () if opts.root_bashrc else ("SetEnv SHLVL=1",)
        self.sshd = make_sshd(Path(tempfile.mkdtemp(prefix="sshd-", dir=self.work)), extra)
        self.times: dict[str, list[float]] = {}
        self.rclone_conf = self.work / "rclone.conf"
        self.rclone_conf.write_text(f"[local]\ntype = local\n\n[sftp]\ntype = sftp\nhost = 127.0.0.1\n"
                                    f"port = {self.sshd.port}\nuser = root\nkey_file = {self.sshd.user_key}\n"
                                    f"known_hosts_file = {self.sshd.known_hosts}\nshell_type = unix\n"
                                    "md5sum_command = md5sum\nsha1sum_command = sha1sum\n")
        self.ssh = (f"ssh -p {self.sshd.port} -i {self.sshd.user_key} -o BatchMode=yes -o IdentitiesOnly=yes "
                    f"-o UserKnownHostsFile={self.sshd.known_hosts}")

    def close(self) -> None:
        self.sshd.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def fresh(self, name: str) -> Path:
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        return d

    def timed(self, label: str, argv: list[str], out: Path, env: dict[str, str] | None = None, *,
              record: bool = True) -> float:
        p = measure(argv, env=env, fsync_dir=out)
        if p.stderr.strip() and "vmbk" not in label:
            print(f"  ({label}: {p.stderr.strip().splitlines()[-1]})", flush=True)
        if record:
            self.times.setdefault(label, []).append(p.seconds)
            print(f"  {label:<44} {p.seconds:7.2f} s", flush=True)
        return p.seconds

    def vmbk(self, label: str, src: Path, dest: dict[str, object], out: Path, *, record: bool = True) -> float:
        cfg = configure(self.work / f"etc-{dest['name']}", [dest])
        env = {**os.environ, "VMBK_CONFIG_DIR": str(cfg), "PYTHONPATH": str(ROOT)}
        return self.timed(label, [sys.executable, str(ROOT / "bin" / "vmbk-replicate"), "--json",
                                  "--backup-path", str(src), "--all"], out, env, record=record)

    def cases(self) -> list[tuple[str, list[tuple[str, Callable[[Path, Path], list[str]]]]]]:
        """(vmbk label, [(tool label, the tool's command to copy a tree into a directory)])."""
        conf = ["rclone", "--config", str(self.rclone_conf), "copy"]
        out: list[tuple[str, list[tuple[str, Callable[[Path, Path], list[str]]]]]] = [
            ("vmbk-replicate, local", [("rsync -a (local)", lambda s, d: ["rsync", "-a", f"{s}/", f"{d}/"])]),
            ("vmbk-replicate, ssh", [
                ("rsync -a -e ssh (loopback)",
                 lambda s, d: ["rsync", "-a", "-e", self.ssh, f"{s}/", f"root@127.0.0.1:{d}/"]),
                ("rsync -a -e ssh, vmbk's cipher",
                 lambda s, d: ["rsync", "-a", "-e", f"{self.ssh} -o Ciphers=^{AES_GCM}", f"{s}/",
                               f"root@127.0.0.1:{d}/"])]),
            ("vmbk-replicate, rclone local:", [("rclone copy (local:)", lambda s, d: [*conf, f"{s}/", f"local:{d}"])]),
        ]
        if self.opts.rclone_sftp:
            out.append(("vmbk-replicate, rclone sftp:",
                        [("rclone copy (sftp:, loopback)", lambda s, d: [*conf, f"{s}/", f"sftp:{d}"])]))
        return out

    def destination(self, label: str, d: Path) -> dict[str, object]:
        if "ssh" in label:
            return self.sshd.destination("ssh", d)
        if "rclone" in label:
            remote = "sftp:" if "sftp" in label else "local:"
            return {"name": "rclone", "transport": "rclone", "remote": remote, "path": str(d),
                    "rclone_config": str(self.rclone_conf)}
        return {"name": "local", "transport": "local", "path": str(d)}

    def first(self, src: Path) -> None:
        print(f"\nfirst replication of {tree_size(src) / GiB:.2f} GiB into a fresh directory", flush=True)
        for run in range(self.opts.runs):
            for vm_label, tools in common.rotate(self.cases(), run):
                for tool_label, tool in tools:
                    d = self.fresh("tool")
                    self.timed(tool_label, tool(src, d), d)
                d = self.fresh("vmbk")
                self.vmbk(vm_label, src, self.destination(vm_label, d), d)

    def second(self, src: Path) -> None:
        """Both replicas up to date (not timed), one more incremental at the source, then timed."""
        print(f"\nsecond replication: one incremental of {self.opts.inc_mib} MiB more", flush=True)
        for run in range(self.opts.runs):
            for vm_label, tools in common.rotate(self.cases(), run):
                tool_label, tool = tools[0]
                grown = self.work / "grown"
                shutil.rmtree(grown, ignore_errors=True)
                shutil.copytree(src, grown, copy_function=os.link)  # the cached tree stays as it is
                for cpt in grown.rglob("*.cpt"):  # rewritten below: its own inode
                    data, st = cpt.read_bytes(), cpt.stat()
                    cpt.unlink()
                    cpt.write_bytes(data)
                    os.utime(cpt, ns=(st.st_atime_ns, st.st_mtime_ns))
                a, b = self.fresh("tool"), self.fresh("vmbk")
                measure(tool(grown, a), fsync_dir=a)
                self.vmbk(vm_label + " (first)", grown, self.destination(vm_label, b), b, record=False)
                added = add_incremental(grown, VMS[0], self.opts.inc_mib * MiB)
                self.timed(f"{tool_label}, +1 inc", tool(grown, a), a)
                t = self.vmbk(f"{vm_label}, +1 inc", grown, self.destination(vm_label, b), b)
                print(f"    ({added / MiB / t:.0f} MB/s of the new bytes)", flush=True)
        shutil.rmtree(self.work / "grown", ignore_errors=True)

    def report(self, size: int) -> None:
        print("\n| line | best s | MB/s | tool / vmbk |\n| --- | ---: | ---: | ---: |")
        vmbk_of = {}  # a tool line -> the vmbk line it is compared with
        for vm_label, tools in self.cases():
            for tool_label, _ in tools:
                vmbk_of[tool_label] = vm_label
            vmbk_of[f"{tools[0][0]}, +1 inc"] = f"{vm_label}, +1 inc"
        for label, runs in self.times.items():
            best = min(runs)
            mbs = "" if "+1 inc" in label else f"{size / 1e6 / best:.0f}"
            vmbk = vmbk_of.get(label)
            ratio = f"{best / min(self.times[vmbk]):.2f}x" if vmbk in self.times else ""
            print(f"| {label} | {best:.2f} | {mbs} | {ratio} |")


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=3.0)
    ap.add_argument("--inc-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 run of a 1 GiB tree")
    ap.add_argument("--rclone-sftp", action="store_true", help="also rclone over sftp (slow: ssh ciphers in Go)")
    ap.add_argument("--no-page-reporting", action="store_true")
    ap.add_argument("--root-bashrc", action="store_true",
                    help="let the far side's sessions read root's ~/.bashrc (not skipped with SHLVL=1)")
    opts = ap.parse_args()
    if opts.quick:
        opts.size_gib, opts.runs = 1.0, 1
    lock = common.start_session("replicate.lock", "replicate.py")
    started = time.monotonic()
    print(common.machine_load("start"), flush=True)
    print(f"versions: {common.version(['rsync', '--version'])}; {common.version(['rclone', 'version'])}; "
          f"{common.version(['ssh', '-V'])}", flush=True)
    reporting = common.page_reporting()
    bench = None
    try:
        if reporting is not None and opts.no_page_reporting:
            common.PAGE_REPORTING.write_text("11\n")
        src = tree(opts.size_gib)
        size = tree_size(src)
        bench = Bench(opts)
        bench.first(src)
        bench.second(src)
        print(common.machine_load("end"))
        print(f"total bench time {time.monotonic() - started:.0f} s")
        bench.report(size)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.close()
        if reporting is not None and opts.no_page_reporting:
            common.PAGE_REPORTING.write_text(f"{reporting}\n")
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
