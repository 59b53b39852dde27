"""The corruption matrix (issue #11, "Proof"): no damage restores silently.

Two real chains, full + 3 incrementals each, uncompressed and lz4, made by
vmbk-backup of running no-OS domains whose disks are written between the
backups through QEMU's block layer (HMP qemu-io: random data, patterns,
zeroed ranges).  The reference of every point is an independent model of
those writes, checked against the live disk at each backup.

Each case copies a pristine chain, damages one file the way a disk, a
person or a crash does (a flipped byte in each kind of file, truncation,
deleted files, garbage), then asks the three readers:
``--list-restore-points``, ``--verify``, and a restore of every point
(``--skip-config``, in process).  A case is

* *harmless*: ``--verify`` passes and every point restores byte-exact
  (qemu-img compare and the same virtual size);
* *detected*: ``--verify`` fails, and every point either is refused or
  restores byte-exact; where the damage is within reach of the listing's
  cheap check (file ends, side files, missing files, checksums), every
  refused point is also listed as not complete;
* *silent*: a restore succeeds with a wrong image -- never (asserted).

No NVRAM: the domains run SeaBIOS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt_qemu
import pytest
from backup_helpers import backup_ok, run_restore

from vmbk.stream import scan

pytestmark = pytest.mark.libvirt

VDA = "/machine/peripheral/virtio-disk0/virtio-backend"
KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
PERIOD = "202611"
INC = "vda.inc.virtnbdbackup.{}.data"
FULL = "vda.full.data"

#: What each backup round writes: (pattern byte or None for zeroes, offset, length).
ROUNDS: list[list[tuple[int | None, int, int]]] = [
    [],
    [(0x41, 3 * MiB, 256 * KiB), (None, 512 * KiB, 64 * KiB)],
    [(0x42, 1 * MiB, 128 * KiB), (0x43, 5 * MiB + 4 * KiB, 8 * KiB)],
    [(0x44, 6 * MiB, 1 * MiB), (0x45, 100 * KiB, 4 * KiB), (None, 2 * MiB, 128 * KiB)],
]


def hmp(dom, cmd: str) -> None:
    for c in (cmd, "flush"):
        libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {VDA} "{c}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def compare(image: Path, ref: Path, fmt: str = "qcow2", *, force_share: bool = False) -> bool:
    sizes = [json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(p)], capture_output=True,
                                       check=True).stdout)["virtual-size"] for p in (image, ref)]
    argv = ["qemu-img", "compare", "-q", *(["-U"] if force_share else []), "-f", fmt, "-F", "raw", str(image), str(ref)]
    return sizes[0] == sizes[1] and subprocess.run(argv).returncode == 0


@dataclass
class Pristine:
    root: Path
    vm: str
    refs: list[Path]

    @property
    def chain(self) -> Path:
        return self.root / self.vm / PERIOD


def make_chain(nos_domain, workdir: Path, tag: str, cfg: Path) -> Pristine:
    """A domain whose disk starts with 3 MiB of random data, backed up 4 times (full + 3 inc)."""
    model = bytearray(os.urandom(3 * MiB)) + bytearray(SIZE - 3 * MiB)
    base_raw = workdir / f"{tag}-base.raw"
    base_raw.write_bytes(model)
    disk = workdir / f"{tag}-vda.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(base_raw), str(disk)], check=True)
    os.chmod(disk, 0o666)
    nd = nos_domain([disk])
    if tag == "lz4":
        with open(cfg / "default.toml", "a") as fh:
            fh.write(f'[vm."{nd.name}"]\ncompression = "lz4"\n')
    root = workdir / f"{tag}-backups"
    root.mkdir()
    refs = []
    for n, writes in enumerate(ROUNDS):
        for pattern, off, length in writes:
            hmp(nd.dom, f"write -z {off} {length}" if pattern is None else f"write -P {pattern} {off} {length}")
            model[off:off + length] = bytes(length) if pattern is None else bytes([pattern]) * length
        ref = workdir / f"{tag}-ref-{n}.raw"
        ref.write_bytes(model)
        assert compare(disk, ref, force_share=True), f"the model of round {n} is not the disk"
        refs.append(ref)
        rec = backup_ok(root, nd.name, "--now", f"2026-11-16T0{n + 1}:30:00+00:00")
        assert rec["action"] == ("full" if n == 0 else "inc"), rec
    return Pristine(root, nd.name, refs)


# -- damage ---------------------------------------------------------------------------


def flip(path: Path, pos: int, value: int | None = None) -> None:
    """XOR bit 0 of the byte at ``pos`` (a digit stays a digit), or set it to ``value``."""
    raw = bytearray(path.read_bytes())
    raw[pos] = raw[pos] ^ 0x01 if value is None else value
    path.write_bytes(bytes(raw))


def mid_payload(path: Path) -> int:
    frame = max(scan(path).data_frames, key=lambda f: f.stored_len)
    return frame.file_pos + frame.stored_len // 2


def other_hex_digit(path: Path, pos: int) -> int:
    return ord("1") if path.read_bytes()[pos] == ord("0") else ord("0")


def header_start_digit(path: Path) -> int:
    """A hex digit in the start field of the stream's last data frame."""
    return scan(path).data_frames[-1].header_pos + 5 + 12


