"""Memory state without libvirt: what cannot be saved, the state manifest's facts and their
comparison, libvirt's save image head, and the tree's state files (issue #18)."""

from __future__ import annotations

import json

import pytest

from vmbk.tree import names
from vmbk.tree import state as tree_state
from vmbk.virt import memstate
from vmbk.virt.memstate import HEADER, MAGIC_DONE, MAGIC_PARTIAL, StateError, TargetHost

DOMAIN = """<domain type='kvm'>
  <name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memory unit='MiB'>512</memory><vcpu placement='static'>2</vcpu>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'><source file='/x/web.qcow2'/><target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></disk>
    <controller type='pci' index='0' model='pci-root'/>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/></interface>
    <input type='mouse' bus='ps2'/>
    <video><model type='cirrus' vram='16384' heads='1'/></video>
    %s
  </devices>
</domain>"""

HOST = {"arch": "x86_64", "page_size": 4096, "cpu": {"vendor": "Intel", "model": "Skylake"}, "qemu": "7.2.0"}
TARGET = TargetHost(arch="x86_64", page_size=4096, cpu_vendor="Intel", cpu_model="Skylake", qemu="7.2.0",
                    machines=frozenset({"pc-i440fx-7.2", "pc"}), domain_types=frozenset({"kvm", "qemu"}),
                    cpu_models=frozenset({"qemu64"}), cpu_modes=frozenset({"custom", "host-model"}))


def xml(extra: str = "") -> str:
    return DOMAIN % extra


@pytest.mark.parametrize("device, named", [
    ("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='3' slot='0' function='0'/></source>"
     "</hostdev>", "hostdev pci"),
    ("<interface type='hostdev'><mac address='52:54:00:00:00:01'/></interface>", "interface type='hostdev'"),
    ("<filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target dir='share'/></filesystem>",
     "filesystem share (virtiofs"),
    ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>", "tpm passthrough"),
    ("<shmem name='peer'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>", "shmem peer"),
    ("<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>", "input passthrough"),
])
def test_devices_that_cannot_be_saved_are_named(device, named):
    (line,) = memstate.unsaveable(xml(device))
    assert line.startswith(named), line


def test_an_ordinary_domain_can_be_saved():
    assert memstate.unsaveable(xml()) == []
    assert memstate.unsaveable(xml("<shmem name='m' role='master'><model type='ivshmem-plain'/></shmem>")) == []


def test_facts_of_the_same_machine_match():
    facts = memstate.domain_facts(xml())
    assert facts["memory_kib"] == 512 * 1024 and facts["vcpus"] == 2 and facts["arch"] == "x86_64"
    assert facts["firmware"] == "bios" and facts["features"] == ["acpi", "apic"]
    assert "disk disk vda bus=virtio pci:0000:00:04.0" in facts["devices"]
    assert memstate.mismatches(HOST, facts, xml(), TARGET) == []


def test_implicit_devices_do_not_count():
    """A save image's XML is migratable: libvirt leaves out the PCI root and PS/2 devices."""
    bare = xml().replace("<controller type='pci' index='0' model='pci-root'/>", "").replace(
        "<input type='mouse' bus='ps2'/>", "")
    assert memstate.mismatches(HOST, memstate.domain_facts(bare), xml(), TARGET) == []


def test_every_difference_is_named():
    saved = memstate.domain_facts(xml())
    other = xml("<watchdog model='i6300esb' action='reset'/>").replace("<memory unit='MiB'>512", "<memory unit='MiB'>1024")
    other = other.replace(">2</vcpu>", ">4</vcpu>").replace("slot='0x03'", "slot='0x05'")
    got = memstate.mismatches(HOST, saved, other, TARGET)
    assert "memory (KiB): the saved state has 524288, the XML to define has 1048576" in got
    assert "vCPUs: the saved state has 2, the XML to define has 4" in got
    assert "device only in the XML to define: watchdog i6300esb" in got
    assert "device only in the saved state: interface model=virtio pci:0000:00:03.0" in got  # moved: another device


def test_the_host_must_run_the_state():
    facts = memstate.domain_facts(xml())
    arm = TargetHost(**{**TARGET.__dict__, "arch": "aarch64", "page_size": 65536, "qemu": "6.2.0",
                        "machines": frozenset({"virt"}), "cpu_models": frozenset({"cortex-a57"})})
    got = "\n".join(memstate.mismatches(HOST, facts, xml(), arm))
    assert "architecture: the state was saved on x86_64, this host is aarch64" in got
    assert "page size" in got and "QEMU: the state was saved by QEMU 7.2.0" in got
    assert "machine type 'pc-i440fx-7.2' is not available" in got and "CPU model 'qemu64' is not usable" in got


