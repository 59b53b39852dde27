"""vmbk-restore --serve against real NBD clients: qemu-img, nbdcopy, nbdinfo, vmbk's own reader.

Trees are synthetic (tests/access_helpers.py: random data, data that is
zero, zero frames and holes over a full and incrementals), so every point
has a reference image; one chain is lz4-compressed and one archived.  The
server runs as `vmbk-restore --serve` in a process of its own, stopped by
a signal as a person would stop it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from access_helpers import MiB, allocated, chain_tree, first_record, leftovers, spawn, stop, write_raw
from contract_doc import undocumented
from tls_helpers import certificates

from vmbk.errors import Exit
from vmbk.nbd import ALLOCATION, Reader

pytestmark = pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="libnbd-bin is not installed")


@dataclasses.dataclass
class Trees:
    root: Path
    refs: dict[tuple[str, int, str], Path]  # (vm, point, disk) -> raw reference
    archive: Path


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Trees:
    base = tmp_path_factory.mktemp("serve")
    root = base / "backups"
    refs: dict[tuple[str, int, str], Path] = {}
    archive = root / "arch" / "2026-W09" / ".archives" / "chain-2026-03-01"
    for vm, chain, kw in (("plain", root / "plain" / "2026-W10", {"points": 3, "disks": ("vda", "vdb")}),
                          ("comp", root / "comp" / "2026-W10", {"points": 2, "compressed": True, "seed": 2}),
                          ("arch", archive, {"points": 2, "seed": 3})):
        for n, disks in chain_tree(chain, vm, **kw).items():
            for disk, data in disks.items():
                refs[(vm, n, disk)] = write_raw(base / f"{vm}-{n}-{disk}.raw", data)
    chain_tree(root / "arch" / "2026-W10", "arch", points=1, seed=4)  # the active chain, newer than the archive
    return Trees(root, refs, archive)


def serve(trees: Trees, vm: str, *argv: str) -> tuple[subprocess.Popen[bytes], dict]:
    where = ["--vm", vm] if "/" in vm else ["--backup-path", str(trees.root), "--vm", vm]
    proc = spawn(*where, "--serve", *argv)
    return proc, first_record(proc)


def qemu_img(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *argv], capture_output=True, text=True, check=False)


def nbdinfo(*argv: str) -> dict:
    r = subprocess.run(["nbdinfo", "--json", *argv], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


@pytest.mark.parametrize("vm,point", [("plain", 0), ("plain", 1), ("plain", 2), ("comp", 0), ("comp", 1),
                                      ("archive", 0), ("archive", 1)])
def test_every_export_is_its_points_reference(trees, vm, point):
    """qemu-img compare of each served export with the reference of that point (archived, lz4 too)."""
    name = str(trees.archive) if vm == "archive" else vm
    proc, rec = serve(trees, name, "--restore-point", str(point))
    try:
        assert rec["type"] == "serve" and rec["restore_point"] == point and rec["verified"] and rec["unchecked"] == []
        assert undocumented([rec]) == {}  # vmbk-json(7)
        vm = "arch" if vm == "archive" else vm
        disks = sorted(d for (v, n, d) in trees.refs if (v, n) == (vm, point))
        assert [e["name"] for e in rec["exports"]] == disks
        for export in rec["exports"]:
            r = qemu_img("compare", "-f", "raw", "-F", "raw", export["uri"], str(trees.refs[(vm, point, export["name"])]))
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        assert stop(proc, signal.SIGTERM) == 0


def test_clients_see_the_holes_and_copy_sparse(trees, tmp_path):
    proc, rec = serve(trees, "plain", "--disk", "vdb")
    try:
        (export,) = rec["exports"]
        uri, ref, size = export["uri"], trees.refs[("plain", 2, "vdb")], export["virtual_size"]
        extents = nbdinfo("--map", uri)
        holes = [(e["offset"], e["length"]) for e in extents if e["type"] == 3]
        data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
        assert {e["type"] for e in extents} == {0, 3} and holes
        assert sum(n for _, n in data) == export["data_bytes"] < size // 2
        with open(ref, "rb") as f:  # the holes the server reports read as zero in the reference
            for off, n in holes:
                f.seek(off)
                assert f.read(n).count(0) == n

        def inside_data(ranges: list[tuple[int, int]], unit: int = 1) -> bool:
            """Every ``unit`` of ``ranges`` (a qcow2 cluster) holds some of the export's data."""
            if unit == 1:
                return all(any(d <= o and o + n <= d + m for d, m in data) for o, n in ranges)
            pieces = [(c, unit) for o, n in ranges for c in range(o, o + n, unit)]
            return all(any(d < c + u and c < d + m for d, m in data) for c, u in pieces)

        copy = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", "--connections=4", uri, str(copy)], check=True)
        assert copy.read_bytes() == ref.read_bytes()
        assert inside_data(allocated(copy))  # nothing written where the export has holes
        qcow = tmp_path / "conv.qcow2"
        assert qemu_img("convert", "-f", "raw", "-O", "qcow2", uri, str(qcow)).returncode == 0
        assert qemu_img("compare", "-f", "qcow2", "-F", "raw", str(qcow), str(ref)).returncode == 0
        mapped = json.loads(qemu_img("map", "--output=json", str(qcow)).stdout)
        assert inside_data([(m["start"], m["length"]) for m in mapped if m["data"]], 65536)
    finally:
        assert stop(proc, signal.SIGINT) == 0


