"""vmbk.restore.clone: the clone's domain XML (pure) and where its NVRAM comes from."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from test_restore_points import Chain

from vmbk.restore.domainxml import clone_xml
from vmbk.tree.points import restore_points
from vmbk.restore.vmconfig import nvram_backup, point_config
from vmbk.tree import scan_vm

SOURCE = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web "one"</name>
  <uuid>6b3c4a2e-1111-2222-3333-444455556666</uuid>
  <genid>a1b2c3d4-0000-0000-0000-000000000000</genid>
  <metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>
    <libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo></metadata>
  <sysinfo type='smbios'><system><entry name='manufacturer'>ACME</entry>
    <entry name='uuid'>6b3c4a2e-1111-2222-3333-444455556666</entry></system></sysinfo>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web "one"_VARS.fd</nvram></os>
  <devices>
    <disk type='volume' device='disk'><driver name='qemu' type='raw' cache='none' discard='unmap'/>
      <source pool='default' volume='web.img'/><backingStore/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/images/web-data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/images/scratch.qcow2'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/debian.iso'/><target dev='sda' bus='sata'/></disk>
    <interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/></interface>
    <serial type='file'><source path='/var/log/vm/web "one"-console.log'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='/run/x/other.sock'/><target type='virtio' name='x'/></channel>
    <channel type='unix'><source mode='connect' path='/run/svc/shared.sock'/><target type='virtio' name='y'/></channel>
    <console type='file'><source path='/var/log/vm/console.log'/><log file='/var/log/vm/boot.log'/><target type='serial'/></console>
    <parallel type='dev'><source path='/dev/parport0'/><target port='0'/></parallel>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
  <qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>
</domain>"""


def test_clone_xml_new_identity_and_own_files():
    disks = {"vda": Path("/r/c-vda.qcow2"), "vdb": Path("/r/c-vdb.qcow2")}
    xml, warnings = clone_xml(SOURCE, name="c", disks=disks, nvram=Path("/r/c_VARS.fd"))
    root = ET.fromstring(xml)
    assert root.findtext("name") == "c" and root.find("uuid") is None
    assert root.find("genid") is not None and not (root.find("genid").text or "").strip()
    assert [e.get("name") for e in root.iterfind("sysinfo/system/entry")] == ["manufacturer"]
    nv = root.find("os/nvram")
    assert nv.text == "/r/c_VARS.fd" and nv.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    got = {d.find("target").get("dev"): d for d in root.iterfind("devices/disk")}
    assert sorted(got) == ["vda", "vdb"]
    for dev, path in disks.items():
        d = got[dev]
        assert d.get("type") == "file" and d.find("source").attrib == {"file": str(path)}
        assert d.find("driver").get("type") == "qcow2" and d.find("backingStore") is None
    assert got["vda"].find("driver").get("discard") == "unmap"  # other driver settings kept
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"
    assert root.find("devices/serial/source").get("path") == "/var/log/vm/c-console.log"
    # files the clone writes or binds get its name even when theirs did not hold the original
    channels = [c.find("source").get("path") for c in root.iterfind("devices/channel")]
    assert channels == ["/run/x/c-other.sock", "/run/svc/shared.sock"]  # a socket it connects to is shared
    console = root.find("devices/console")
    assert (console.find("source").get("path"), console.find("log").get("file")) == (
        "/var/log/vm/c-console.log", "/var/log/vm/c-boot.log")
    assert root.find("devices/parallel/source").get("path") == "/dev/parport0"
    assert root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is not None
    assert "xmlns:qemu=" in xml and "qemu:commandline" in xml
    assert any("cdrom sda" in w for w in warnings) and any("vdc" in w for w in warnings)


def test_clone_without_nvram_backup_gets_a_fresh_one():
    xml, warnings = clone_xml(SOURCE, name="c", disks={"vda": Path("/r/c.qcow2")}, nvram=None)
    assert ET.fromstring(xml).find("os/nvram") is None
    assert any("fresh UEFI variables" in w for w in warnings)


def test_nvram_source_form_is_rewritten():
    src = ("<domain><name>a</name><os><nvram type='file'><source file='/n/a_VARS.fd'/></nvram></os>"
           "<devices/></domain>")
    xml, _ = clone_xml(src, name="b", disks={}, nvram=Path("/r/b_VARS.fd"))
    assert ET.fromstring(xml).find("os/nvram/source").get("file") == "/r/b_VARS.fd"


def test_point_config_and_nvram_backup(tmp_path):
    c = Chain(tmp_path / "vm" / "202603", "vm")
    c.point({"vda": ([(0, b"a" * 512)], [])})
    c.point({"vda": ([(0, b"b" * 512)], [])})
    (c.path / "vmconfig.virtnbdbackup.1.xml").unlink()
    (c.path / "x_VARS.fd.virtnbdbackup.0").write_bytes(b"0")
    (c.path / "x_VARS.fd").write_bytes(b"latest")
    p0, p1 = restore_points(scan_vm(tmp_path, "vm").chains["202603"])
    cfg = point_config(p1)
    assert cfg is not None and cfg.path.name == "vmconfig.virtnbdbackup.0.xml" and not cfg.exact
    assert point_config(p0).exact
    assert nvram_backup(p0, "/var/lib/libvirt/qemu/nvram/x_VARS.fd") == c.path / "x_VARS.fd.virtnbdbackup.0"
    assert nvram_backup(p1, "/var/lib/libvirt/qemu/nvram/x_VARS.fd") == c.path / "x_VARS.fd"
    assert nvram_backup(p1, "/elsewhere/y_VARS.fd") is None


def test_firmware_autoselection_nvram_is_found_and_added(tmp_path):
    """Backups keep the inactive XML: with <os firmware='efi'> it names no <nvram>."""
    c = Chain(tmp_path / "vm" / "202603", "vm")
    c.point({"vda": ([(0, b"a" * 512)], [])})
    c.point({"vda": ([(0, b"b" * 512)], [])})
    for n in (0, 1):
        (c.path / f"vmconfig.virtnbdbackup.{n}.xml").write_text(
            "<domain type='kvm'><name>vm</name><os firmware='efi'><type>hvm</type></os><devices/></domain>")
        (c.path / f"vm_VARS.fd.virtnbdbackup.{n}").write_bytes(b"%d" % n)
    p0, p1 = restore_points(scan_vm(tmp_path, "vm").chains["202603"])
    cfg = point_config(p1)
    assert cfg.uefi and cfg.nvram is None
    assert nvram_backup(p1, None) == c.path / "vm_VARS.fd.virtnbdbackup.1"
    assert nvram_backup(p0, None) == c.path / "vm_VARS.fd.virtnbdbackup.0"
    xml, warnings = clone_xml(cfg.xml, name="c", disks={}, nvram=Path("/r/c_VARS.fd"))
    assert ET.fromstring(xml).find("os/nvram").text == "/r/c_VARS.fd" and warnings == []