def _image(xml_text: str, cookie: bytes = b"<qemu-migration/>", magic: bytes = MAGIC_PARTIAL) -> bytes:
    body = xml_text.encode() + b"\0" + cookie + b"\0"
    data_len = len(body) + 1000
    header = HEADER.pack(magic, 2, data_len, 1, 0, len(xml_text) + 1)
    return header + body + bytes(data_len - len(body)) + b"QEVM-stream"


def test_the_head_of_a_save_image_is_read_and_made_final():
    img = _image(xml())
    head = memstate.read_head(img[:memstate.head_size(img[:HEADER.size])])
    assert head.magic == MAGIC_PARTIAL and head.xml == xml() and head.cookie == b"<qemu-migration/>"
    new = memstate.image_head(head)
    assert len(new) == head.size and new[:16] == MAGIC_DONE and new[HEADER.size:] == img[HEADER.size:head.size]


def test_a_clone_gets_its_identity_into_the_image():
    head = memstate.read_head(_image(xml())[:-11])
    clone = xml().replace("<name>web</name>", "<name>web-clone</name>").replace(
        "11111111-2222-3333-4444-555555555555", "99999999-2222-3333-4444-555555555555").replace(
        "52:54:00:aa:bb:cc", "52:54:00:11:22:33")
    new = memstate.read_head(memstate.image_head(head, memstate.same_identity(head.xml, clone)))
    assert "<name>web-clone</name>" in new.xml and "99999999-" in new.xml and "52:54:00:11:22:33" in new.xml
    assert new.cookie == head.cookie and new.data_len == head.data_len
    with pytest.raises(StateError):
        memstate.image_head(head, clone + " " * 2000)  # does not fit in data_len


def test_not_a_save_image():
    with pytest.raises(StateError):
        memstate.head_size(b"QEVM" + bytes(HEADER.size))
    with pytest.raises(StateError):
        memstate.read_head(_image(xml())[:200])


def _state_files(chain, ident="virtnbdbackup.3", data=b"x" * 100, **over):
    (chain / names.state_name(ident)).write_bytes(data)
    body = {"format": "vmbk-state", "version": 1, "checkpoint": ident, "host": HOST,
            "domain": memstate.domain_facts(xml()),
            "state": {"file": names.state_name(ident), "size": len(data), "sha256": "0" * 64, "image_size": 300}}
    body.update(over)
    (chain / names.state_manifest_name(ident)).write_text(json.dumps(body))


def test_a_points_state_as_the_tree_shows_it(tmp_path):
    assert tree_state.point_state(tmp_path, "virtnbdbackup.3") is None
    _state_files(tmp_path)
    st = tree_state.point_state(tmp_path, "virtnbdbackup.3")
    assert st is not None and st.usable and st.size == 100 and st.manifest.image_size == 300
    (tmp_path / names.state_name("virtnbdbackup.3")).write_bytes(b"x" * 99)
    assert tree_state.point_state(tmp_path, "virtnbdbackup.3").problems == (
        "vmstate.virtnbdbackup.3.lz4 has 99 bytes, vmstate.virtnbdbackup.3.json says 100",)
    (tmp_path / names.state_name("virtnbdbackup.3")).unlink()
    assert not tree_state.point_state(tmp_path, "virtnbdbackup.3").usable
    _state_files(tmp_path, checkpoint="virtnbdbackup.2")
    assert "describes checkpoint" in tree_state.point_state(tmp_path, "virtnbdbackup.3").problems[0]
    (tmp_path / names.state_manifest_name("virtnbdbackup.3")).write_text("{}")
    assert "not a vmbk state manifest" in tree_state.point_state(tmp_path, "virtnbdbackup.3").problems[0]


def test_memory_settings():
    from vmbk.config import from_mapping
    from vmbk.errors import ConfigError

    cfg = from_mapping({"memory_pause_timeout": 30, "vm": {"web": {"memory": True}}}, instance="t", source=None)
    assert cfg.memory_pause_timeout == 30 and cfg.memory_for("web") and not cfg.memory_for("db")
    assert from_mapping({}, instance="t", source=None).memory_pause_timeout == 60
    with pytest.raises(ConfigError):
        from_mapping({"memory_pause_timeout": 0}, instance="t", source=None)
    with pytest.raises(ConfigError):
        from_mapping({"vm": {"web": {"memory": "yes"}}}, instance="t", source=None)


@pytest.mark.parametrize("extra", [["--disk", "vda"], ["--skip-config"]])
def test_resume_goes_with_a_vm_to_define(tmp_path, extra):
    import io

    from vmbk.commands.restore import main
    from vmbk.errors import Exit

    err = io.StringIO()
    code = main(["--json", "--backup-path", str(tmp_path), "--vm", "web", "--restore-path", str(tmp_path / "r"),
                 "--resume", *extra], io.StringIO(""), err)
    assert code == Exit.USAGE
