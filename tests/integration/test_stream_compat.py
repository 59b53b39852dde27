"""Compatibility of vmbk.stream with Debian's virtnbdbackup/virtnbdrestore.

1. vmbk writes a full and two incrementals from a qcow2 image changed
   with qemu-io (extents from ``qemu-img map``, bytes from a raw
   conversion); ``virtnbdrestore`` restores them; ``qemu-img compare``.
2. ``virtnbdbackup`` backs up a defined, shut-off domain (``-l copy``,
   offline mode: it runs qemu-nbd itself); vmbk's reader rebuilds the
   image from its stream; ``qemu-img compare`` with the source.  vmbk's
   writer, fed the same frames and meta, reproduces the file byte for byte.

What virtnbdrestore needs in the backup directory (1.9.15, and upstream
master the same): ``vmconfig*.xml`` (the newest by mtime is used; its
``<disk>`` elements name the disks, ``<target dev>`` selects the data
files, the restored image is ``OUTPUT/basename(<source file>)``); data
files ``<dev>*.data`` applied in **mtime order**, the first of which must
have ``full`` or ``copy`` in its name (``vda.full.data``,
``vda.inc.virtnbdbackup.1.data``, ...).  ``checkpoints/``, ``<vm>.cpt``,
``*.qcow.json`` and ``*.chksum`` are optional for a restore.  It creates
the image with ``qemu-img create`` (format ``diskFormat``, size
``virtualSize`` of the first file), serves it with qemu-nbd and writes
the data frames over NBD.  It needs libvirtd (it connects to
qemu:///system even for a plain restore).

Zero frames: virtnbdrestore skips them.  In a full stream that is
harmless (the new image reads as zero), but vmbk's incrementals carry
zero frames for ranges that became zero since the parent, and those
virtnbdrestore cannot apply: its image keeps the parent's bytes there.
``test_vmbk_chain_restores_with_virtnbdrestore[...-zero-frames]`` checks
exactly that (its image equals vmbk's merge *without* zero frames and
differs from the source in the zeroed ranges); with zeroed ranges written
as data frames of zeroes (``zeroes-as-data``) virtnbdrestore's image
equals the source.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from backup_helpers import released

from vmbk.stream import (
    StreamMeta,
    StreamReader,
    StreamWriter,
    reconstruct_raw,
    scan,
    verify_checksum,
    write_stream_atomic,
)

pytestmark = pytest.mark.compat

MiB = 1 << 20
VSIZE = 128 * MiB
TOOLS = ("virtnbdbackup", "virtnbdrestore", "qemu-img", "qemu-io", "virsh")
TEST_ROOT = Path("/var/tmp/vmbk-tests")


def _missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _libvirt_ok() -> bool:
    try:
        r = subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


if _missing_tools():
    pytest.skip(f"missing tools: {_missing_tools()}", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip(
        "needs root (virtnbdbackup/virtnbdrestore on qemu:///system)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def libvirt() -> None:
    if not _libvirt_ok():
        pytest.skip("libvirtd not reachable on qemu:///system")


def run(
    *cmd: str | os.PathLike[str], timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {r.returncode}\nstdout:\n{r.stdout[-4000:]}\n"
            f"stderr:\n{r.stderr[-4000:]}"
        )
    return r


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """World-traversable: QEMU/libvirt may open images as libvirt-qemu."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o755)
    d = TEST_ROOT / f"stream-{uuid.uuid4().hex[:12]}"
    d.mkdir()
    os.chmod(d, 0o755)
    yield d
    if not os.environ.get("VMBK_KEEP_TEST_FILES"):
        shutil.rmtree(d, ignore_errors=True)


# -- building images with qemu-io --------------------------------------------------


