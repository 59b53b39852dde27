"""Domain facts from XML, without libvirt."""

from vmbk.virt.domain import parse_domain_xml
from vmbk.virt.qemuimg import image_facts

UEFI_TPM = """
<domain type='kvm'>
  <name>win 11 'x'</name>
  <uuid>2b9c1f5e-0000-4000-8000-000000000001</uuid>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
    <libosinfo:os id="http://microsoft.com/win/11"/></libosinfo:libosinfo></metadata>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/win11_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/images/win11.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='/iso/virtio-win.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='volume' device='disk'><driver name='qemu' type='raw'/>
      <source pool='fast' volume='data.raw'/><target dev='vdb' bus='virtio'/><shareable/></disk>
    <disk type='file' device='cdrom'><target dev='sdb' bus='sata'/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/></channel>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>
"""

BIOS = """
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>plain</name><uuid>2b9c1f5e-0000-4000-8000-000000000002</uuid>
  <os><type>hvm</type></os>
  <features><hyperv mode='custom'><relaxed state='on'/></hyperv></features>
  <devices>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/vg/plain'/><target dev='vda' bus='virtio'/></disk>
  </devices>
  <qemu:override><qemu:device alias='virtio-disk0'><qemu:frontend>
    <qemu:property name='discard_granularity' type='unsigned' value='33554432'/>
  </qemu:frontend></qemu:device></qemu:override>
</domain>
"""


def test_uefi_tpm_windows_with_cdroms_and_a_volume():
    f = parse_domain_xml(UEFI_TPM)
    assert f["name"] == "win 11 'x'" and f["uuid"].endswith("0001")
    assert f["firmware"] == {
        "type": "uefi",
        "loader": "/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
        "nvram": "/var/lib/libvirt/qemu/nvram/win11_VARS.fd",
        "secure_boot": True,
    }
    assert f["tpm"] == {"model": "tpm-crb", "backend": "emulator", "version": "2.0"}
    assert f["agent_channel"] is True and f["agent_channel_state"] == "disconnected"
    assert [(d["target"], d["device"]) for d in f["disks"]] == [
        ("vda", "disk"), ("sda", "cdrom"), ("vdb", "disk"), ("sdb", "cdrom")]
    vda, sda, vdb, sdb = f["disks"]
    assert vda["source"] == "/images/win11.qcow2" and vda["format"] == "qcow2"
    assert sda["readonly"] and sdb["source"] is None
    assert vdb["volume"] == {"pool": "fast", "volume": "data.raw"} and vdb["shareable"]
    assert f["windows"] is True
    assert len(f["warnings"]) == 1 and "vda, vdb" in f["warnings"][0]


def test_bios_block_disk_and_discard_override_means_no_warning():
    f = parse_domain_xml(BIOS)
    assert f["firmware"]["type"] == "bios" and f["firmware"]["nvram"] is None
    assert f["tpm"] is None and f["agent_channel"] is False
    assert f["disks"][0]["source"] == "/dev/vg/plain" and f["disks"][0]["type"] == "block"
    assert f["windows"] is True and f["warnings"] == []


def test_image_facts():
    qcow2_v3 = {"format": "qcow2", "cluster-size": 65536, "format-specific": {"type": "qcow2", "data": {
        "compat": "1.1", "bitmaps": [{"name": "virtnbdbackup.3", "flags": ["auto"], "granularity": 65536}]}}}
    assert image_facts(qcow2_v3) == {
        "image_format": "qcow2", "compat": "1.1", "checkpoint_capable": True,
        "bitmaps": [{"name": "virtnbdbackup.3", "flags": ["auto"], "granularity": 65536}],
        "cluster_size": 65536, "backing_file": None,
    }
    qcow2_v2 = {"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"compat": "0.10"}}}
    assert image_facts(qcow2_v2)["checkpoint_capable"] is False
    assert image_facts({"format": "raw"})["checkpoint_capable"] is False
