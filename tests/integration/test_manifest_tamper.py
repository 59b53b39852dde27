"""The tamper matrix (issue #16): what the adler32 cannot see, the manifests do.

One real chain, full + 3 incrementals, made by vmbk-backup of a running
no-OS UEFI domain (so every point has its NVRAM copy) whose disk is
written between the backups.  Each case copies the pristine tree and
tampers with it the way someone with write access to the backups would:

* a flipped byte in a data file, and in a data file *with its .chksum
  rewritten to match* (invisible to adler32);
* a flipped byte in an NVRAM copy and in the ``.cpt``;
* point 3's files replaced by point 2's (manifest included);
* a middle point deleted (its files, its manifest, its line in the ``.cpt``);
* every manifest re-signed with another key (hash chain rebuilt).

Every case must be found by ``--verify`` (non-zero exit, the point named
with a clear finding), a restore of the affected point must refuse and
write nothing, and ``--force`` must restore it, saying what it skips.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from backup_helpers import backup_ok, run_restore
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from guest.domain import nos_domain_xml, start_domain
from test_restore_corruption import KiB, MiB, config_dir, flip, hmp  # noqa: F401 -- config_dir: a fixture

from vmbk.commands.status import main as status_main
from vmbk.manifest import keys, sign
from vmbk.stream import scan

pytestmark = pytest.mark.libvirt

PERIOD = "202611"
WRITES = [[], [(0x41, 3 * MiB, 256 * KiB)], [(0x42, 1 * MiB, 128 * KiB)], [(0x43, 6 * MiB, 64 * KiB)]]


@dataclass
class Case:
    name: str
    damage: Callable[[Path], None]
    point: int  # the point a restore is tried of
    finding: str  # a word the verify findings of that point must hold
    verify_code: int = 4
    extra: tuple[str, ...] = ()  # what a forced restore needs besides --force


def _payload_pos(path: Path) -> int:
    return next(f for f in scan(path).frames if f.is_data).file_pos + 7


def flip_data(chain: Path) -> None:
    flip(chain / "vda.inc.virtnbdbackup.2.data", _payload_pos(chain / "vda.inc.virtnbdbackup.2.data"))


def flip_data_and_chksum(chain: Path) -> None:
    flip_data(chain)
    data = chain / "vda.inc.virtnbdbackup.2.data"
    import zlib

    (chain / "vda.inc.virtnbdbackup.2.data.chksum").write_text(str(zlib.adler32(data.read_bytes(), 1)))


def _nvram(chain: Path, n: int) -> Path:
    return next(p for p in chain.iterdir() if p.name.endswith(f"_VARS.fd.virtnbdbackup.{n}"))


def flip_nvram(chain: Path) -> None:
    flip(_nvram(chain, 1), 100)


def flip_cpt(chain: Path) -> None:
    cpt = next(chain.glob("*.cpt"))
    flip(cpt, cpt.read_bytes().index(b"virtnbdbackup.1") + 2)


def older_point(chain: Path) -> None:
    """Point 3's files are point 2's (data, checksum, XMLs, NVRAM, manifest)."""
    for p in list(chain.rglob("*virtnbdbackup.2*")):
        target = p.with_name(p.name.replace("virtnbdbackup.2", "virtnbdbackup.3"))
        shutil.copyfile(p, target)


def delete_middle(chain: Path) -> None:
    for p in list(chain.rglob("*virtnbdbackup.2*")):
        p.unlink()
    cpt = next(chain.glob("*.cpt"))
    cpt.write_bytes(orjson.dumps([c for c in orjson.loads(cpt.read_bytes()) if c != "virtnbdbackup.2"]))


def resign(chain: Path) -> None:
    """Every manifest signed again by another key, the hash chain made to fit."""
    other = Ed25519PrivateKey.generate()
    signer = keys.Signer(other, keys._raw_public(other), Path("/nonexistent"))
    parent = None
    for n in range(4):
        path = chain / f"vmbk.virtnbdbackup.{n}.manifest"
        body = dict(sign.decode(path.read_bytes()).body, parent=parent)
        raw = sign.encode(body, signer)
        path.write_bytes(raw)
        parent = hashlib.sha256(raw).hexdigest()


CASES = [
    Case("data byte", flip_data, 2, "vda.inc.virtnbdbackup.2.data"),
    Case("data byte, .chksum rewritten to match", flip_data_and_chksum, 2, "vda.inc.virtnbdbackup.2.data.chksum"),
    Case("NVRAM byte", flip_nvram, 1, "_VARS.fd.virtnbdbackup.1"),
    Case(".cpt byte", flip_cpt, 3, ".cpt", extra=("--include-incomplete",)),
    Case("point 3 replaced by point 2", older_point, 3, "vmbk.virtnbdbackup.3.manifest",
         extra=("--include-incomplete",)),
    Case("middle point deleted", delete_middle, 3, "hash chain is broken", extra=("--include-incomplete",)),
    Case("re-signed with another key", resign, 3, "does not trust", verify_code=9),
]


def uefi_chain(libvirt_conn, vm_workdir: Path, cleanup_domains: list[str]) -> tuple[Path, str]:
    import subprocess

    disk = vm_workdir / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    os.chmod(disk, 0o666)
    name = f"vmbk-tamper-{os.urandom(4).hex()}"
    xml = nos_domain_xml(name, [disk]).replace("  <os>\n", "  <os firmware='efi'>\n    <firmware>\n"
                                                "      <feature enabled='no' name='secure-boot'/>\n"
                                                "      <feature enabled='no' name='enrolled-keys'/>\n"
                                                "    </firmware>\n").replace(
        "  <clock", "  <features><acpi/></features>\n  <clock")
    cleanup_domains.append(name)
    dom = start_domain(libvirt_conn, xml)
    root = vm_workdir / "backups"
    root.mkdir()
    for n, writes in enumerate(WRITES):
        for pattern, off, length in writes:
            hmp(dom, f"write -P {pattern} {off} {length}")
        backup_ok(root, name, "--now", f"2026-11-16T0{n + 1}:30:00+00:00")
    return root, name


def test_tamper_matrix(libvirt_conn, vm_workdir, cleanup_domains, tmp_path, config_dir):
    t0 = time.monotonic()
    root, vm = uefi_chain(libvirt_conn, vm_workdir, cleanup_domains)
    chain = root / vm / PERIOD
    assert len(list(chain.glob("vmbk.virtnbdbackup.*.manifest"))) == 4
    assert len(list(chain.glob("*_VARS.fd.virtnbdbackup.*"))) == 4
    # pristine: every point good, signed by this host's key
    code, recs = run_restore("--verify", vm, "--backup-path", str(root))
    points = [r for r in recs if r.get("point") is not None]
    assert code == 0 and [p["integrity"] for p in points] == ["good"] * 4, recs
    code, recs = run_restore("--verify", vm, "--backup-path", str(root), "--deep")  # lz4 decoded, chains merged
    assert code == 0 and all(r["ok"] for r in recs), recs
    # vmbk-status shows the verify; --public-key prints the key that signed
    out = io.StringIO()
    status_main(["--json", "--backup-path", str(root), "--vm", vm], io.StringIO(""), out)
    last = orjson.loads(out.getvalue().splitlines()[0])["last_verify"]
    assert (last["outcome"], last["points"], last["findings"], last["deep"]) == ("ok", 4, 0, True), last
    out = io.StringIO()
    assert status_main(["--public-key"], io.StringIO(""), out) == 0
    assert out.getvalue().encode() == (keys.key_dir() / keys.PUBLIC).read_bytes()
    assert points[0]["signed_by"] == keys.fingerprint(keys.read_public(keys.key_dir() / keys.PUBLIC))
    assert (root / "_state" / keys.PUBLIC).read_bytes() == out.getvalue().encode()  # next to the tree
    t_chain = time.monotonic() - t0
    rows, failures = [], []
    for i, case in enumerate(CASES):
        work = tmp_path / f"case{i}"
        shutil.copytree(root, work / "root", symlinks=True)
        case.damage(work / "root" / vm / PERIOD)
        base = ("--backup-path", str(work / "root"))
        code, recs = run_restore("--verify", vm, *base)
        mine = [r for r in recs if r.get("point") == case.point]
        said = " ".join(p for r in mine for p in r["problems"])
        detected = code == case.verify_code and mine and not mine[0]["ok"] and case.finding in said
        out = work / "out"
        r_code, _ = run_restore("--vm", vm, *base, "--restore-point", str(case.point), "--restore-path", str(out),
                                "--skip-config", *case.extra)
        refused = r_code != 0 and not any(out.glob("*.qcow2"))
        f_code, f_recs = run_restore("--vm", vm, *base, "--restore-point", str(case.point), "--restore-path",
                                     str(work / "forced"), "--skip-config", "--force", *case.extra)
        summary = f_recs[-1] if f_recs else {}
        forced = f_code == 0 and (any("--force" in w for w in summary.get("warnings") or [])
                                  or bool(summary.get("unchecked")))
        rows.append(f"{case.name:40} verify={code} detected={bool(detected)} refused={refused} forced={forced}")
        if not (detected and refused and forced):
            failures.append(f"{case.name}: verify {code} {said!r}; restore {r_code}; forced {f_code} {summary}")
    print(f"\ntamper matrix ({t_chain:.0f} s for the chain, {time.monotonic() - t0:.0f} s in all):")
    print("\n".join(rows))
    print(f"cases {len(CASES)}, detected {len(CASES) - len(failures)}")
    assert not failures, "\n".join(failures)
