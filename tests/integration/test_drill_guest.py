"""vmbk-drill end to end, on backups of the booted test guest and of a no-OS domain.

One production guest for the module (agent, a checkfile written before
each of two backups, a user-mode NIC that routes out, a VNC listener and
a VGA screen), backed up twice.  Then: the latest point drilled with its
checkfile configured (levels 1-4) while the production VM is watched;
the drill VM's live XML inspected while it runs; the full point and a
damaged incremental drilled together (the old checkfile; the damaged
file named; exit 9); a damaged full alone (exit 4); a no-OS domain (it
starts, shows nothing: level ``started``, exit 5); vmbk-drill killed with
SIGKILL during the boot, and the next run leaving nothing behind; SIGTERM
during the boot; a UEFI guest with a TPM (the copy gets the backup's NVRAM
and TPM state, the production VM keeps its own); and the stage after
vmbk-backup drilling the new point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import orjson
import pytest
from backup_helpers import backup_ok
from contract_doc import undocumented
from fixtures.guest import WORKDIR_BASE, unique_name
from guest.agent import Guest
from guest.domain import guest_domain_xml, make_qcow2, remove_domain, start_domain

from vmbk.catalogue import db_path
from vmbk.commands.backup import main as backup_main
from vmbk.commands.drill import main as drill_main
from vmbk.commands.report import main as report_main
from vmbk.commands.status import main as status_main
from vmbk.drill import leftovers
from vmbk.drill.isolate import MARK_TAG
from vmbk.errors import Exit
from vmbk.restore import tpm
from vmbk.stream import scan
from vmbk.virt import backupjob

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]
ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
#: Routes out (QEMU's user-mode network), listens on the host, shows a screen.
PROD_DEVICES = ("<interface type='user'><model type='virtio'/></interface>"
                "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>"
                "<video><model type='vga'/></video>")


@dataclasses.dataclass
class Prod:
    guest: Guest
    workdir: Path
    root: Path
    disk: Path
    contents: list[str]

    @property
    def name(self) -> str:
        return self.guest.name


@pytest.fixture(scope="module")
def prod(libvirt_conn, guest_image) -> Iterator[Prod]:
    WORKDIR_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="drill-", dir=WORKDIR_BASE))
    os.chmod(workdir, 0o755)
    name = unique_name()
    disk = make_qcow2(workdir / f"{name}-vda.qcow2", "64M")
    console = workdir / f"{name}-console.log"
    xml = guest_domain_xml(name, guest_image, [disk], data=["vda"], console_log=console, extra_devices=PROD_DEVICES)
    dom = start_domain(libvirt_conn, xml)
    try:
        guest = Guest(dom, console_log=console, disks=[disk])
        guest.wait_agent(timeout=120)
        root = workdir / "backups"
        root.mkdir()
        contents = []
        for n in (1, 2):
            contents.append(f"round-{n}-{uuid.uuid4().hex}")
            guest.write_file("/mnt/vda/checkfile", contents[-1].encode())
            guest.sync()
            backup_ok(root, name)
        yield Prod(guest, workdir, root, disk, contents)
    finally:
        remove_domain(dom)
        if os.environ.get("VMBK_KEEP_WORKDIR") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def env(prod, monkeypatch, tmp_path) -> Path:
    """A configuration directory, a run directory of the test's own, scratch space under the work dir."""
    run = prod.workdir / f"run-{uuid.uuid4().hex[:6]}"
    run.mkdir(mode=0o711)
    monkeypatch.setattr(backupjob, "RUN_DIR", run)
    monkeypatch.setenv("VMBK_RUN_DIR", str(run))
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    return tmp_path


def configure(etc: Path, prod: Prod, body: str = "") -> Path:
    scratch = prod.workdir / "scratch"
    (etc / "default.toml").write_text(f'[drill]\nscratch_dir = "{scratch}"\n{body}')
    return scratch


