"""Several hosts (issue #17), without libvirt: URIs, the hosts = [...] config, the tree's host level, remaps."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from vmbk.config import from_mapping, hosts_for
from vmbk.errors import ConfigError, StorageError, UsageError
from vmbk.restore import remap
from vmbk.tree import ops
from vmbk.tree.scan import host_root, locate, roots, vm_dirs
from vmbk.settings import NbdTcp
from vmbk.virt.backupjob import backup_xml
from vmbk.virt.hold import marker_path
from vmbk.virt.hostfiles import untar
from vmbk.virt.remote import SshTarget, is_remote, ssh_target, with_keyfile


def test_ssh_target_of_libvirt_uris():
    assert ssh_target("qemu:///system") is None
    assert ssh_target("qemu+unix:///system") is None
    t = ssh_target("qemu+ssh://root@kvm1.example:2222/system?keyfile=/k/id&no_verify=1")
    assert t == SshTarget("kvm1.example", "root", 2222, "/k/id", True)
    assert t.options()[t.options().index("-p") + 1] == "2222" and "IdentitiesOnly=yes" in t.options()
    with pytest.raises(ConfigError):
        ssh_target("qemu+tls://kvm1/system")
    assert is_remote("qemu+tls://kvm1/system") and not is_remote("qemu:///system") and not is_remote(None)


def test_keyfile_goes_into_the_libvirt_uri():
    uri = with_keyfile("qemu+ssh://root@kvm1/system", "/etc/vmbk/id_kvm1")
    assert uri == "qemu+ssh://root@kvm1/system?keyfile=/etc/vmbk/id_kvm1&no_tty=1"
    assert ssh_target(uri).key == "/etc/vmbk/id_kvm1"
    assert with_keyfile("qemu:///system", "/k") == "qemu:///system"


def test_hold_markers_of_two_hosts_differ():
    uuid = "6f1c2d3e-0000-4000-8000-000000000001"
    local = marker_path(uuid)
    a, b = marker_path(uuid, "qemu+ssh://root@kvm1/system"), marker_path(uuid, "qemu+ssh://root@kvm2/system")
    assert local.name == f"held-{uuid}.json" and len({local, a, b}) == 3
    assert marker_path(uuid, "qemu+ssh://root@kvm1/system?keyfile=/k") == a  # the key is no part of the host


def test_hosts_config_names_and_validation():
    cfg = from_mapping({"hosts": [{"uri": "qemu+ssh://root@kvm1.example/system", "ssh_key": "/etc/vmbk/id"},
                                  {"uri": "qemu+ssh://root@10.0.0.2/system", "name": "kvm2"}]},
                       instance="t", source=None)
    assert [(h.name, h.ssh_key) for h in cfg.hosts] == [("kvm1.example", "/etc/vmbk/id"), ("kvm2", None)]
    assert cfg.host_level and hosts_for(cfg, None) == cfg.hosts
    assert hosts_for(cfg, "qemu+ssh://root@10.0.0.2/system")[0].name == "kvm2"
    assert hosts_for(from_mapping({}, instance="t", source=None), None, env={})[0].uri == "qemu:///system"
    one = from_mapping({"hosts": [{"uri": "qemu+ssh://root@kvm1/system"}]}, instance="t", source=None)
    assert not one.host_level  # one host keeps <backup_path>/<vm>/
    for bad in ([{"uri": "qemu+ssh://a/system"}, {"uri": "qemu+ssh://a/system"}],  # same name twice
                [{"uri": "qemu+ssh://a/system", "name": "_state"}],
                [{"uri": "qemu+ssh://a/system", "ssh_key": "relative/key"}],
                [{"uri": "qemu+ssh://a/system", "user": "root"}],  # strict keys
                [{"uri": "qemu+tls://a/system"}]):
        with pytest.raises(ConfigError):
            from_mapping({"hosts": bad}, instance="t", source=None)
    with pytest.raises(ConfigError):
        from_mapping({"connect": "qemu:///system", "hosts": [{"uri": "qemu+ssh://a/system"}]}, instance="t",
                     source=None)


def test_nbd_tls_of_a_host():
    cfg = from_mapping({"hosts": [{"uri": "qemu+ssh://root@kvm1/system",
                                   "nbd_tls": {"dir": "/etc/vmbk/pki/kvm1", "address": "10.0.0.5"}}]},
                       instance="t", source=None)
    assert cfg.hosts[0].nbd_tcp == NbdTcp("/etc/vmbk/pki/kvm1", "10.0.0.5", 10809)
    for bad in ({"dir": "pki"}, {"address": "x"}, {"dir": "/p", "port": 0}, {"dir": "/p", "verify": True}):
        with pytest.raises(ConfigError):
            from_mapping({"hosts": [{"uri": "qemu+ssh://a/system", "nbd_tls": bad}]}, instance="t", source=None)
    xml = backup_xml(None, ["vda"], [], Path("/run/j"), None, tcp=("10.0.0.5", 10811))
    assert '<server transport="tcp" tls="yes" name="10.0.0.5" port="10811" />' in xml


def test_nbd_tcp_of_a_host_is_plain():
    cfg = from_mapping({"hosts": [{"uri": "qemu+ssh://root@kvm1/system",
                                   "nbd_tcp": {"address": "10.0.0.5", "port": 10900}}]}, instance="t", source=None)
    assert cfg.hosts[0].nbd_tcp == NbdTcp(None, "10.0.0.5", 10900) and not cfg.hosts[0].nbd_tcp.tls
    for bad in ({"dir": "/p"}, {"port": 70000}, {"address": 5}):
        with pytest.raises(ConfigError):
            from_mapping({"hosts": [{"uri": "qemu+ssh://a/system", "nbd_tcp": bad}]}, instance="t", source=None)
    with pytest.raises(ConfigError, match="give one"):
        from_mapping({"hosts": [{"uri": "qemu+ssh://a/system", "nbd_tcp": {}, "nbd_tls": {"dir": "/p"}}]},
                     instance="t", source=None)
    xml = backup_xml(None, ["vda"], [], Path("/run/j"), None, tcp=("10.0.0.5", 10900), tls=False)
    assert '<server transport="tcp" tls="no" name="10.0.0.5" port="10900" />' in xml


def test_tree_host_level(tmp_path: Path):
    (tmp_path / "old-vm" / "202601").mkdir(parents=True)  # a single-host tree's VM, not moved yet
    ops.mark_host(tmp_path, "kvm1", "qemu+ssh://root@kvm1/system")
    (tmp_path / "kvm1" / "web").mkdir()
    ops.mark_host(tmp_path, "kvm2", "qemu+ssh://root@kvm2/system")
    (tmp_path / "kvm2" / "web").mkdir()
    (tmp_path / "kvm2" / "db").mkdir()
    assert [(r.host, r.path) for r in roots(tmp_path)] == [(None, tmp_path), ("kvm1", tmp_path / "kvm1"),
                                                            ("kvm2", tmp_path / "kvm2")]
    assert [e.name for e in vm_dirs(tmp_path)] == ["old-vm"]  # host directories are no VM's
    assert [e.name for e in vm_dirs(tmp_path / "kvm2")] == ["db", "web"]
    assert host_root(tmp_path, "kvm1", layered=True) == tmp_path / "kvm1"
    assert host_root(tmp_path, "kvm1", layered=False) == tmp_path
    assert locate(tmp_path, "kvm2/web")[0].host == "kvm2"
    assert locate(tmp_path, "db")[0].host == "kvm2" and locate(tmp_path, "old-vm")[0].host is None
    with pytest.raises(StorageError, match="kvm1/web or kvm2/web"):
        locate(tmp_path, "web")
    with pytest.raises(StorageError):
        ops.mark_host(tmp_path, "old-vm", "qemu+ssh://x/system")  # a VM's directory is no host's


def test_untar_keeps_regular_files_inside():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("./tpm2/tpm2-00.permall", b"state"), ("../evil", b"x"), ("/abs", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("./tpm2/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/shadow"
        tar.addfile(link)
    assert untar(buf.getvalue()) == {"tpm2/tpm2-00.permall": b"state"}


XML = """<domain type='kvm'><name>web</name>
<os><type arch='x86_64' machine='pc-q35-9.9'>hvm</type>
<loader readonly='yes' secure='yes' type='pflash'>/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd</loader>
<nvram template='/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
<cpu mode='custom' match='exact'><model fallback='forbid'>Icelake-Server</model></cpu>
<devices><emulator>/usr/libexec/qemu-kvm</emulator>
<disk type='file' device='disk'><source file='/srv/vms/web.qcow2'/><target dev='vda'/></disk>
<disk type='volume' device='disk'><source pool='fast' volume='web-data.qcow2'/><target dev='vdb'/></disk>
<interface type='network'><source network='lan'/></interface>
<interface type='network'><source network='dmz'/></interface>
<interface type='bridge'><source bridge='br0'/></interface>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>"""

TARGET = remap.TargetFacts(networks={"default": True, "lan2": True}, bridges=frozenset(),
                           pools={"ssd": (True, "/var/lib/libvirt/ssd")},
                           existing=frozenset({"/var/lib/vms", "/var/lib/libvirt/ssd"}),
                           machines=frozenset({"pc", "q35", "pc-q35-7.2"}), cpu_models=frozenset({"Skylake-Client"}),
                           emulator="/usr/bin/qemu-system-x86_64", efi_autoselect=True, swtpm=False)


def test_preflight_names_every_missing_item():
    out = remap.check(XML, remap.Remaps(), TARGET)
    got = {(p.kind, p.item) for p in out.problems}
    assert got == {("network", "lan"), ("network", "dmz"), ("bridge", "br0"), ("cpu", "Icelake-Server"),
                   ("tpm", "emulator")}, out.problems
    # what needs no asking is remapped and said: firmware by descriptor, machine alias, emulator
    assert {m["kind"] for m in out.remaps} == {"firmware", "machine", "emulator"}
    xml = out.xml.replace('"', "'")
    assert "firmware='efi'" in xml and "OVMF_CODE" not in xml and "secure='yes'" in xml
    assert "machine='q35'" in xml and "/usr/bin/qemu-system-x86_64" in xml
    assert remap.place("/srv/vms/web.qcow2", None, remap.Remaps(), TARGET)[1].kind == "directory"
    assert remap.place("web-data.qcow2", "fast", remap.Remaps(), TARGET)[1].kind == "pool"


def test_remaps_and_fallback_make_it_pass():
    asked = remap.Remaps(networks=(("lan", "lan2"),), network_fallback="default", cpu_host_model=True,
                         dirs=(("/srv/vms", "/var/lib/vms"),), pools=(("fast", "ssd"),))
    out = remap.check(XML, asked, TARGET, tpm=False)
    assert out.problems == []
    kinds = [(m["kind"], m["from"], m["to"]) for m in out.remaps]
    assert ("network", "lan", "lan2") in kinds and ("network", "dmz", "default") in kinds
    assert ("bridge", "br0", "default") in kinds and ("cpu", "Icelake-Server", "host-model") in kinds
    assert "<source network='lan2'" in out.xml.replace('"', "'") and "mode='host-model'" in out.xml.replace('"', "'")
    assert remap.place("/srv/vms/web.qcow2", None, asked, TARGET) == ("/var/lib/vms", None)
    assert remap.place("web-data.qcow2", "fast", asked, TARGET) == ("/var/lib/libvirt/ssd", None)
    assert remap.disk_places(XML) == {"vda": ("/srv/vms/web.qcow2", None), "vdb": ("web-data.qcow2", "fast")}


def test_remap_options_parse():
    assert remap.parse_pairs(["a=b", "/x=/y=z"], "--remap-dir") == (("a", "b"), ("/x", "/y=z"))
    for bad in ("a", "=b", "a="):
        with pytest.raises(UsageError):
            remap.parse_pairs([bad], "--remap-network")
