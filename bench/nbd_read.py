#!/usr/bin/env python3
"""Measure vmbk.nbd read throughput against nbdcopy (run by hand, not a test).

    python bench/nbd_read.py [--allocated-gib 2.5] [--runs 3] [--quick]
                             [--configs 4x512K/8,1x256K/4] [--sink null|file]

Creates a qcow2 with a few allocated regions in a temp dir, exports it
with ``qemu-nbd -r --shared=8 --format=qcow2``, reads every allocated
extent with vmbk at several connection counts / request sizes / buffer
counts (``CONNSxSIZE/BUFFERS``), and copies the same export with
``nbdcopy URL null:`` (its default 4 connections, and 1).  Prints MB/s of
allocated data (best and median), CPU seconds per GB (client + qemu-nbd:
steadier than MB/s on a busy host), qemu-nbd page faults per run, the
ratio to nbdcopy, and the peak RSS of this process for the default
configuration (qemu-nbd and nbdcopy are children, not counted).

Why a fresh qemu-nbd per configuration, and runs interleaved: qemu
allocates a bounce buffer per request, and whether glibc serves it from a
warm heap or from fresh mmap'd pages (one page fault per 4 KiB, costlier
than the copy) depends on the sizes that server saw before; interleaving
spreads the noise of a shared host evenly over the configurations.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from vmbk.nbd import Address, Client, Reader  # noqa: E402
from vmbk.nbd.reader import DEFAULT_BUFFERS, DEFAULT_CONNECTIONS, DEFAULT_REQUEST_SIZE  # noqa: E402

KiB, MiB, GiB = 1024, 1024**2, 1024**3
TICK = os.sysconf("SC_CLK_TCK")
ALL = ("1x256K/4 1x512K/4 1x1M/2 1x4M/2 2x512K/4 4x256K/8 4x256K/16 4x512K/4 4x512K/8 "
       "4x896K/8 4x1M/4 4x1M/8 4x4M/8")


def make_image(path: pathlib.Path, allocated: int) -> None:
    """A 4x-larger virtual disk with 5 data regions separated by holes."""
    each = allocated // 5 // MiB * MiB
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(allocated * 4)], check=True)
    cmds = []
    for i in range(5):
        cmds += ["-c", f"write -P {0x11 * (i + 1)} {i * each * 4 + 3 * MiB} {each}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, stdout=subprocess.DEVNULL)


class Server:
    """A fresh ``qemu-nbd -r --shared=8`` for one configuration."""

    def __init__(self, image: pathlib.Path, sock: pathlib.Path) -> None:
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-r", "--persistent", "--shared=8", "--format=qcow2", f"--socket={sock}", str(image)]
        )
        self.address = Address.unix(str(sock))
        for _ in range(500):
            if sock.exists():
                return
            time.sleep(0.01)
        raise SystemExit("qemu-nbd did not start")

    def stat(self) -> tuple[int, float]:
        """(minor page faults, CPU seconds) of qemu-nbd so far."""
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[7]), (int(fields[11]) + int(fields[12])) / TICK

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def vmbk_read(addr: Address, config: tuple[int, int, int], fd: int | None) -> int:
    """Read all allocated data; to ``fd`` with pwrite if given, else drop it."""
    connections, request_size, buffers = config
    with Reader(addr, connections=connections, request_size=request_size, buffers=buffers) as r:
        total = 0
        for chunk in r.read(e for e in r.extents() if not e.zero):
            if fd is not None:
                assert chunk.data is not None
                os.pwrite(fd, chunk.data, chunk.offset)
            total += chunk.length
        return total


def nbdcopy(addr: Address, args: tuple[str, ...], out: str) -> None:
    subprocess.run(["nbdcopy", *args, addr.url, out], check=True)


def parse_config(text: str) -> tuple[int, int, int]:
    """"4x1M/8": 4 connections, 1 MiB requests, 8 buffers."""
    conns, rest = text.split("x")
    size, bufs = rest.split("/")
    return int(conns), int(size[:-1]) * {"K": KiB, "M": MiB}[size[-1].upper()], int(bufs)


def label(config: tuple[int, int, int]) -> str:
    conns, size, bufs = config
    return f"{conns}x{size // KiB}K/{bufs}" if size < MiB else f"{conns}x{size // MiB}M/{bufs}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allocated-gib", type=float, default=2.5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only the default vmbk configuration")
    ap.add_argument("--configs", help="comma-separated CONNSxSIZE/BUFFERS, e.g. 1x4M/2,4x1M/8")
    ap.add_argument("--sink", choices=("null", "file"), default="null",
                    help="file: pwrite the data to a sparse file next to the image (nbdcopy too)")
    ap.add_argument("--dir", help="where to put the image (default: a temp dir)")
    opts = ap.parse_args()

    default = (DEFAULT_CONNECTIONS, DEFAULT_REQUEST_SIZE, DEFAULT_BUFFERS)
    if opts.configs:
        configs = [parse_config(c) for c in opts.configs.split(",")]
    else:
        configs = [default] + ([] if opts.quick else [c for c in map(parse_config, ALL.split()) if c != default])

    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp:
        image = pathlib.Path(tmp, "disk.qcow2")
        out = pathlib.Path(tmp, "out.raw")
        print(f"creating {opts.allocated_gib} GiB allocated qcow2 in {tmp} ...", flush=True)
        make_image(image, int(opts.allocated_gib * GiB))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT) if opts.sink == "file" else None
        copy_out = "null:" if fd is None else str(out)
        allocated = 0

        def vmbk(config: tuple[int, int, int], addr: Address) -> None:
            assert vmbk_read(addr, config, fd) == allocated

        def copy(args: tuple[str, ...], addr: Address) -> None:
            nbdcopy(addr, args, copy_out)

        jobs: list[tuple[str, Server, Callable[[Address], None]]] = []
        for i, config in enumerate(configs):
            server = Server(image, pathlib.Path(tmp, f"s{i}"))
            jobs.append((f"vmbk {label(config)}", server, functools.partial(vmbk, config)))
        for i, args in enumerate([(), ("--connections=1",)]):
            name = "nbdcopy " + (" ".join(args) or "(4 conns)")
            jobs.append((name, Server(image, pathlib.Path(tmp, f"c{i}")), functools.partial(copy, args)))
        try:
            with Client(jobs[0][1].address) as c:
                allocated = sum(e.length for e in c.extents() if not e.zero)
                print(f"export {c.size / GiB:.1f} GiB, {allocated / GiB:.2f} GiB allocated, "
                      f"multi-conn={c.can_multi_conn}, max block {c.max_block_size}; sink {opts.sink}")
            vmbk_read(jobs[0][1].address, default, fd)  # warms the page cache; RSS of the default alone
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KiB

            times: dict[str, list[float]] = {name: [] for name, _, _ in jobs}
            cpu: dict[str, float] = dict.fromkeys(times, 0.0)
            faults: dict[str, int] = dict.fromkeys(times, 0)
            for run in range(opts.runs + 1):  # run 0: untimed warm-up of each server
                for name, server, job in jobs:
                    f0, q0 = server.stat()
                    c0 = cpu_self() + cpu_children()
                    start = time.monotonic()
                    job(server.address)
                    secs = time.monotonic() - start
                    f1, q1 = server.stat()
                    if run:
                        times[name].append(secs)
                        cpu[name] += cpu_self() + cpu_children() - c0 + q1 - q0
                        faults[name] += f1 - f0
        finally:
            for _, server, _ in jobs:
                server.stop()

        gb = allocated / 1e9
        rate = {name: gb * 1e3 / min(t) for name, t in times.items()}
        print(f"\n{'':22} {'best MB/s':>9} {'median':>7} {'CPU s/GB':>9} {'qemu faults/run':>16}")
        for name, t in times.items():
            print(f"{name:22} {rate[name]:9.0f} {gb * 1e3 / statistics.median(t):7.0f} "
                  f"{cpu[name] / opts.runs / gb:9.2f} {faults[name] // opts.runs:16d}")
        ref = rate["nbdcopy (4 conns)"]
        dname = f"vmbk {label(default)}"
        top = max((n for n in rate if n.startswith("vmbk")), key=rate.__getitem__)
        if dname in rate:
            print(f"\ndefault {dname}: {rate[dname] / ref:.2f}x nbdcopy (4 conns), "
                  f"{rate[dname] / rate['nbdcopy --connections=1']:.2f}x nbdcopy --connections=1")
        print(f"best {top}: {rate[top] / ref:.2f}x nbdcopy")
        print(f"peak RSS of this process with the default configuration: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