def check_config(prod: Prod, pattern: str) -> str:
    return (f'[drill.vm."{prod.name}"]\nfile = "/mnt/vda/checkfile"\npattern = "{pattern}"\n'
            f'command = ["/bin/sh", "-c", "test -s /mnt/vda/checkfile"]\n')


def drill(root: Path, *argv: str, stdin: str = "") -> tuple[int, list[dict[str, Any]]]:
    out = io.StringIO()
    code = drill_main(["--json", "--backup-path", str(root), *argv], io.StringIO(stdin), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def verdicts(rec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["check"], c["verdict"]) for c in rec["checks"]]


def drill_domains(conn: Any, vm: str) -> list[str]:
    return [d.name() for d in conn.listAllDomains(0) if d.name().startswith(f"{vm}-drill-")]


def drill_networks(conn: Any, uuids: set[str]) -> list[str]:
    return [n.name() for n in conn.listAllNetworks(0) if n.name().startswith("vmbk-drill-")
            and any(n.name() == f"vmbk-drill-{u[:8]}" for u in uuids)]


def assert_nothing_left(conn: Any, prod: Prod, scratch: Path, recs: list[dict[str, Any]]) -> None:
    uuids = {r["uuid"] for r in recs if r["type"] == "drill"}
    assert drill_domains(conn, prod.name) == []
    assert drill_networks(conn, uuids) == []
    assert not scratch.exists() or list(scratch.iterdir()) == []
    assert list(leftovers.run_dir().glob("*drill-*")) == []
    assert not [u for u in uuids if tpm.state_dir(u).exists()]


def bitmaps(disk: Path) -> list[str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)], check=True,
                                     capture_output=True).stdout)
    return sorted(b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def watched(prod: Prod) -> dict[str, Any]:
    dom = prod.guest.dom
    return {"uuid": dom.UUIDString(), "mtime": prod.disk.stat().st_mtime_ns, "bitmaps": bitmaps(prod.disk),
            "checkpoints": sorted(c.getName() for c in dom.listAllCheckpoints(0)), "id": dom.ID(),
            "xml": dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)}


def flip_payload(path: Path) -> None:
    frame = scan(path).data_frames[0]
    with open(path, "r+b") as f:
        f.seek(frame.file_pos + 100)
        b = f.read(1)
        f.seek(frame.file_pos + 100)
        f.write(bytes([b[0] ^ 0xFF]))


def copy_tree(prod: Prod, dest: Path) -> Path:
    (dest / prod.name).parent.mkdir(parents=True)
    shutil.copytree(prod.root / prod.name, dest / prod.name)
    return next(p for p in (dest / prod.name).iterdir() if p.is_dir())


def in_thread(root: Path, conn: Any, vm: str, *argv: str) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """vmbk-drill in a thread, and what is seen while it runs: the drill VM's live XML, its
    network's XML, whether its TPM state is in place."""
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(zip(("code", "recs"), drill(root, "--vm", vm, *argv))))
    t.start()
    seen: dict[str, Any] = {}
    while t.is_alive():
        for d in conn.listAllDomains(0):
            if d.name().startswith(f"{vm}-drill-") and "domain" not in seen:
                with contextlib.suppress(libvirt.libvirtError):
                    xml = d.XMLDesc(0)
                    net = ET.fromstring(xml).find("devices/interface/source")
                    seen["network"] = conn.networkLookupByName(net.get("network")).XMLDesc(0) if net is not None \
                        else None
                    seen["tpm"] = tpm.state_dir(d.UUIDString()).joinpath("tpm2").is_dir()
                    seen["domain"] = xml
        time.sleep(0.1)
    return result["code"], result["recs"], seen


# -- the tests -------------------------------------------------------------------------------------------------


