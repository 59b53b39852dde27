"""vmbk-discover against real libvirt: the host's domains in every shape.

One module-scoped set of domains (defining them is the slow part): running,
shut off, transient, UEFI with NVRAM and TPM, several disks with a cdrom
and a raw disk.  Each test runs the real command in-process and checks the
records it prints.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import orjson
import pytest

from vmbk.commands.discover import main as discover_main

pytestmark = pytest.mark.libvirt

BASE = Path("/var/tmp/vmbk-tests")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def disk_xml(path: Path, dev: str, fmt: str = "qcow2", device: str = "disk", bus: str = "virtio") -> str:
    ro = "<readonly/>" if device == "cdrom" else ""
    src = f"<source file='{escape(str(path))}'/>" if path else ""
    return (f"<disk type='file' device='{device}'><driver name='qemu' type='{fmt}'/>{src}"
            f"<target dev='{dev}' bus='{bus}'/>{ro}</disk>")


def domain_xml(name: str, disks: str, *, os_xml: str = "<type arch='x86_64'>hvm</type>", extra: str = "") -> str:
    return (f"<domain type='qemu'><name>{escape(name)}</name><memory unit='MiB'>64</memory>"
            f"<os>{os_xml}</os><features><acpi/></features><devices>{disks}{extra}"
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
            "</devices></domain>")


@pytest.fixture(scope="module")
def host(libvirt_conn):
    """Define the test domains; undefine everything afterwards."""
    import libvirt

    BASE.mkdir(parents=True, exist_ok=True)
    os.chmod(BASE, 0o711)
    work = BASE / f"discover-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    os.chmod(work, 0o755)
    tag = work.name
    names = {
        "running": f"{tag} running",
        "off": f"{tag} off 'q' ü",
        "transient": f"{tag}-transient",
        "uefi": f"{tag}-uefi-tpm",
        "multi": f"{tag}-multi",
    }
    for n in ("a", "b", "c", "d", "e"):
        qemu_img("create", "-q", "-f", "qcow2", str(work / f"{n}.qcow2"), "32M")
    qemu_img("create", "-q", "-f", "raw", str(work / "raw.img"), "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(work / "v2.qcow2"), "8M")
    qemu_img("bitmap", "--add", str(work / "e.qcow2"), "virtnbdbackup.0")
    (work / "cd.iso").write_bytes(b"\0" * 2048)
    domains = []
    try:
        d = libvirt_conn.defineXML(domain_xml(names["running"], disk_xml(work / "a.qcow2", "vda")))
        domains.append(d)
        d.create()
        domains.append(libvirt_conn.defineXML(domain_xml(names["off"], disk_xml(work / "b.qcow2", "vda"))))
        domains.append(libvirt_conn.createXML(domain_xml(names["transient"], disk_xml(work / "c.qcow2", "vda")), 0))
        uefi_os = ("<type arch='x86_64' machine='q35'>hvm</type>"
                   "<loader readonly='yes' secure='no' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                   "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>")
        tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
        domains.append(libvirt_conn.defineXML(domain_xml(
            names["uefi"], disk_xml(work / "d.qcow2", "vda"), os_xml=uefi_os, extra=tpm)))
        multi_disks = (disk_xml(work / "e.qcow2", "vda") + disk_xml(work / "raw.img", "vdb", fmt="raw")
                       + disk_xml(work / "v2.qcow2", "vdc") + disk_xml(work / "cd.iso", "sda", "raw", "cdrom", "sata"))
        domains.append(libvirt_conn.defineXML(domain_xml(names["multi"], multi_disks)))
        yield names, work
    finally:
        for d in domains:
            try:
                if d.isActive():
                    d.destroy()
            except libvirt.libvirtError:
                pass
            try:
                d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass
        shutil.rmtree(work, ignore_errors=True)


def discover(*argv: str) -> tuple[int, dict[str, dict]]:
    out = io.StringIO()
    code = discover_main(["--json", *argv], io.StringIO(""), out)
    recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    return code, {r.get("name") or r.get("vm"): r for r in recs}


def test_all_domains_running_or_not(host):
    names, _ = host
    code, recs = discover()
    assert code == 0
    for n in names.values():
        assert recs[n]["type"] == "vm" and recs[n]["v"] == 1
    sessions = {r["session"] for r in recs.values()}
    assert len(sessions) == 1
    assert recs[names["running"]]["state"] == "running" and recs[names["running"]]["persistent"] is True
    assert recs[names["off"]]["state"] == "shut off"
    assert recs[names["transient"]]["persistent"] is False and recs[names["transient"]]["state"] == "running"


def test_uefi_nvram_and_tpm(host):
    names, _ = host
    _, recs = discover("--vm", names["uefi"])
    vm = recs[names["uefi"]]
    assert vm["firmware"]["type"] == "uefi"
    assert vm["firmware"]["loader"] == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert vm["firmware"]["nvram"].endswith("_VARS.fd")
    assert vm["tpm"]["model"] == "tpm-crb" and vm["tpm"]["version"] == "2.0"
    assert vm["tpm"]["state_dir"] == f"/var/lib/libvirt/swtpm/{vm['uuid']}"


def test_disks_of_every_kind(host):
    names, work = host
    _, recs = discover("--vm", names["multi"])
    disks = {d["target"]: d for d in recs[names["multi"]]["disks"]}
    assert disks["vda"]["checkpoint_capable"] is True
    assert disks["vda"]["bitmaps"] == [{"name": "virtnbdbackup.0", "flags": ["auto"], "granularity": 65536}]
    assert disks["vda"]["virtual_size"] == 32 << 20
    assert disks["vdb"]["format"] == "raw" and disks["vdb"]["checkpoint_capable"] is False
    assert disks["vdc"]["compat"] == "0.10" and disks["vdc"]["checkpoint_capable"] is False
    assert disks["sda"]["device"] == "cdrom" and disks["sda"]["readonly"] is True
    assert "checkpoint_capable" not in disks["sda"]
    assert abs(disks["vda"]["mtime"] - (work / "e.qcow2").stat().st_mtime) < 1e-3


def test_agent_that_does_not_answer_costs_at_most_its_timeout(host):
    import time

    names, _ = host
    t = time.monotonic()
    _, recs = discover("--vm", names["running"])
    assert recs[names["running"]]["agent_channel"] is True
    assert recs[names["running"]]["agent"] is False  # no OS, no agent
    assert time.monotonic() - t < 5


@pytest.mark.guest
def test_agent_that_answers(test_guest):
    guest = test_guest()
    _, recs = discover("--vm", guest.name)
    assert recs[guest.name]["agent"] is True


def test_policy_override_and_exclusion_from_config(host, tmp_path, monkeypatch):
    names, _ = host
    (tmp_path / "default.toml").write_text(
        f'policy = "weekly"\nexclude = ["*-multi"]\n[vm."{names["off"]}"]\npolicy = "daily"\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    _, recs = discover("--vm", f"{names['off']},{names['multi']}", "--vm", names["running"])
    assert (recs[names["off"]]["policy"], recs[names["off"]]["policy_source"]) == ("daily", "override")
    assert recs[names["running"]]["policy"] == "weekly" and recs[names["running"]]["excluded"] is False
    assert recs[names["multi"]]["excluded"] is True and "*-multi" in recs[names["multi"]]["reason"]


def test_unknown_name_is_an_error_record_and_exit_5(host):
    names, _ = host
    code, recs = discover("--vm", "no-such-vm-xyz")
    assert code == 5 and recs["no-such-vm-xyz"]["type"] == "error"
    code, recs = discover("--vm", "no-such-vm-xyz", "--vm", names["off"])
    assert code == 9 and recs[names["off"]]["type"] == "vm"