def tail_byte(path: Path) -> int:
    smap = scan(path)
    if smap.trailer_pos is not None:  # the units digit of the trailer's first entry
        first = re.match(rb"\[(\d+)", path.read_bytes()[smap.trailer_pos:])
        assert first is not None
        return smap.trailer_pos + first.end() - 1
    return smap.file_size - 20  # in the stop frame's start field


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


def meta_value(path: Path, key: bytes) -> int:
    raw = path.read_bytes()[:4096]
    return raw.index(key) + len(key)


def truncate(path: Path, keep: Callable[[int], int]) -> None:
    size = path.stat().st_size
    os.truncate(path, keep(size))


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path, Path], None]  # (chain directory, backup root)
    cheap: bool  # the listing's cheap check can see it
    modes: tuple[str, ...] = ("plain", "lz4")


def delete_checksums(chain: Path) -> None:
    for p in chain.glob("*.chksum"):
        p.unlink()


CASES = [
    Case("payload byte of the full", lambda c, r: flip(c / FULL, mid_payload(c / FULL)), False),
    Case("payload byte of inc 2", lambda c, r: flip(c / INC.format(2), mid_payload(c / INC.format(2))), False),
    Case("frame header of inc 1 (another valid offset)",
         lambda c, r: flip(c / INC.format(1), p := header_start_digit(c / INC.format(1)),
                           other_hex_digit(c / INC.format(1), p)), False),
    Case("frame kind of the full", lambda c, r: flip(c / FULL, scan(c / FULL).data_frames[0].header_pos), False),
    Case("meta virtualSize of inc 3", lambda c, r: flip(c / INC.format(3), meta_value(c / INC.format(3),
                                                                                   b'"virtualSize": ')), True),
    Case("meta checkpointName of the full",
         lambda c, r: flip(c / FULL, meta_value(c / FULL, b'"checkpointName": "virtnbdbackup.')), True),
    Case("stop frame or trailer of inc 1", lambda c, r: flip(c / INC.format(1), tail_byte(c / INC.format(1))), True),
    Case("bytes appended to the full", lambda c, r: append(c / FULL, b"\0" * 100), True),
    Case(".chksum of inc 1", lambda c, r: flip(c / f"{INC.format(1)}.chksum",
                                                (c / f"{INC.format(1)}.chksum").stat().st_size - 1), False),
    Case("byte of the .cpt", lambda c, r: flip(next(c.glob("*.cpt")), next(c.glob("*.cpt")).stat().st_size - 4),
         True),
    Case("structure of checkpoint XML 1",
         lambda c, r: flip(p := c / "checkpoints" / "virtnbdbackup.1.xml", p.read_bytes().index(b"<name>")), True),
    Case("text of checkpoint XML 1 (still well-formed)",
         lambda c, r: flip(p := c / "checkpoints" / "virtnbdbackup.1.xml", p.read_bytes().index(b"<creationTime>")
                           + len(b"<creationTime>") + 2), False),
    Case("structure of vmconfig 2",
         lambda c, r: flip(p := c / "vmconfig.virtnbdbackup.2.xml", p.read_bytes().index(b"<devices>")), True),
    Case("qcow.json of the full (JSON)", lambda c, r: flip(c / "vda.virtnbdbackup.0.qcow.json", 0), True),
    Case("qcow.json of inc 2 (virtual-size)",
         lambda c, r: flip(p := c / "vda.virtnbdbackup.2.qcow.json", p.read_bytes().index(b'"virtual-size": ')
                           + len(b'"virtual-size": ')), True),
    Case("inc 2 truncated to half", lambda c, r: truncate(c / INC.format(2), lambda n: n // 2), True),
    Case("last byte of the full cut", lambda c, r: truncate(c / FULL, lambda n: n - 1), True),
    Case(".chksum of inc 2 deleted", lambda c, r: (c / f"{INC.format(2)}.chksum").unlink(), True),
    Case("payload byte of inc 1 flipped and its .chksum deleted",
         lambda c, r: (flip(c / INC.format(1), mid_payload(c / INC.format(1))),
                       (c / f"{INC.format(1)}.chksum").unlink()), True),
    Case("inc 2 deleted", lambda c, r: ((c / INC.format(2)).unlink(), (c / f"{INC.format(2)}.chksum").unlink()),
         True),
    Case(".cpt replaced by garbage", lambda c, r: next(c.glob("*.cpt")).write_bytes(b"\x00garbage\xff"), True),
    Case("checkpoint XML 1 replaced by garbage",
         lambda c, r: (c / "checkpoints" / "virtnbdbackup.1.xml").write_bytes(b"\x00garbage"), True),
    Case("catalogue overwritten in the middle",
         lambda c, r: flip_block(r / "_state" / "vmbk.db"), False),
    # vmbk's streams say so in their meta (writtenBy): a vmbk chain stripped of
    # every .chksum is unverifiable, not a pre-1.9.40 virtnbdbackup chain
    Case("every .chksum deleted", lambda c, r: delete_checksums(c), True),
    Case("every .chksum deleted and a payload byte of inc 1 flipped",
         lambda c, r: (delete_checksums(c), flip(c / INC.format(1), mid_payload(c / INC.format(1)))), True),
]

#: A chain without any .chksum whose streams do not say vmbk wrote them looks
#: like one written by virtnbdbackup before 1.9.40, which restores on its
#: structure alone: an uncompressed payload byte flipped there is restored.
#: --verify says it cannot vouch for the data (exit 9) and the restore names
#: every stream it could not check.
#: Before manifests (issue #16) this was the limit; now the manifests list
#: the .chksum files and the flipped payload's digest: found by the listing.
WAS_LIMIT = Case("every .chksum and vmbk's writtenBy deleted, a payload byte of inc 1 flipped",
                 lambda c, r: (delete_checksums(c), forget_writer(c, manifests=False),
                               flip(c / INC.format(1), mid_payload(c / INC.format(1)))), False)
#: The limit now: manifests deleted too, and the meta key that says there were some.
LIMIT = Case("every .chksum, manifest and vmbk meta key deleted, a payload byte of inc 1 flipped",
             lambda c, r: (delete_checksums(c), forget_writer(c),
                           flip(c / INC.format(1), mid_payload(c / INC.format(1)))), False)


def forget_writer(chain: Path, *, manifests: bool = True) -> None:
    """Rewrite each stream's meta without ``writtenBy`` (same length: the key renamed); with
    ``manifests``, without ``vmbkManifest`` either, and the manifests gone."""
    keys = [b'"writtenBy"'] + ([b'"vmbkManifest"'] if manifests else [])
    for f in chain.glob("*.data"):
        raw = bytearray(f.read_bytes())
        for key in keys:
            at = raw.index(key)
            raw[at + 1:at + 2] = b"x"
        f.write_bytes(bytes(raw))
    if manifests:
        for m in chain.glob("vmbk.*.manifest"):
            m.unlink()


def flip_block(db: Path) -> None:
    raw = bytearray(db.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 512] = os.urandom(512)
    raw[:16] = b"not a database!!"
    db.write_bytes(bytes(raw))


# -- the matrix ---------------------------------------------------------------------------


@dataclass
class Outcome:
    verify: int
    listed_incomplete: set[int]
    refused: set[int]
    wrong: set[int]


def run_case(p: Pristine, case: Case, work: Path) -> Outcome:
    root = work / "root"
    shutil.copytree(p.root, root, symlinks=True)
    shutil.rmtree(root / "_state" / "locks", ignore_errors=True)
    case.damage(root / p.vm / PERIOD, root)
    code, recs = run_restore("--backup-path", str(root), "--list-restore-points", p.vm)
    listed = {r["index"] for r in recs if r["type"] == "restore_point" and not r["complete"]}
    if code != 0:
        listed = set(range(len(p.refs)))
    verify, _ = run_restore("--backup-path", str(root), "--verify", p.vm)
    refused, wrong = set(), set()
    for n, ref in enumerate(p.refs):
        out = work / f"out-{n}"
        code, recs = run_restore("--backup-path", str(root), "--vm", p.vm, "--restore-path", str(out),
                                 "--restore-point", str(n), "--skip-config")
        if code != 0:
            refused.add(n)
            assert not out.exists() or not any(out.iterdir()), f"{case.name}: a refused restore left files"
        elif not compare(out / f"{p.vm}.qcow2", ref):
            wrong.add(n)
    shutil.rmtree(work)
    return Outcome(verify, listed, refused, wrong)


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    cfg = tmp_path / "etc"
    cfg.mkdir()
    (cfg / "default.toml").write_text("")
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(cfg))
    return cfg


def test_no_damage_restores_silently(nos_domain, vm_workdir, tmp_path, config_dir):
    t0 = time.monotonic()
    chains = {tag: make_chain(nos_domain, vm_workdir, tag, config_dir) for tag in ("plain", "lz4")}
    assert scan(chains["lz4"].chain / FULL).compressed and not scan(chains["plain"].chain / FULL).compressed
    t_chains = time.monotonic() - t0
    tally = {"tried": 0, "detected": 0, "harmless": 0, "silent": 0}
    failures, rows = [], []
    for tag, pristine in chains.items():
        for i, case in enumerate(c for c in CASES if tag in c.modes):
            o = run_case(pristine, case, tmp_path / f"{tag}-{i}")
            tally["tried"] += 1
            what = "silent" if o.wrong else "detected" if o.verify != 0 else "harmless"
            tally[what] += 1
            rows.append(f"{tag:5} {what:8} verify={o.verify} refused={sorted(o.refused)} "
                        f"listed={sorted(o.listed_incomplete)} {case.name}")
            if o.wrong:
                failures.append(f"{tag}/{case.name}: points {sorted(o.wrong)} restored WRONG")
            if o.refused and o.verify == 0:
                failures.append(f"{tag}/{case.name}: restore refused {sorted(o.refused)} but --verify passed")
            if case.cheap and not o.refused <= o.listed_incomplete:
                failures.append(f"{tag}/{case.name}: refused {sorted(o.refused)}, listed as incomplete only "
                                f"{sorted(o.listed_incomplete)}")
            if o.listed_incomplete - o.refused:
                failures.append(f"{tag}/{case.name}: listed incomplete {sorted(o.listed_incomplete)} but restored")
    print(f"\ncorruption matrix ({t_chains:.0f} s for the chains, {time.monotonic() - t0:.0f} s in all):")
    print("\n".join(rows))
    print("tried {tried}, detected {detected}, harmless {harmless}, silent {silent}".format(**tally))
    assert tally["silent"] == 0 and not failures, "\n".join(failures)

    # the former limit: the manifests see it, the listing refuses every point
    o = run_case(chains["plain"], WAS_LIMIT, tmp_path / "was-limit")
    assert o.verify == 4 and o.refused == o.listed_incomplete == {0, 1, 2, 3} and not o.wrong, o
    # the limit, uncompressed: said, not silent
    o = run_case(chains["plain"], LIMIT, tmp_path / "limit")
    assert o.verify == 9 and not o.refused and o.wrong == {1, 2, 3}, o
    root = tmp_path / "limit-root"
    shutil.copytree(chains["plain"].root, root)
    LIMIT.damage(root / chains["plain"].vm / PERIOD, root)
    code, recs = run_restore("--backup-path", str(root), "--vm", chains["plain"].vm, "--restore-path",
                             str(tmp_path / "limit-out"), "--skip-config")
    assert code == 0 and len(recs[-1]["unchecked"]) == 4, recs