def test_the_latest_point_passes_levels_1_to_4_isolated_and_the_production_vm_is_untouched(
        prod, env, libvirt_conn, tmp_path):
    scratch = configure(env, prod, check_config(prod, f"^{prod.contents[1]}$"))
    before = watched(prod)
    t0 = time.monotonic()
    code, recs, seen = in_thread(prod.root, libvirt_conn, prod.name)
    seconds = time.monotonic() - t0
    assert code == 0, recs
    (rec,) = recs
    assert rec["type"] == "drill" and rec["outcome"] == "ok" and rec["level"] == "check" and rec["why"] == "latest"
    assert verdicts(rec) == [("resources", "passed"), ("disks", "passed"), ("start", "passed"), ("agent", "passed"),
                             ("check", "passed")], rec["checks"]
    assert rec["point"]["restore_point"] == 1 and rec["point"]["archived"] is False
    assert "every stream matches its .chksum" in rec["checks"][1]["detail"]
    assert prod.contents[1] in rec["checks"][4]["detail"] and "exited 0" in rec["checks"][4]["detail"]
    assert rec["os"]["kernel"] and rec["os"]["name"].startswith("Linux ")
    assert rec["name"].startswith(f"{prod.name}-drill-") and rec["uuid"] != before["uuid"]
    png = Path(rec["screenshot"])
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.is_relative_to(prod.root / "_state" / "drills")
    assert "vmbk-init" in Path(rec["console"]).read_text()

    # isolated: its one NIC on the drill's network, which forwards nowhere and gives the host no address
    live = ET.fromstring(seen["domain"])
    ifaces = live.findall("devices/interface")
    assert [(i.get("type"), i.find("source").get("network")) for i in ifaces] == [("network", rec["network"])]
    net = ET.fromstring(seen["network"])
    assert net.find("forward") is None and net.find("ip") is None and net.find(f"metadata/{MARK_TAG}") is not None
    assert live.find("devices/graphics") is None and live.find(f"metadata/{MARK_TAG}").get("uuid") == rec["uuid"]
    assert all(s.get("type") == "file" and str(scratch) in s.find("source").get("path")
               for s in live.findall("devices/serial"))
    assert live.find("uuid").text == rec["uuid"]

    # the production VM: same identity, disks, bitmaps, checkpoints; its guest answers, its checkfile as it was
    after = watched(prod)
    assert after == before
    assert prod.guest.read_file("/mnt/vda/checkfile").decode() == prod.contents[1]
    assert_nothing_left(libvirt_conn, prod, scratch, recs)

    # the catalogue, vmbk-status, the HTML report, the contract
    db = sqlite3.connect(db_path(prod.root))
    (row,) = db.execute("SELECT outcome, level, restore_point, exit_code, screenshot FROM drills WHERE vm = ? "
                        "AND name = ?", (prod.name, rec["name"])).fetchall()
    assert row == ("ok", "check", f"{rec['point']['chain']}:1", 0, rec["screenshot"])
    assert db.execute("SELECT count(*) FROM restore_sessions WHERE vm = ? AND mode = 'drill'",
                      (prod.name,)).fetchone()[0] >= 1
    out = io.StringIO()
    status_main(["--json", "--backup-path", str(prod.root), "--vm", prod.name], io.StringIO(""), out)
    status = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert status[0]["last_drill"]["level"] == "check" and status[0]["last_drill"]["outcome"] == "ok"
    page = tmp_path / "report.html"
    report_main(["--json", "--html", str(page)], io.StringIO("".join(json.dumps(r) + "\n" for r in recs)),
                io.StringIO())
    html = page.read_text()
    assert "Restore drills" in html and "data:image/png;base64," in html
    assert undocumented(recs + status) == {}
    print(f"\ndrill of the latest point: {rec['seconds']:.1f} s in the record, {seconds:.1f} s in all; "
          + ", ".join(f"{c['check']} {c['seconds']:.1f} s" for c in rec["checks"]))