def test_nbdinfo_lists_every_disk_of_the_point(trees):
    proc, rec = serve(trees, "plain", "--restore-point", "1")
    try:
        listed = nbdinfo("--list", rec["exports"][0]["uri"])
        exports = {e["export-name"]: e for e in listed["exports"]}
        assert sorted(exports) == ["vda", "vdb"]
        assert all(e["export-size"] == 64 * MiB and e["is_read_only"] and e["can_multi_conn"] for e in exports.values())
        assert "restore point 1 (virtnbdbackup.1" in exports["vdb"]["description"]
        assert listed["protocol"] == "newstyle-fixed" and listed["TLS"] is False
    finally:
        assert stop(proc, signal.SIGTERM) == 0


def test_vmbk_reader_reads_the_export_with_four_connections(trees):
    proc, rec = serve(trees, "comp")
    try:
        export = rec["exports"][0]
        ref = trees.refs[("comp", 1, "vda")].read_bytes()
        with Reader(export["uri"], connections=4) as reader:
            assert reader.connections == 4 and reader.contexts == (ALLOCATION,)
            image = bytearray(reader.size)
            for chunk in reader.read(reader.extents()):
                if chunk.data is not None:
                    image[chunk.offset:chunk.offset + chunk.length] = chunk.data
        assert image == ref
    finally:
        assert stop(proc, signal.SIGTERM) == 0


def test_a_deleted_chain_keeps_serving_what_was_opened(trees, tmp_path):
    """rotate may delete (or a backup archive) the chain while it is served: the open files still read."""
    copy = tmp_path / "copy"
    shutil.copytree(trees.root / "plain", copy / "plain")
    proc, rec = serve(trees, str(copy / "plain"), "--restore-point", "2")
    try:
        shutil.rmtree(copy)
        export = rec["exports"][0]
        r = qemu_img("compare", "-f", "raw", "-F", "raw", export["uri"], str(trees.refs[("plain", 2, export["name"])]))
        assert r.returncode == 0, r.stderr
    finally:
        assert stop(proc, signal.SIGTERM) == 0


def test_tls_with_client_certificates(trees, tmp_path):
    certs = certificates(tmp_path)
    proc, rec = serve(trees, "plain", "--listen", "127.0.0.1:0", "--tls-cert", str(certs / "server-cert.pem"),
                      "--tls-key", str(certs / "server-key.pem"), "--tls-ca", str(certs / "ca-cert.pem"),
                      "--disk", "vda")
    try:
        uri = rec["exports"][0]["uri"]
        assert rec["tls"] and uri.startswith("nbds://127.0.0.1:") and rec["listen"] == uri.split("/")[2]
        assert undocumented([rec]) == {}
        with_cert = f"{uri}?tls-certificates={certs}"
        ok = subprocess.run(["nbdcopy", with_cert, str(tmp_path / "tls.raw")], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        assert (tmp_path / "tls.raw").read_bytes() == trees.refs[("plain", 2, "vda")].read_bytes()
        plain = subprocess.run(["nbdinfo", uri.replace("nbds://", "nbd://")], capture_output=True, text=True)
        assert plain.returncode != 0  # TLS is required
        anonymous = tmp_path / "anon"
        anonymous.mkdir()
        shutil.copy(certs / "ca-cert.pem", anonymous / "ca-cert.pem")
        no_cert = subprocess.run(["nbdinfo", f"{uri}?tls-certificates={anonymous}"], capture_output=True, text=True)
        assert no_cert.returncode != 0  # --tls-ca: a client without a certificate is refused
    finally:
        assert stop(proc, signal.SIGTERM) == 0


def test_refusals_before_anything_is_served(trees, tmp_path):
    proc = spawn("--backup-path", str(trees.root), "--vm", "plain", "--serve", "--listen", "0.0.0.0:0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == Exit.USAGE and b"--tls-cert" in err
    bad = tmp_path / "bad"
    shutil.copytree(trees.root / "plain", bad / "plain")
    victim = bad / "plain" / "2026-W10" / "vda.inc.virtnbdbackup.1.data"
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    proc = spawn("--vm", str(bad / "plain"), "--serve")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == Exit.STORAGE and b"adler32" in err
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["error"]
    proc = spawn("--vm", str(bad / "plain"), "--serve", "--no-verify", "--restore-point", "0", "--timeout", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and json.loads(out.splitlines()[0])["verified"] is False
    assert leftovers() == ([], [], [])
