"""Helpers of the instant-access tests (--serve, --mount, --instant): synthetic chains with
their reference images, vmbk-restore as a process, and what sessions must not leave behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from vmbk.restore import marker
from vmbk.stream import StreamMeta, write_stream_atomic

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def chain_tree(chain: Path, vm: str, *, points: int = 3, disks: tuple[str, ...] = ("vda",), size: int = 64 * MiB,
               compressed: bool = False, seed: int = 1) -> dict[int, dict[str, bytes]]:
    """A full + incremental chain in ``chain`` (a period or archive directory); each point's disks as bytes.

    Data frames of random bytes, of text and of zeroes (data that reads as
    zero), zero frames in the incrementals, holes everywhere else, at
    4 KiB-aligned offsets scattered over the disk.
    """
    rnd = random.Random(seed)
    chain.mkdir(parents=True, exist_ok=True)
    images = {d: bytearray(size) for d in disks}
    expected: dict[int, dict[str, bytes]] = {}
    cpt: list[str] = []
    for n in range(points):
        name = f"virtnbdbackup.{n}"
        for disk in disks:
            frames = []
            pos = rnd.randrange(0, 64) * 4096
            while pos < size:
                length = min(rnd.randrange(1, 96) * 4096, size - pos)
                kind = rnd.random()
                if n and kind < 0.15:
                    frames.append((pos, "zero", length))
                    images[disk][pos:pos + length] = bytes(length)
                else:
                    payload = (rnd.randbytes(length) if kind < 0.7 else
                               bytes(length) if kind < 0.8 else (b"backup %d " % n) * (length // 9 + 1))[:length]
                    frames.append((pos, "data", payload))
                    images[disk][pos:pos + length] = payload
                pos += length + rnd.randrange(1, 512 if n == 0 else 2048) * 4096
            meta = StreamMeta(virtual_size=size, data_size=sum(len(p) for _, k, p in frames if k == "data"),
                              disk_name=disk, checkpoint_name=name, parent_checkpoint=f"virtnbdbackup.{n - 1}" if n else "",
                              incremental=n > 0, compressed=2 if compressed else False,
                              date=f"2026-03-{2 + n:02d}T22:00:01.5")
            fname = f"{disk}.full.data" if n == 0 else f"{disk}.inc.{name}.data"
            with write_stream_atomic(chain / fname, meta, fsync=False) as w:
                for off, kind, val in frames:
                    w.write_data(off, val) if kind == "data" else w.write_zero(off, val)
        expected[n] = {d: bytes(img) for d, img in images.items()}
        disk_xml = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/x/{d}.qcow2'/>"
                           f"<target dev='{d}' bus='virtio'/></disk>" for d in disks)
        (chain / f"vmconfig.{name}.xml").write_text(f"<domain type='kvm'><name>{vm}</name><memory unit='MiB'>64</memory>"
                                                    f"<os><type>hvm</type></os><devices>{disk_xml}</devices></domain>")
        (chain / "checkpoints").mkdir(exist_ok=True)
        (chain / "checkpoints" / f"{name}.xml").write_text(f"<domaincheckpoint><name>{name}</name></domaincheckpoint>")
        cpt.append(name)
        (chain / f"{vm}.cpt").write_text(json.dumps(cpt))
        time.sleep(0.01)
    return expected


def write_raw(path: Path, data: bytes) -> Path:
    """A sparse raw reference file: zero 64 KiB blocks left as holes."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        for off in range(0, len(data), 65536):
            block = data[off:off + 65536]
            if block.count(0) != len(block):
                f.seek(off)
                f.write(block)
    return path


def spawn(*argv: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """vmbk-restore as a process of its own (signals, kill -9)."""
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-restore"), "--json", *argv], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def first_record(proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    """The first record the process prints (serve, mount, instant --no-move: printed once it is up)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            if proc.poll() is None and not ready:
                proc.kill()
            err = proc.stderr.read().decode() if proc.stderr and proc.wait() is not None else ""
            raise AssertionError(f"no record from vmbk-restore (exit {proc.returncode}): {err}")
        line += chunk
    return orjson.loads(line.split(b"\n")[0])


def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float = 60) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def leftovers() -> tuple[list[str], list[str], list[str]]:
    """Loop devices and mounts of sessions, and their markers: what a session must not leave behind."""
    run_dir = f"{marker.run_dir()}/{marker.PREFIX}"
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True,
                           text=True, check=False).stdout.splitlines()
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return ([line for line in loops if run_dir in line],
            [line for line in mounts if run_dir in line or "/mount-here" in line],
            sorted(p.name for p in marker.run_dir().glob(f"{marker.PREFIX}*")))


def allocated(path: Path) -> list[tuple[int, int]]:
    """The data ranges of a sparse file (SEEK_DATA / SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return out


def backup_paused(guest: Any, disk: Path, ref: Path, root: Path) -> list[dict[str, Any]]:
    """vmbk-backup of the paused guest, its disk as it is then kept as the raw ``ref``; the records."""
    from vmbk.commands.backup import main as backup_main

    guest.dom.suspend()
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(disk), str(ref)], check=True,
                       capture_output=True)
        out = io.StringIO()
        code = backup_main(["--json", "--backup-path", str(root), "--vm", guest.name], io.StringIO(""), out)
    finally:
        guest.dom.resume()
    recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, recs
    return recs


@contextlib.contextmanager
def module_guest(conn: Any, image: dict[str, Any], prefix: str, *,
                 data: Sequence[str]) -> Iterator[tuple[Path, Any, Path]]:
    """(work directory, booted test guest, its 256 MiB vda): a module's guest, removed with its files after.

    ``data``: the disks its init formats and mounts (``[]``: none, the test does).
    """
    from fixtures.guest import WORKDIR_BASE, unique_name
    from guest.agent import Guest
    from guest.domain import guest_domain_xml, make_qcow2, remove_domain, start_domain

    WORKDIR_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=WORKDIR_BASE))
    os.chmod(workdir, 0o755)
    name = unique_name()
    disk = make_qcow2(workdir / f"{name}-vda.qcow2", "256M")
    console = workdir / f"{name}-console.log"
    dom = start_domain(conn, guest_domain_xml(name, image, [disk], data=list(data), console_log=console))
    try:
        guest = Guest(dom, console_log=console, disks=[disk])
        guest.wait_agent(timeout=120)
        yield workdir, guest, disk
    finally:
        remove_domain(dom)
        if os.environ.get("VMBK_KEEP_WORKDIR") != "1":
            shutil.rmtree(workdir, ignore_errors=True)

