"""A picture of each drill: the guest's screen as PNG, its serial console as text.

As other backup products' screenshot verification: when the last check
passed, or at the timeout, QEMU's screen is taken through libvirt
(``virDomainScreenshot``, a stream) -- PNG where QEMU makes one (7.2
does, for libvirt 9), else PPM, turned into PNG here by `ppm_to_png`: a
few lines of zlib instead of an image library, since it only wraps RGB
rows.  A guest without a video device has no screen; its serial console's
last lines are kept instead (a guest with both gets both).

They are kept beside the catalogue, ``_state/drills/<vm>/<time>-<name>.png``
and ``.console.txt`` (root:backup 0640, like the catalogue: a console may
show what the guest prints), named in the ``drill`` record and the
``drills`` row.  Bounded (`prune`): the newest ``[drill] pictures`` drills
per VM, and ``pictures_max_mib`` for all VMs, the oldest going first.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from pathlib import Path
from typing import Any

from vmbk.fsutil import DIR_MODE, ensure_dir, write_file_atomic
from vmbk.virt.connection import libvirt_module

log = logging.getLogger("vmbk.drill")

DIRNAME = "drills"
#: A screenshot larger than this is not kept (a 4K screen as PPM is 24 MiB).
MAX_SCREENSHOT = 64 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUFFIXES = (".png", ".console.txt")


def pictures_dir(backup_path: Path, vm: str) -> Path:
    safe = vm.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    return backup_path / "_state" / DIRNAME / safe


def screenshot(conn: Any, dom: Any) -> bytes | None:
    """The guest's screen as PNG; None when it has none (no video device) or libvirt cannot take it."""
    libvirt = libvirt_module()
    stream = None
    try:
        stream = conn.newStream(0)
        mime = dom.screenshot(stream, 0, 0)
        chunks, size = [], 0
        while True:
            chunk = stream.recv(1 << 20)
            if not isinstance(chunk, bytes) or not chunk:
                break
            size += len(chunk)
            if size > MAX_SCREENSHOT:
                raise ValueError(f"larger than {MAX_SCREENSHOT >> 20} MiB")
            chunks.append(chunk)
        stream.finish()
    except (libvirt.libvirtError, ValueError) as e:
        msg = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
        log.info("no screenshot: %s", msg)
        if stream is not None:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
        return None
    data = b"".join(chunks)
    if data.startswith(PNG_SIGNATURE):
        return data
    try:
        return ppm_to_png(data)
    except ValueError as e:
        log.info("screenshot of type %s not usable: %s", mime, e)
        return None


_PPM_HEAD = re.compile(rb"\AP6(?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)\s")


def ppm_to_png(ppm: bytes) -> bytes:
    """A binary PPM (P6, 8 bits) as PNG (RGB, no filter, deflated)."""
    m = _PPM_HEAD.match(ppm)
    if m is None:
        raise ValueError("not a binary PPM")
    width, height, maxval = (int(g) for g in m.groups())
    if maxval != 255 or not width or not height:
        raise ValueError(f"PPM of {width}x{height}, maxval {maxval}: only 8-bit pixels are supported")
    pixels = memoryview(ppm)[m.end():]
    row = width * 3
    if len(pixels) < row * height:
        raise ValueError("PPM cut short")
    raw = b"".join(b"\0" + pixels[y * row:(y + 1) * row].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def keep(backup_path: Path, vm: str, stem: str, png: bytes | None, console: str | None) -> tuple[Path | None, Path | None]:
    """Write the pictures of one drill; their paths (None: not taken or not writable)."""
    if png is None and not console:
        return None, None
    try:
        d = ensure_dir(pictures_dir(backup_path, vm), DIR_MODE)
        png_path = console_path = None
        if png is not None:
            png_path = d / f"{stem}.png"
            write_file_atomic(png_path, png)
        if console:
            console_path = d / f"{stem}.console.txt"
            write_file_atomic(console_path, console.encode("utf-8"))
    except OSError as e:
        log.warning("%s: the drill's pictures are not kept: %s", vm, e)
        return None, None
    return png_path, console_path


def prune(backup_path: Path, per_vm: int, max_bytes: int) -> list[Path]:
    """Remove old pictures: beyond the newest ``per_vm`` drills of each VM, then the
    oldest until all of them fit in ``max_bytes``; the files removed."""
    root = backup_path / "_state" / DIRNAME
    if not root.is_dir():
        return []
    drills: list[tuple[float, list[Path]]] = []  # (time, files of one drill), all VMs
    gone: list[Path] = []
    for vm_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        by_stem: dict[str, list[Path]] = {}
        for f in vm_dir.iterdir():
            stem = next((f.name[:-len(s)] for s in SUFFIXES if f.name.endswith(s)), None)
            if stem is not None and f.is_file():
                by_stem.setdefault(stem, []).append(f)
        ordered = sorted(by_stem.values(), key=lambda fs: max(f.stat().st_mtime for f in fs), reverse=True)
        for i, files in enumerate(ordered):
            if i >= per_vm:
                gone += _unlink(files)
            else:
                drills.append((max(f.stat().st_mtime for f in files), files))
    total = sum(f.stat().st_size for _, fs in drills for f in fs)
    for _, files in sorted(drills, key=lambda d: d[0]):
        if total <= max_bytes:
            break
        total -= sum(f.stat().st_size for f in files)
        gone += _unlink(files)
    return gone


def _unlink(files: list[Path]) -> list[Path]:
    out = []
    for f in files:
        try:
            f.unlink()
            out.append(f)
        except OSError as e:
            log.warning("%s: not removed: %s", f, e)
    return out
