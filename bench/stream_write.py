#!/usr/bin/env python3
"""Throughput of vmbk.stream.StreamWriter against plain file writes.

Run by hand:  .venv/bin/python bench/stream_write.py [--size-gib 2] [--dir /var/tmp]

Writes SIZE GiB from an in-memory buffer as data frames of FRAME_MIB
(with a zero frame between them, like a real disk map) and compares:

* raw:         os.write() of the same buffers to a plain file (the ceiling);
* adler32:     zlib.adler32 over the same bytes, no I/O (the checksum's cost);
* stream:      StreamWriter uncompressed (pwritev of header + memoryview
               in place, adler32 per frame, combined), and again with
               adler32 stubbed out;
* stream x2:   the same with every frame filled on a pool of 2 threads
               (reserve / fill / commit, as backup_disk does on the NBD
               reader's connection threads);
* stream+lz4:  StreamWriter compressed (level 2, virtnbdbackup's default),
               on incompressible and on half-zero data, serial and x2.

Each case is timed without fsync (page cache speed) and with a final
fsync, REPEAT times (best counts), the file deleted before each run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vmbk.stream.writer as writer_mod  # noqa: E402
from vmbk.stream import StreamMeta, StreamWriter  # noqa: E402

MiB = 1 << 20


def make_buffer(frame: int, kind: str) -> bytearray:
    if kind == "random":
        return bytearray(os.urandom(frame))
    # half random, half zeroes in 64 KiB stripes: compresses about 2:1
    buf = bytearray(frame)
    rnd = os.urandom(frame // 2)
    for i in range(0, frame, 128 * 1024):
        j = i // 2
        buf[i : i + 64 * 1024] = rnd[j : j + 64 * 1024]
    return buf


def bench_raw(path: str, buf: memoryview, frames: int, fsync: bool) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(frames):
            v = buf
            while v.nbytes:
                v = v[os.write(fd, v) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def bench_stream(
    path: str, buf: memoryview, frames: int, fsync: bool, compressed: bool | int, threads: int = 0
) -> tuple[float, int]:
    frame = buf.nbytes
    meta = StreamMeta(
        virtual_size=frames * frame * 2,
        data_size=frames * frame,
        disk_name="vda",
        compressed=compressed,
    )
    t = time.perf_counter()
    w = StreamWriter(path, meta)
    if threads:
        with ThreadPoolExecutor(threads) as pool:
            window = []
            for i in range(frames):
                w.reserve(2 * i * frame, frame)
                window.append(pool.submit(w.fill, 2 * i * frame, buf))
                w.write_zero((2 * i + 1) * frame, frame)
                if len(window) > 2 * threads:
                    w.commit(window.pop(0).result())
            for fut in window:
                w.commit(fut.result())
    else:
        for i in range(frames):
            w.write_data(2 * i * frame, buf)
            w.write_zero((2 * i + 1) * frame, frame)
    w.close(fsync=fsync)
    return time.perf_counter() - t, w.size


@contextlib.contextmanager
def _no_checksum() -> Iterator[None]:
    """Stub the writer's adler32, to see what the checksum costs in place."""
    real = writer_mod.adler32
    writer_mod.adler32 = lambda data, value=1: value
    try:
        yield
    finally:
        writer_mod.adler32 = real


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--frame-mib", type=int, default=32)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    args = ap.parse_args()
    frame = args.frame_mib * MiB
    frames = max(1, int(args.size_gib * 1024 / args.frame_mib))
    total = frames * frame
    path = os.path.join(args.dir, f"vmbk-bench-{os.getpid()}.data")

    def rate(seconds: float) -> str:
        return f"{total / MiB / seconds:8.0f} MB/s"

    def best(fn, *a):  # type: ignore[no-untyped-def]
        results = []
        for _ in range(args.repeat):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            results.append(fn(path, *a))
        return min(results, key=lambda r: r[0] if isinstance(r, tuple) else r)

    print(f"{total / (1 << 30):.2f} GiB in {frames} frames of {args.frame_mib} MiB, to {args.dir}")
    rnd = memoryview(make_buffer(frame, "random"))
    semi = memoryview(make_buffer(frame, "semi"))
    try:
        t = time.perf_counter()
        v = 1
        for _ in range(frames):
            v = zlib.adler32(rnd, v)
        print(f"adler32 only             {rate(time.perf_counter() - t)}")
        for fsync in (False, True):
            tag = "+fsync" if fsync else ""
            print(f"raw os.write{tag:7}      {rate(best(bench_raw, rnd, frames, fsync))}")
            secs, _ = best(bench_stream, rnd, frames, fsync, False)
            print(f"stream{tag:7}            {rate(secs)}")
            with _no_checksum():
                secs, _ = best(bench_stream, rnd, frames, fsync, False)
            print(f"stream{tag:7} no adler32 {rate(secs)}")
            secs, _ = best(bench_stream, rnd, frames, fsync, False, 2)
            print(f"stream{tag:7} x2         {rate(secs)}")
        for name, buf in (("random", rnd), ("half-zero", semi)):
            for threads in (0, 2):
                secs, size = best(bench_stream, buf, frames, False, 2, threads)
                print(
                    f"stream lz4 {name:10} {'x2' if threads else '  '} {rate(secs)}  "
                    f"(input rate; file {size / total:.2f} of input)"
                )
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    main()