def test_the_old_point_shows_its_checkfile_and_a_damaged_newer_one_fails_at_the_disks_naming_it(
        prod, env, libvirt_conn, tmp_path):
    copy = tmp_path / "copy"
    chain = copy_tree(prod, copy)
    damaged = next(chain.glob("vda.inc.*.data"))
    flip_payload(damaged)
    scratch = configure(env, prod, check_config(prod, f"^{prod.contents[0]}$"))
    code, recs = drill(copy, "--vm", prod.name, "--point", "0", "--sample", "1")
    assert code == Exit.PARTIAL, recs
    old, new, err = recs
    assert (old["why"], old["point"]["restore_point"], old["outcome"], old["level"]) == ("index", 0, "ok", "check")
    assert prod.contents[0] in old["checks"][-1]["detail"]
    assert (new["why"], new["point"]["restore_point"], new["outcome"], new["level"]) == ("sample", 1, "failed", "none")
    assert verdicts(new) == [("resources", "passed"), ("disks", "failed")]
    assert damaged.name in new["checks"][1]["detail"] and ".chksum says" in new["checks"][1]["detail"]
    assert (err["type"], err["kind"], err["code"], err["vm"]) == ("error", "drill", Exit.STORAGE, prod.name)
    assert damaged.name in err["message"]
    assert_nothing_left(libvirt_conn, prod, scratch, recs)


def test_a_damaged_full_alone_is_a_storage_failure(prod, env, libvirt_conn, tmp_path):
    copy = tmp_path / "copy"
    chain = copy_tree(prod, copy)
    flip_payload(chain / "vda.full.data")
    scratch = configure(env, prod)
    code, recs = drill(copy, "--vm", prod.name)
    assert code == Exit.STORAGE, recs
    rec, err = recs
    assert rec["outcome"] == "failed" and rec["level"] == "none" and "vda.full.data" in rec["error"]
    assert err["code"] == Exit.STORAGE
    assert_nothing_left(libvirt_conn, prod, scratch, recs)


def test_a_vm_that_cannot_boot_reaches_started_and_says_so(nos_domain, env, prod, libvirt_conn, tmp_path):
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)])
    root = tmp_path / "nos-backups"
    root.mkdir()
    backup_ok(root, nd.name)
    scratch = configure(env, prod)
    code, recs = drill(root, "--vm", nd.name, "--boot-timeout", "4")
    assert code == Exit.VM, recs
    rec, err = recs
    assert rec["level"] == "started" and rec["outcome"] == "failed" and rec["os"] is None
    assert verdicts(rec) == [("resources", "passed"), ("disks", "passed"), ("start", "passed"),
                             ("console", "failed")]
    assert "does not show 'login:' in 4 s" in rec["checks"][3]["detail"]
    assert "no readable file system: vda: no partition table, no file system" in rec["checks"][3]["detail"]
    assert rec["network"] is None or rec["network"].startswith("vmbk-drill-")
    assert err["code"] == Exit.VM and err["kind"] == "drill"
    assert drill_domains(libvirt_conn, nd.name) == [] and list(scratch.iterdir()) == []


@contextlib.contextmanager
def booting(prod: Prod, conn: Any) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """A vmbk-drill process of the latest point, once its VM is started (the boot under way),
    and what its marker names; the process is killed afterwards if it still runs."""
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-drill"), "--json", "--backup-path", str(prod.root),
                          "--vm", prod.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    try:
        while not drill_domains(conn, prod.name):
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else p.returncode
            assert time.monotonic() < deadline, "no drill VM started"
            time.sleep(0.05)
        (marker,) = leftovers.run_dir().glob("drill-*.json")
        yield p, {**json.loads(marker.read_text()), "marker": marker}
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_kill_9_during_the_boot_then_the_next_run_leaves_nothing(prod, env, libvirt_conn):
    scratch = configure(env, prod)
    with booting(prod, libvirt_conn) as (p, left):
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    assert p.returncode == -signal.SIGKILL
    # libvirtd destroys the transient domain with the connection; the rest waits for the next run
    until = time.monotonic() + 10
    while drill_domains(libvirt_conn, prod.name) and time.monotonic() < until:
        time.sleep(0.1)
    assert drill_domains(libvirt_conn, prod.name) == []
    assert left["marker"].exists() and Path(left["scratch"]).exists()
    assert drill_networks(libvirt_conn, {left["uuid"]}) == [left["network"]]
    code, recs = drill(prod.root)  # a run with nothing to drill still sweeps
    assert (code, recs) == (0, [])
    assert_nothing_left(libvirt_conn, prod, scratch, [{"type": "drill", "uuid": left["uuid"]}])
    assert prod.guest.read_file("/mnt/vda/checkfile").decode() == prod.contents[1]