class Image:
    """A qcow2 image changed step by step, remembering what each step touched."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0
        run("qemu-img", "create", "-q", "-f", "qcow2", path, str(VSIZE))

    def apply(self, ops: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
        """Run ``(op, offset, length)`` ops; op: rand, zero, discard, or pattern:0xNN."""
        cmds: list[str] = []
        for op, off, length in ops:
            if op == "rand":
                self.seq += 1
                src = self.path.parent / f"rand-{self.seq}.bin"
                src.write_bytes(os.urandom(length))
                cmds += ["-c", f"write -q -s {src} {off} {length}"]
            elif op == "zero":
                cmds += ["-c", f"write -q -z {off} {length}"]
            elif op == "discard":
                cmds += ["-c", f"discard -q {off} {length}"]
            elif op.startswith("pattern:"):
                cmds += ["-c", f"write -q -P {int(op[8:], 16)} {off} {length}"]
            else:
                raise ValueError(op)
        run("qemu-io", "-f", "qcow2", *cmds, self.path)
        return [(off, length) for _, off, length in ops]

    def extents(self) -> list[tuple[int, int, bool]]:
        """``(start, length, data)`` from qemu-img map, adjacent ones unified."""
        out: list[tuple[int, int, bool]] = []
        for e in json.loads(run("qemu-img", "map", "--output=json", self.path).stdout):
            data = bool(e["data"])
            if out and out[-1][2] == data and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"], data)
            else:
                out.append((e["start"], e["length"], data))
        return out

    def raw(self, dest: Path) -> Path:
        run("qemu-img", "convert", "-O", "raw", self.path, dest)
        return dest


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, n in sorted(ranges):
        if out and s <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], s + n)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((s, n))
    return out


def _clip(
    extents: list[tuple[int, int, bool]], ranges: list[tuple[int, int]]
) -> list[tuple[int, int, bool]]:
    """The parts of ``ranges`` with their data/zero state from ``extents``."""
    out = []
    for rs, rn in _union(ranges):
        for es, en, data in extents:
            s, e = max(rs, es), min(rs + rn, es + en)
            if s < e:
                out.append((s, e - s, data))
    return out


def write_stream(
    path: Path,
    raw_image: Path,
    parts: list[tuple[int, int, bool]],
    *,
    compressed: bool | int,
    level: int,
    zero_frames: bool,
) -> None:
    """Write ``parts`` of ``raw_image`` as the stream of backup ``level`` (0 = full)."""
    frames: list[tuple[int, int, bool]] = []
    for s, n, data in parts:  # zeroes-as-data: zeroed ranges of incrementals become data
        data = data or (level > 0 and not zero_frames)
        if frames and frames[-1][2] == data and frames[-1][0] + frames[-1][1] == s:
            frames[-1] = (frames[-1][0], frames[-1][1] + n, data)
        else:
            frames.append((s, n, data))
    meta = StreamMeta(
        virtual_size=VSIZE,
        data_size=sum(n for _, n, d in frames if d),
        disk_name="vda",
        disk_format="qcow2",
        checkpoint_name=f"virtnbdbackup.{level}",
        parent_checkpoint=f"virtnbdbackup.{level - 1}" if level else "",
        incremental=level > 0,
        compressed=compressed,
    )
    with open(raw_image, "rb", buffering=0) as src, write_stream_atomic(path, meta) as w:
        for s, n, data in frames:
            if data:
                buf = bytearray(n)
                src.seek(s)
                assert src.readinto(buf) == n
                w.write_data(s, memoryview(buf))
            else:
                w.write_zero(s, n)


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""

FULL_OPS = [
    ("rand", 0, 1 * MiB),
    ("rand", 5 * MiB, 64 * 1024),
    ("zero", 10 * MiB, 1 * MiB),
    ("rand", 20 * MiB, 40 * MiB),  # >= 32 MiB: split into lz4 pieces
    ("pattern:55", 100 * MiB, 3 * MiB),
]
INC1_OPS = [
    ("rand", 512 * 1024, 128 * 1024),
    ("zero", 20 * MiB, 1 * MiB),  # data -> zero
    ("discard", 100 * MiB, 1 * MiB),  # data -> trimmed
    ("rand", 70 * MiB, 2 * MiB),
]
INC2_OPS = [
    ("rand", 20 * MiB + 512 * 1024, 256 * 1024),  # inside inc1's zeroed range
    ("zero", 0, 256 * 1024),  # data -> zero
    ("rand", 127 * MiB, 1 * MiB),  # last MiB of the disk
    ("pattern:66", 101 * MiB, 64 * 1024),
]


@pytest.fixture(scope="module")
def chain_source(workdir: Path) -> dict[str, object]:
    """The image in three states and the parts each backup level must save."""
    img = Image(workdir / "src.qcow2")
    img.apply(FULL_OPS)
    states = [img.raw(workdir / "state0.raw")]
    parts = [[(s, n, d) for s, n, d in img.extents()]]
    for i, ops in enumerate((INC1_OPS, INC2_OPS), start=1):
        dirty = img.apply(ops)
        states.append(img.raw(workdir / f"state{i}.raw"))
        parts.append(_clip(img.extents(), dirty))
    # the incrementals do contain zeroed ranges that were data before
    assert any(not d for s, n, d in parts[1]) and any(not d for s, n, d in parts[2])
    return {"states": states, "parts": parts, "qcow2": img.path}


def _compare(a: Path, b: Path, fmt_a: str = "raw") -> subprocess.CompletedProcess[str]:
    # virtnbdrestore can return while the qemu-nbd it started still holds the
    # image's lock on its way out (seen on a busy machine): wait for it.
    deadline = time.monotonic() + 20
    while True:
        res = run("qemu-img", "compare", "-f", fmt_a, "-F", "raw", a, b, check=False)
        if "Failed to get shared" not in (res.stdout or "") + (res.stderr or "") or time.monotonic() > deadline:
            return res
        time.sleep(0.2)


@pytest.mark.parametrize("compressed", [False, 2], ids=["plain", "lz4"])
@pytest.mark.parametrize("zero_frames", [True, False], ids=["zero-frames", "zeroes-as-data"])
def test_vmbk_chain_restores_with_virtnbdrestore(
    libvirt: None, workdir: Path, chain_source: dict, compressed: bool | int, zero_frames: bool
) -> None:
    tag = f"{'lz4' if compressed else 'plain'}-{'zf' if zero_frames else 'zd'}"
    bk = workdir / f"bk-{tag}"
    out = workdir / f"out-{tag}"
    bk.mkdir()
    states: list[Path] = chain_source["states"]
    parts = chain_source["parts"]
    names = ["vda.full.data", "vda.inc.virtnbdbackup.1.data", "vda.inc.virtnbdbackup.2.data"]
    paths = [bk / n for n in names]
    for level, (p, state, prt) in enumerate(zip(paths, states, parts, strict=True)):
        write_stream(p, state, prt, compressed=compressed, level=level, zero_frames=zero_frames)
    (bk / "vmconfig.virtnbdbackup.0.xml").write_text(
        DOMAIN_XML.format(name="vmbk-restore-test", disk="/nonexistent/restored.qcow2")
    )
    base = 1_700_000_000
    for i, p in enumerate(paths):  # virtnbdrestore applies files in mtime order
        os.utime(p, (base + 10 * i, base + 10 * i))

    for p in paths:
        assert verify_checksum(p, required=True)
        sm = scan(p)
        assert sm.meta.is_compressed is bool(compressed)
    full = scan(paths[0])
    big = [f for f in full.frames if f.kind == "data" and f.length >= 32 * MiB]
    assert big and (len(big[0].pieces) == 2 if compressed else big[0].pieces == ())
    n_zero_inc = sum(len(scan(p).zero_frames) for p in paths[1:])
    assert (n_zero_inc > 0) is zero_frames

    # vmbk's own merge gives the source image (zero frames applied)
    ours = workdir / f"ours-{tag}.raw"
    reconstruct_raw(paths, ours)
    r = _compare(ours, states[2])
    assert r.returncode == 0, r.stdout + r.stderr

    # virtnbdrestore
    r = run(
        "virtnbdrestore",
        "-i",
        bk,
        "-o",
        out,
        "-n",
        "-L",
        workdir / f"restore-{tag}.log",
        "-f",
        workdir / f"nbd-{tag}.sock",
        timeout=600,
    )
    restored = out / "restored.qcow2"
    assert restored.exists(), r.stderr[-3000:]
    released(restored)
    log = (workdir / f"restore-{tag}.log").read_text()
    assert log.count("End of stream") == 3, log[-3000:]
    if zero_frames:
        # what virtnbdrestore can know: the chain without zero frames ...
        blind = workdir / f"blind-{tag}.raw"
        reconstruct_raw(paths, blind, zero_frames=False)
        r = _compare(restored, blind, "qcow2")
        assert r.returncode == 0, r.stdout + r.stderr
        # ... which differs from the source where the guest zeroed data
        r = _compare(restored, states[2], "qcow2")
        assert r.returncode == 1 and "Content mismatch at offset 0!" in r.stdout, r.stdout
    else:
        r = _compare(restored, states[2], "qcow2")
        assert r.returncode == 0, r.stdout + r.stderr


# -- 2. virtnbdbackup's streams read by vmbk ---------------------------------------


@pytest.fixture(scope="module")
def backed_up_domain(libvirt: None, workdir: Path) -> Iterator[dict[str, Path]]:
    img = Image(workdir / "dom.qcow2")
    img.apply(FULL_OPS + [("pattern:77", 90 * MiB, 5 * 4096), ("zero", 21 * MiB, 64 * 1024)])
    name = f"vmbk-test-{uuid.uuid4().hex[:10]}"
    xml = workdir / "dom.xml"
    xml.write_text(DOMAIN_XML.format(name=name, disk=img.path))
    run("virsh", "-c", "qemu:///system", "define", xml)
    try:
        dirs = {}
        for tag, extra in (("plain", []), ("lz4", ["-z"])):
            d = workdir / f"vnb-{tag}"
            run(
                "virtnbdbackup",
                "-d",
                name,
                "-l",
                "copy",
                "-o",
                d,
                "-n",
                *extra,
                "-f",
                workdir / f"vnb-{tag}.sock",
                timeout=600,
            )
            dirs[tag] = d
        dirs["source"] = img.path
        yield dirs
    finally:
        run("virsh", "-c", "qemu:///system", "undefine", name, check=False)


@pytest.mark.parametrize("tag", ["plain", "lz4"])
def test_virtnbdbackup_stream_reads_back(
    backed_up_domain: dict[str, Path], workdir: Path, tag: str
) -> None:
    d = backed_up_domain[tag]
    data = d / "vda.copy.data"
    assert data.exists(), sorted(os.listdir(d))
    assert (d / "vmconfig.copy.xml").exists()
    sm = scan(data)
    m = sm.meta
    assert (m.disk_name, m.disk_format, m.stream_version, m.incremental) == (
        "vda",
        "qcow2",
        2,
        False,
    )
    assert m.virtual_size == VSIZE
    assert m.compressed == (2 if tag == "lz4" else False)
    assert sm.compressed is (tag == "lz4")
    if tag == "lz4":
        split = [f for f in sm.frames if len(f.pieces) > 1]
        assert split and all(f.length >= 32 * MiB for f in split)
    out = workdir / f"vnb-{tag}.raw"
    reconstruct_raw([data], out)
    r = _compare(out, backed_up_domain["source"], "raw")
    r = run(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        out,
        backed_up_domain["source"],
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("tag", ["plain", "lz4"])
def test_vmbk_writer_reproduces_virtnbdbackup_bytes(
    backed_up_domain: dict[str, Path], workdir: Path, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same meta, same frames -> the same file, byte for byte.

    lz4 with virtnbdbackup's frame settings: vmbk's own frames leave lz4's
    xxh32 checksums out (`compress_piece`), the rest of the layout is the same.
    """
    import lz4.frame

    from vmbk.stream import writer as writer_mod

    monkeypatch.setattr(writer_mod, "compress_piece", lambda data, level: lz4.frame.compress(
        data, compression_level=level, content_checksum=True, block_checksum=True))
    src = backed_up_domain[tag] / "vda.copy.data"
    sm = scan(src)
    copy = workdir / f"rewrite-{tag}.data"
    with StreamReader(src, sm) as r, StreamWriter(copy, sm.meta) as w:
        for f in sm.frames:
            if f.kind == "data":
                w.write_data(f.offset, r.read_frame(f))
            else:
                w.write_zero(f.offset, f.length)
    a, b = src.read_bytes(), copy.read_bytes()
    assert len(a) == len(b) and a == b
