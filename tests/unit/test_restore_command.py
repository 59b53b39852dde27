"""vmbk-restore in-process over trees made in tmp dirs: every point rebuilt
bit-exact, names, refusals with their exit codes, dry run, verify, dump,
listing, catalogue rows and the lock.  libvirt is its built-in test driver
(test:///default, no daemon) so collision and define paths run for real.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest
from test_restore_points import HOSTILE, Chain, MiB, three_points, vmconfig

from vmbk.catalogue import Catalogue, db_path
from vmbk.commands.restore import main
from vmbk.errors import Exit
from vmbk.lock import VmLock
from vmbk.output import Emitter
from vmbk.restore.preflight import image_name
from vmbk.stream import scan

TEST_URI = "test:///default"


def failed(recs: list[dict], code: int) -> bool:
    """A failure is one ``error`` record on stdout (and its line on stderr)."""
    return [(r["type"], r["code"]) for r in recs] == [("error", int(code))]


def run(*argv: str, uri: str | None = TEST_URI) -> tuple[int, list[dict]]:
    out = io.StringIO()
    extra = ["--connect", uri] if uri else []
    code = main(["--json", *argv, *extra], io.StringIO(""), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def restore(root: Path, vm: str, dest: Path, *extra: str) -> tuple[int, list[dict]]:
    return run("--backup-path", str(root), "--vm", vm, "--restore-path", str(dest), *extra)


def raw_of(image: Path, tmp: Path) -> bytes:
    out = tmp / (image.name + ".check.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def tree(tmp_path) -> tuple[Path, Chain]:
    root = tmp_path / "backups"
    return root, three_points(root / HOSTILE / "2026-W10", HOSTILE)


# -- restoring --------------------------------------------------------------------


@pytest.mark.parametrize("point", [0, 1, 2])
def test_every_point_restores_bit_exact(tree, tmp_path, point):
    root, chain = tree
    dest = tmp_path / "out put"
    code, recs = restore(root, HOSTILE, dest, "--restore-point", str(point), "--skip-config")
    assert code == 0, recs
    disk, summary = recs
    assert disk["type"] == "restore_disk" and summary["type"] == "restore" and summary["outcome"] == "ok"
    assert (summary["restore_point"], summary["mode"], summary["chain"]) == (point, "data", "2026-W10")
    assert files(dest) == [f"{HOSTILE}.qcow2"]
    assert raw_of(dest / f"{HOSTILE}.qcow2", tmp_path) == chain.expected[point]["vda"]
    assert oct((dest / f"{HOSTILE}.qcow2").stat().st_mode & 0o777) == "0o600"


def test_zero_frames_become_holes_and_the_image_is_thin(tree, tmp_path):
    root, _ = tree
    code, _ = restore(root, HOSTILE, tmp_path / "o", "--skip-config")
    info = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(tmp_path / "o" / f"{HOSTILE}.qcow2")],
                                     capture_output=True, check=True).stdout)
    allocated = sum(e["length"] for e in info if e["data"])
    assert code == 0 and allocated < 512 * 1024  # of a 4 MiB disk
    # inc 2 zeroed what the full wrote at 1 MiB: no data there any more
    assert not any(e["data"] and e["start"] <= MiB < e["start"] + e["length"] for e in info)


def test_compressed_multi_disk_chain_names_and_disk_selection(tmp_path):
    root = tmp_path / "b"
    c = Chain(root / "vm" / "202603", "vm")
    c.point({d: ([(0, os.urandom(100_000))], []) for d in ("vda", "vdb")}, compress=True)
    c.point({d: ([(8192, b"x" * 70_000)], [(200_000, 4096)]) for d in ("vda", "vdb")}, compress=True)
    code, recs = restore(root, "vm", tmp_path / "all", "--skip-config")
    assert code == 0 and files(tmp_path / "all") == ["vm-vda.qcow2", "vm-vdb.qcow2"]
    for d in ("vda", "vdb"):
        assert raw_of(tmp_path / "all" / f"vm-{d}.qcow2", tmp_path) == c.expected[1][d]
    code, recs = restore(root, "vm", tmp_path / "one", "--disk", "vdb", "--restore-point", "full")
    assert code == 0 and files(tmp_path / "one") == ["vm-vdb.qcow2"]
    assert recs[-1]["mode"] == "disk" and recs[-1]["disks"] == ["vdb"]
    assert raw_of(tmp_path / "one" / "vm-vdb.qcow2", tmp_path) == c.expected[0]["vdb"]
    code, _ = restore(root, "vm", tmp_path / "bad", "--disk", "vdc")
    assert code == Exit.VM and not (tmp_path / "bad").exists()


def test_image_names():
    assert image_name("web", "vda", True) == "web.qcow2"
    assert image_name("web", "sda", False) == "web-sda.qcow2"


def test_cluster_size_of_the_source_is_kept(tree, tmp_path):
    root, chain = tree
    info = {"format": "qcow2", "cluster-size": 131072, "format-specific": {"data": {"compat": "1.1"}}}
    (chain.path / "vda.virtnbdbackup.0.qcow.json").write_text(json.dumps(info))
    code, recs = restore(root, HOSTILE, tmp_path / "o", "--skip-config")
    assert code == 0 and recs[0]["qcow_options"] == ["compat=1.1", "cluster_size=131072"]
    got = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / "o" / f"{HOSTILE}.qcow2")],
                                    capture_output=True, check=True).stdout)
    assert got["cluster-size"] == 131072


def test_backup_tree_is_not_modified(tree, tmp_path):
    root, _ = tree
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / HOSTILE).rglob("*")}
    assert restore(root, HOSTILE, tmp_path / "o", "--skip-config")[0] == 0
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / HOSTILE).rglob("*")} == before


# -- refusals -----------------------------------------------------------------------


def test_restore_path_inside_the_backup_root_is_refused(tree):
    root, _ = tree
    for inside in (root, root / "x", root / HOSTILE / "2026-W10"):
        code, recs = restore(root, HOSTILE, inside, "--skip-config")
        assert code == Exit.USAGE and failed(recs, Exit.USAGE)
    assert not (root / "x").exists()


def test_path_aware_vm_refuses_its_own_root_too(tree, tmp_path):
    root, _ = tree
    code, _ = run("--vm", str(root / HOSTILE), "--restore-path", str(root / "restore"), "--skip-config")
    assert code == Exit.USAGE


def test_existing_files_need_force(tree, tmp_path):
    root, chain = tree
    dest = tmp_path / "o"
    dest.mkdir()
    (dest / f"{HOSTILE}.qcow2").write_bytes(b"precious")
    code, recs = restore(root, HOSTILE, dest, "--skip-config")
    assert code == Exit.STORAGE and failed(recs, Exit.STORAGE)
    assert (dest / f"{HOSTILE}.qcow2").read_bytes() == b"precious"
    code, _ = restore(root, HOSTILE, dest, "--skip-config", "--force")
    assert code == 0 and raw_of(dest / f"{HOSTILE}.qcow2", tmp_path) == chain.expected[2]["vda"]


def test_insufficient_space_is_a_storage_error(tree, tmp_path, monkeypatch):
    from vmbk.restore import preflight as plan

    root, _ = tree
    monkeypatch.setattr(plan, "free_space", lambda path: 1000)
    code, recs = restore(root, HOSTILE, tmp_path / "o", "--skip-config")
    assert code == Exit.STORAGE and failed(recs, Exit.STORAGE) and not (tmp_path / "o").exists()


def test_unknown_vm_bad_point_and_incomplete_chain(tree, tmp_path):
    root, chain = tree
    assert restore(root, "nope", tmp_path / "o")[0] == Exit.VM
    assert restore(root, HOSTILE, tmp_path / "o", "--restore-point", "7")[0] == Exit.USAGE
    assert restore(root, HOSTILE, tmp_path / "o", "--restore-point", "two")[0] == Exit.USAGE
    assert restore(root, HOSTILE, tmp_path / "o", "--period", "2026-W11")[0] == Exit.VM
    (chain.path / "vda.inc.virtnbdbackup.2.data").unlink()
    (chain.path / f"{HOSTILE}.cpt").write_text(json.dumps([f"virtnbdbackup.{n}" for n in range(3)]))
    assert restore(root, HOSTILE, tmp_path / "o", "--skip-config")[0] == Exit.VM
    assert restore(root, HOSTILE, tmp_path / "o", "--skip-config", "--restore-point", "1")[0] == 0
    assert not (tmp_path / "o2").exists()


def test_usage_errors():
    assert run("--vm", "x", "--restore-path", "/tmp/x", "--name", "a/b")[0] == Exit.USAGE
    assert run("--vm", "x", "--restore-path", "/tmp/x", "--name", "c", "--disk", "vda")[0] == Exit.USAGE
    assert run("--list-restore-points", "x", "--restore-point", "1")[0] == Exit.USAGE


def test_lock_held_is_exit_3(tree, tmp_path):
    root, _ = tree
    with VmLock(root, HOSTILE):
        code, recs = restore(root, HOSTILE, tmp_path / "o", "--skip-config")
    assert code == Exit.LOCK and failed(recs, Exit.LOCK) and not (tmp_path / "o").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tree, tmp_path):
    root, _ = tree
    before = sorted(p.name for p in root.rglob("*"))
    code, recs = restore(root, HOSTILE, tmp_path / "o", "--dry-run", "--skip-config")
    assert code == 0 and [r["type"] for r in recs] == ["restore_disk", "restore"]
    disk, summary = recs
    assert disk["outcome"] == summary["outcome"] == "dry-run"
    assert disk["sources"] == ["vda.full.data", "vda.inc.virtnbdbackup.1.data", "vda.inc.virtnbdbackup.2.data"]
    assert summary["files"] == [str(tmp_path / "o" / f"{HOSTILE}.qcow2")] and summary["blocked"] == []
    assert summary["needed_bytes"] > disk["data_bytes"] > 0
    assert not (tmp_path / "o").exists() and sorted(p.name for p in root.rglob("*")) == before


def test_dry_run_reports_what_blocks_the_restore(tree, tmp_path):
    root, _ = tree
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / f"{HOSTILE}.qcow2").write_bytes(b"x")
    code, recs = restore(root, HOSTILE, tmp_path / "o", "--dry-run", "--skip-config")
    assert code == Exit.STORAGE and [r["type"] for r in recs] == ["restore_disk", "restore", "error"]
    assert "exists" in recs[1]["blocked"][0] and recs[1]["blocked"][0] == recs[2]["message"]


# -- corruption ----------------------------------------------------------------------


def flip_payload_byte(path: Path) -> None:
    frame = scan(path).data_frames[0]
    with open(path, "r+b") as f:
        f.seek(frame.file_pos + 10)
        b = f.read(1)
        f.seek(frame.file_pos + 10)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_stream_fails_verify_and_restore_leaves_nothing(tree, tmp_path):
    root, chain = tree
    flip_payload_byte(chain.path / "vda.inc.virtnbdbackup.1.data")
    code, recs = run("--backup-path", str(root), "--verify", HOSTILE)
    assert code == Exit.STORAGE and recs[-1]["type"] == "error"
    bad = {r["file"]: r for r in recs[:-1] if not r["ok"]}
    assert list(bad) == ["vda.inc.virtnbdbackup.1.data"]
    assert bad["vda.inc.virtnbdbackup.1.data"]["checksum"] == "bad"
    assert bad["vda.inc.virtnbdbackup.1.data"]["structure"] == "ok"  # only the checksum sees it
    code, recs = restore(root, HOSTILE, tmp_path / "o", "--skip-config")
    assert code == Exit.STORAGE and failed(recs, Exit.STORAGE) and files(tmp_path / "o") == []
    # the full alone is still good
    assert restore(root, HOSTILE, tmp_path / "o", "--skip-config", "--restore-point", "full")[0] == 0


def test_failure_while_writing_removes_every_partial(tmp_path, monkeypatch):
    from vmbk.restore import image

    root = tmp_path / "b"
    c = Chain(root / "vm" / "202603", "vm")
    c.point({d: ([(0, b"x" * 4096)], []) for d in ("vda", "vdb")})
    real = image.write_qcow2

    def fail_second_disk(sources, target, *rest, **kw):
        if "vdb" in target.name:
            real(sources, target, *rest, **kw)  # its .partial exists, then the failure
            raise image.ToolError("simulated write failure")
        return real(sources, target, *rest, **kw)

    monkeypatch.setattr(image, "write_qcow2", fail_second_disk)
    code, recs = restore(root, "vm", tmp_path / "o", "--skip-config")
    assert code == Exit.TOOL and failed(recs, Exit.TOOL) and files(tmp_path / "o") == []


def test_verify_all_chains_and_dump(tree, tmp_path):
    root, _ = tree
    archive = root / HOSTILE / "2026-W10" / ".archives" / "chain-2026-03-01"
    Chain(archive, HOSTILE).copy({"vda": [(0, b"a" * 512)]})
    (archive / "vda.copy.data.chksum").unlink()
    code, recs = run("--backup-path", str(root), "--verify", HOSTILE)
    points = [r for r in recs if r.get("point") is not None]  # one per restore point: no manifests here
    assert [(p["point"], p["integrity"], p["status"]) for p in points] == [(n, "adler32-only", "ok") for n in range(3)]
    assert "adler32 only" in points[0]["problems"][0]
    recs = [r for r in recs if r.get("point") is None]
    assert code == 0 and len(recs) == 4 and all(r["ok"] and r["status"] == "ok" for r in recs)
    assert all(r["checksum"] == "ok" for r in recs[:3]) and recs[3]["file"] is None  # the chain's record
    assert recs[3]["restore_points"] == 3 and recs[3]["problems"] == []
    code, recs = run("--backup-path", str(root), "--verify", HOSTILE, "--all-chains")
    recs = [r for r in recs if r.get("point") is None]
    # the archive's only stream lost its .chksum: unverifiable, exit 9 (nothing checked is damaged)
    assert code == Exit.PARTIAL and len(recs) == 7 and recs[-1]["type"] == "error"
    archived = recs[4]
    assert (archived["file"], archived["checksum"], archived["status"], archived["ok"]) == (
        "vda.copy.data", "missing", "unverifiable", False)
    assert recs[5]["file"] is None and recs[5]["status"] == "ok" and "no .chksum files" in recs[5]["warnings"][0]
    code, recs = run("--backup-path", str(root), "--dump", HOSTILE)
    assert code == 0 and [r["file"] for r in recs] == ["vda.full.data", "vda.inc.virtnbdbackup.1.data",
                                                       "vda.inc.virtnbdbackup.2.data"]
    assert recs[2]["meta"]["checkpointName"] == "virtnbdbackup.2" and recs[2]["zero_frames"] == 1
    assert recs[0]["data_frames"] == 2 and recs[0]["virtual_size"] == 4 * MiB


# -- listing ---------------------------------------------------------------------


def test_list_and_list_restore_points(tree, tmp_path):
    root, _ = tree
    archive = root / HOSTILE / "2026-W10" / ".archives" / "chain-2026-03-01"
    Chain(archive, HOSTILE).copy({"vda": [(0, b"a" * 512)]})
    three_points(root / "acc", "acc", disks=("vda", "sda"))
    (root / "_state").mkdir()
    (root / "empty").mkdir()
    code, recs = run("--backup-path", str(root), "--list")
    assert code == 0 and [r["vm"] for r in recs] == ["acc", HOSTILE]
    acc, hostile = recs
    assert (acc["layout"], acc["policy"], acc["periods"], acc["restore_points"]) == ("accumulate", "accumulate", [], 3)
    assert acc["tags"] == ["multi-disk"] and acc["disks"] == ["sda", "vda"]
    assert (hostile["layout"], hostile["policy"], hostile["periods"]) == ("periodic", "weekly", ["2026-W10"])
    assert (hostile["restore_points"], hostile["archived_chains"], hostile["incomplete_points"]) == (3, 1, 0)
    assert hostile["size"] > 0

    code, recs = run("--backup-path", str(root), "--list-restore-points", HOSTILE)
    assert code == 0
    assert [(r["type"], r["chain"], r.get("index")) for r in recs] == [
        ("chain", "2026-W10", None), ("restore_point", "2026-W10", 0), ("restore_point", "2026-W10", 1),
        ("restore_point", "2026-W10", 2),
        ("chain", "2026-W10/.archives/chain-2026-03-01", None),
        ("restore_point", "2026-W10/.archives/chain-2026-03-01", 0)]
    assert [r["kind"] for r in recs if r["type"] == "restore_point"] == ["FULL", "Incremental", "Incremental", "COPY"]
    assert recs[-1]["archived"] and recs[-1]["path"] == str(archive)

    code, recs = run("--list-restore-points", str(archive))
    assert code == 0 and [r["type"] for r in recs] == ["chain", "restore_point"] and recs[1]["kind"] == "COPY"
    code, recs = run("--backup-path", str(root), "--list-restore-points", HOSTILE, "--period", "1999-W01")
    assert code == Exit.VM


def test_listing_flags_incomplete_points(tree):
    root, chain = tree
    (chain.path / "vda.inc.virtnbdbackup.2.data.partial").write_bytes(b"meta")
    (chain.path / f"{HOSTILE}.cpt").write_text(json.dumps([f"virtnbdbackup.{n}" for n in range(4)]))
    code, recs = run("--backup-path", str(root), "--list-restore-points", HOSTILE)
    chain_rec, *points = recs
    assert code == 0 and not chain_rec["complete"] and chain_rec["warnings"]
    assert [p["complete"] for p in points] == [True, True, False, False]


def test_table_on_a_terminal_shows_the_disks(tree):
    root, _ = tree
    from vmbk.restore.listing import list_points
    from vmbk.restore.source import locate

    out = io.StringIO()
    em = Emitter(out, stage="vmbk-restore", json=False)
    for rec in list_points(locate(HOSTILE, lambda: root), None):
        em.emit(rec)
    em.close()
    text = out.getvalue()
    assert "FULL" in text and "Incremental" in text and "vda" in text


# -- clone (libvirt's test driver) --------------------------------------------------------


def test_clone_defines_a_new_identity(tree, tmp_path):
    root, chain = tree
    nvram = "/var/lib/libvirt/qemu/nvram/x_VARS.fd"
    (chain.path / "vmconfig.virtnbdbackup.1.xml").write_text(vmconfig(HOSTILE, ["vda"]))
    (chain.path / "vmconfig.virtnbdbackup.2.xml").write_text(vmconfig(HOSTILE, ["vda"], nvram=nvram))
    (chain.path / "x_VARS.fd.virtnbdbackup.1").write_bytes(b"vars at 1")
    dest = tmp_path / "clones"
    code, recs = restore(root, HOSTILE, dest, "--name", "new ‘clone’", "--restore-point", "1")
    assert code == 0, recs
    summary = recs[-1]
    assert summary["mode"] == "clone" and summary["domain"]["name"] == "new ‘clone’"
    assert summary["domain"]["uuid"] != "6b3c4a2e-1111-2222-3333-444455556666"
    assert files(dest) == ["new ‘clone’.qcow2", "new ‘clone’.xml"]  # config 1 has no NVRAM
    assert raw_of(dest / "new ‘clone’.qcow2", tmp_path) == chain.expected[1]["vda"]
    xml = (dest / "new ‘clone’.xml").read_text()
    assert "52:54:00:11:22:33" not in xml and "<uuid>" not in xml and "cdrom" not in xml
    assert str(dest / "new ‘clone’.qcow2") in xml


def test_clone_copies_the_nvram_of_the_point(tree, tmp_path, monkeypatch):
    from vmbk.restore import define

    root, chain = tree
    nvram = "/var/lib/libvirt/qemu/nvram/x_VARS.fd"
    (chain.path / "vmconfig.virtnbdbackup.2.xml").write_text(vmconfig(HOSTILE, ["vda"], nvram=nvram))
    (chain.path / "x_VARS.fd.virtnbdbackup.2").write_bytes(b"vars at 2")
    (chain.path / "x_VARS.fd.virtnbdbackup.1").write_bytes(b"vars at 1")
    defined: list[str] = []
    monkeypatch.setattr(define, "define", lambda conn, xml, name, **kw: defined.append(xml) or {"name": name})
    code, recs = restore(root, HOSTILE, tmp_path / "c", "--name", "c2")
    assert code == 0, recs
    assert (tmp_path / "c" / "c2_VARS.fd").read_bytes() == b"vars at 2"
    assert f"<nvram>{tmp_path / 'c' / 'c2_VARS.fd'}</nvram>" in defined[0]
    assert recs[-1]["nvram"] == str(tmp_path / "c" / "c2_VARS.fd")


def test_clone_refuses_a_running_domain_name(tree, tmp_path):
    root, _ = tree
    code, recs = restore(root, HOSTILE, tmp_path / "c", "--name", "test")  # the test driver's running domain
    assert code == Exit.VM and failed(recs, Exit.VM) and files(tmp_path / "c") == []


def test_clone_skip_config_writes_disks_only(tree, tmp_path):
    root, _ = tree
    code, recs = restore(root, HOSTILE, tmp_path / "c", "--name", "test", "--skip-config")
    assert code == 0 and recs[-1]["domain"] is None and files(tmp_path / "c") == ["test.qcow2"]


# -- catalogue ---------------------------------------------------------------------------


def test_restore_is_recorded_when_a_catalogue_exists(tree, tmp_path):
    root, _ = tree
    assert restore(root, HOSTILE, tmp_path / "o", "--skip-config")[0] == 0
    assert not db_path(root).exists()  # no catalogue: none is created
    Catalogue.open(root).close()
    assert restore(root, HOSTILE, tmp_path / "p", "--skip-config", "--restore-point", "1")[0] == 0
    assert restore(root, HOSTILE, tmp_path / "p", "--skip-config")[0] == Exit.STORAGE  # exists
    assert restore(root, HOSTILE, tmp_path / "q", "--dry-run")[0] == 0
    db = sqlite3.connect(db_path(root))
    rows = db.execute("SELECT vm, mode, restore_point, outcome, exit_code, target FROM restore_sessions").fetchall()
    assert rows == [(HOSTILE, "data", "2026-W10:1", "ok", 0, str(tmp_path / "p")),
                    (HOSTILE, "data", "2026-W10:2", "failed", 4, str(tmp_path / "p"))]


def test_restore_path_that_is_a_file_is_a_storage_error(tree, tmp_path):
    root, _ = tree
    (tmp_path / "f").write_bytes(b"")
    code, recs = restore(root, HOSTILE, tmp_path / "f", "--skip-config")
    assert code == Exit.STORAGE and failed(recs, Exit.STORAGE)


def test_sigterm_while_checking_leaves_nothing(tree, tmp_path, monkeypatch):
    from vmbk.errors import Terminated
    from vmbk.restore import image

    root, _ = tree
    Catalogue.open(root).close()

    def terminated(argv, what, *rest):
        assert (tmp_path / "o" / f"{HOSTILE}.qcow2.partial").exists()
        raise Terminated()

    monkeypatch.setattr(image, "_qemu_img", terminated)
    code, recs = restore(root, HOSTILE, tmp_path / "o", "--skip-config")
    assert code == Exit.SIGTERM and recs == [] and files(tmp_path / "o") == []
    db = sqlite3.connect(db_path(root))
    assert db.execute("SELECT outcome, exit_code FROM restore_sessions").fetchall() == [("failed", 143)]


# -- disaster recovery (libvirt's test driver) --------------------------------------------


def test_dr_defines_the_same_identity_with_the_original_file_names(tree, tmp_path):
    root, chain = tree
    dest = tmp_path / "dr"
    code, recs = restore(root, HOSTILE, dest, "--restore-point", "1")
    assert code == 0, recs
    summary = recs[-1]
    assert summary["mode"] == "dr" and summary["domain"] == {"name": HOSTILE,
                                                               "uuid": "6b3c4a2e-1111-2222-3333-444455556666"}
    assert files(dest) == sorted(["vda.qcow2", f"{HOSTILE}.xml"])  # vda's source was .../vda.qcow2
    assert raw_of(dest / "vda.qcow2", tmp_path) == chain.expected[1]["vda"]
    xml = (dest / f"{HOSTILE}.xml").read_text()
    assert "52:54:00:11:22:33" in xml and "6b3c4a2e-1111-2222-3333-444455556666" in xml
    assert f"file=\"{dest / 'vda.qcow2'}\"" in xml and "cdrom" not in xml


def test_dr_puts_the_nvram_back_and_keeps_the_old_one(tree, tmp_path):
    root, chain = tree
    live = tmp_path / "nvram dir" / "x_VARS.fd"
    live.parent.mkdir()
    live.write_bytes(b"current vars")
    (chain.path / "vmconfig.virtnbdbackup.2.xml").write_text(vmconfig(HOSTILE, ["vda"], nvram=str(live)))
    (chain.path / "x_VARS.fd.virtnbdbackup.2").write_bytes(b"vars at 2")
    code, recs = restore(root, HOSTILE, tmp_path / "dr")
    assert code == 0, recs
    (saved,) = recs[-1]["saved_aside"]
    assert live.read_bytes() == b"vars at 2" and Path(saved).read_bytes() == b"current vars"
    assert Path(saved).name.startswith("x_VARS.fd.before-restore.") and recs[-1]["nvram"] == str(live)


def test_dr_refuses_a_running_vm_and_a_renamed_one(tmp_path):
    root = tmp_path / "b"
    c = three_points(root / "test" / "202603", "test")  # the test driver's running domain
    code, recs = restore(root, "test", tmp_path / "o", "--force")
    assert code == Exit.VM and failed(recs, Exit.VM) and "running" in recs[0]["message"]
    (c.path / "vmconfig.virtnbdbackup.2.xml").write_text(
        vmconfig("test", ["vda"]).replace("<name>test</name>", "<name>other</name>")
        .replace("6b3c4a2e-1111-2222-3333-444455556666", "6695eb01-f6a4-8304-79aa-97f2502e193f"))
    code, recs = restore(root, "test", tmp_path / "o")
    assert code == Exit.VM and "renamed" in recs[0]["message"] and files(tmp_path / "o") == []


def test_dr_without_a_domain_xml_points_at_skip_config(tree, tmp_path):
    root, chain = tree
    for p in chain.path.glob("vmconfig.*.xml"):
        p.unlink()
    code, recs = restore(root, HOSTILE, tmp_path / "o")
    assert code == Exit.VM and "--skip-config" in recs[0]["message"]
    assert restore(root, HOSTILE, tmp_path / "o", "--skip-config")[0] == 0


TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


def _with_tpm(chain) -> None:
    (chain.path / "vmconfig.virtnbdbackup.2.xml").write_text(vmconfig(HOSTILE, ["vda"], extra=TPM_XML))
    state = chain.path / "tpm-state" / "tpm2"
    state.mkdir(parents=True)
    (state / "tpm2-00.permall").write_bytes(b"sealed secrets")


def test_dr_puts_the_tpm_state_under_the_uuid_and_keeps_the_current_one(tree, tmp_path, monkeypatch):
    from vmbk.restore import tpm

    root, chain = tree
    _with_tpm(chain)
    monkeypatch.setattr(tpm, "SWTPM_ROOT", tmp_path / "swtpm")
    current = tmp_path / "swtpm" / "6b3c4a2e-1111-2222-3333-444455556666" / "tpm2"
    current.mkdir(parents=True)
    (current / "tpm2-00.permall").write_bytes(b"state of today")
    code, recs = restore(root, HOSTILE, tmp_path / "dr")
    assert code == 0, recs
    t = recs[-1]["tpm"]
    assert (t["restored"], t["path"]) == (True, str(current))
    assert (current / "tpm2-00.permall").read_bytes() == b"sealed secrets"
    assert (Path(t["saved_aside"]) / "tpm2-00.permall").read_bytes() == b"state of today"


def test_a_tpm_state_that_cannot_be_restored_makes_the_restore_partial(tree, tmp_path, monkeypatch):
    from vmbk.restore import tpm

    root, chain = tree
    _with_tpm(chain)
    blocker = tmp_path / "not a directory"
    blocker.write_bytes(b"")
    monkeypatch.setattr(tpm, "SWTPM_ROOT", blocker)
    code, recs = restore(root, HOSTILE, tmp_path / "dr")
    assert code == Exit.PARTIAL, recs
    summary, err = recs[-2:]
    assert summary["outcome"] == "partial" and summary["tpm"]["restored"] is False
    assert err["type"] == "error" and "recovery key" in err["message"]
    assert (tmp_path / "dr" / "vda.qcow2").exists()  # the disks are restored all the same