def test_sigterm_during_the_boot_removes_everything_before_it_exits(prod, env, libvirt_conn):
    scratch = configure(env, prod)
    with booting(prod, libvirt_conn) as (p, left):
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == Exit.SIGTERM, err
    assert "terminated" in err.decode()
    # no sweep: it cleaned up itself
    assert_nothing_left(libvirt_conn, prod, scratch, [{"type": "drill", "uuid": left["uuid"]}])
    db = sqlite3.connect(db_path(prod.root))
    outcome, code, error = db.execute("SELECT outcome, exit_code, error FROM drills WHERE name = ?",
                                      (left["name"],)).fetchone()
    assert (outcome, code) == ("failed", Exit.SIGTERM) and error.endswith(" interrupted")


def test_uefi_and_tpm_the_copy_gets_the_nvram_and_tpm_state_a_clone_gets(test_guest, env, prod, libvirt_conn,
                                                                         vm_workdir):
    g = test_guest(data_size="64M", uefi=True, tpm=True)
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, g.name)
    chain = next(p for p in (root / g.name).iterdir() if p.is_dir())
    assert (chain / "tpm-state" / "tpm2").is_dir() and list(chain.glob("*_VARS.fd.*"))
    nvram = Path(ET.fromstring(g.dom.XMLDesc(0)).find("os/nvram").text)
    prod_tpm = tpm.state_dir(g.dom.UUIDString()) / "tpm2"
    before = (nvram.read_bytes(), {p.name: p.read_bytes() for p in prod_tpm.iterdir()})
    scratch = configure(env, prod, f'[drill.vm."{g.name}"]\ncommand = ["/bin/sh", "-c", "test -e /dev/tpm0"]\n')
    code, recs, seen = in_thread(root, libvirt_conn, g.name)
    assert code == 0, recs
    (rec,) = recs
    assert rec["level"] == "check" and not [w for w in rec["warnings"] if "TPM" in w], rec
    xml = ET.fromstring(seen["domain"])
    assert Path(xml.find("os/nvram").text).parent == scratch / rec["name"]  # the backup's NVRAM, copied
    assert xml.find("devices/tpm/backend").get("type") == "emulator" and seen["tpm"]
    assert (nvram.read_bytes(), {p.name: p.read_bytes() for p in prod_tpm.iterdir()}) == before
    assert not tpm.state_dir(rec["uuid"]).exists()
    assert_nothing_left(libvirt_conn, prod, scratch, recs)


def test_as_a_stage_it_drills_the_point_the_backup_just_made(prod, env, libvirt_conn):
    """``vmbk-backup --vm VM | vmbk-drill``: the backup record first, as it came, then its point's drill.
    (Last in the module: it adds a point to the tree the tests above drill.)"""
    scratch = configure(env, prod, check_config(prod, "^round-3-"))
    prod.guest.write_file("/mnt/vda/checkfile", f"round-3-{uuid.uuid4().hex}".encode())
    prod.guest.sync()
    out = io.StringIO()
    assert backup_main(["--json", "--backup-path", str(prod.root), "--vm", prod.name], io.StringIO(""), out) == 0
    code, recs = drill(prod.root, stdin=out.getvalue())
    assert code == 0, recs
    backup, rec = recs
    assert backup == orjson.loads(out.getvalue()) and backup["action"] == "inc"
    assert (rec["why"], rec["point"]["checkpoint"], rec["outcome"], rec["level"]) == (
        "backup", backup["checkpoint"], "ok", "check")
    assert rec["point"]["chain_path"] == backup["target_dir"]
    assert_nothing_left(libvirt_conn, prod, scratch, recs)
