"""vmbk-drill without a hypervisor: the drill VM's XML, which points, file systems,
pictures, the marker and the sweep (libvirt's test driver), the settings, the
level and the exit status, and the command's options and pass-through.

The drill itself, on real QEMU guests, is tests/integration/test_drill_guest.py.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import sqlite3
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import libvirt
import orjson
import pytest
from test_restore_points import HOSTILE, MiB, Chain, write_stream

from vmbk import cli
from vmbk.commands import drill as command
from vmbk.config import from_mapping
from vmbk import runmarker
from vmbk.disklabel import describe
from vmbk.drill import filesystems, isolate, leftovers, picture
from vmbk.drill.checks import FAILED, PASSED, SKIPPED, Check, level
from vmbk.drill.points import PointSpec, choose, complete_points, from_backup
from vmbk.errors import ConfigError, Exit, UsageError, VmError
from vmbk.output import Emitter
from vmbk.restore import tpm
from vmbk.tree import scan_vm
from vmbk.virt import backupjob

TEST_URI = "test:///default"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vmbk.toml"
QEMU = "http://libvirt.org/schemas/domain/qemu/1.0"

# -- the drill VM's XML ----------------------------------------------------------------------------------------

HOSTILE_XML = f"""<domain type='kvm' xmlns:qemu='{QEMU}'>
  <name>web-drill-1</name>
  <memory unit='GiB'>2</memory><currentMemory unit='MiB'>1536</currentMemory>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><source file='/scratch/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <interface type='bridge'><source bridge='br0'/><model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/><boot order='2'/>
      <virtualport type='openvswitch'/><vlan><tag id='42'/></vlan><filterref filter='clean-traffic'/></interface>
    <interface type='direct'><source dev='eth0' mode='bridge'/><model type='e1000'/></interface>
    <interface type='hostdev' managed='yes'><source><address type='pci' domain='0' bus='3' slot='0' function='0'/>
      </source><driver name='vfio'/><rom bar='off'/></interface>
    <interface type='user'/>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0x5678'/></source></hostdev>
    <redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.1' service='4000'/></redirdev>
    <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
    <vsock model='virtio'><cid auto='no' address='3'/></vsock>
    <graphics type='spice' port='5900' listen='0.0.0.0'/>
    <graphics type='vnc' autoport='yes' listen='0.0.0.0'/>
    <audio id='1' type='spice'/><audio id='2' type='none'/>
    <video><model type='qxl'/></video>
    <tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='1.2.3.4' service='708'/>
      </backend></rng>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/><protocol type='telnet'/>
      <target port='0'/></serial>
    <serial type='pty'><log file='/var/log/libvirt/qemu/web-serial.log'/><target port='1'/></serial>
    <console type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/><target type='serial' port='0'/></console>
    <console type='pty'><target type='virtio' port='1'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <channel type='tcp'><source mode='connect' host='10.0.0.2' service='99'/><target type='guestfwd' address='10.0.2.1'
      port='4600'/></channel>
    <parallel type='file'><source path='/tmp/lp'/><target port='0'/></parallel>
    <smartcard mode='passthrough' type='tcp'><source mode='bind' host='127.0.0.1' service='2001'/></smartcard>
  </devices>
  <qemu:commandline><qemu:arg value='-netdev'/><qemu:arg value='user,id=x'/></qemu:commandline>
</domain>"""


def drilled(network: str | None = "vmbk-drill-12345678") -> tuple[ET.Element, list[str]]:
    xml, warnings = isolate.drill_xml(HOSTILE_XML, uuid="11111111-2222-3333-4444-555555555555", network=network,
                                      scratch=Path("/scratch/web-drill-1"), mark={"uuid": "1111", "vm": "web"})
    return ET.fromstring(xml), warnings


def test_every_interface_is_moved_to_the_isolated_network_keeping_model_address_and_boot_order():
    root, warnings = drilled()
    ifaces = root.findall("devices/interface")
    assert [(i.get("type"), i.find("source").attrib) for i in ifaces] == [("network", {"network": "vmbk-drill-12345678"})] * 4
    first = ifaces[0]
    assert [c.tag for c in first] == ["source", "model", "address", "boot"]
    assert first.find("model").get("type") == "virtio" and first.find("boot").get("order") == "2"
    assert [c.tag for c in ifaces[2]] == ["source"]  # a host card's model and ROM are not the guest's
    assert not root.findall("devices/interface/mac") and not root.findall("devices/interface/virtualport")
    assert "4 network interface(s) moved to the isolated network vmbk-drill-12345678" in warnings


def test_with_network_none_every_interface_is_removed():
    root, warnings = drilled(None)
    assert root.findall("devices/interface") == [] and "4 network interface(s) removed" in warnings


def test_what_reaches_the_host_or_the_world_is_left_out():
    root, warnings = drilled()
    devices = root.find("devices")
    for tag in ("hostdev", "redirdev", "filesystem", "vsock", "graphics", "parallel", "smartcard", "tpm"):
        assert devices.find(tag) is None, tag
    assert [a.get("type") for a in devices.findall("audio")] == ["none"]
    assert [r.find("backend").get("model") for r in devices.findall("rng")] == ["random"]
    assert [c.find("target").get("name") for c in devices.findall("channel")] == ["org.qemu.guest_agent.0"]
    assert devices.find("channel/source") is None  # libvirt makes its own socket
    assert root.find(f"{{{QEMU}}}commandline") is None
    assert devices.find("video") is not None  # the screen stays: QEMU takes the screenshot from it
    assert "2 graphics device(s) left out of the drill VM" in warnings
    assert "qemu:commandline arguments left out of the drill VM" in warnings


def test_serial_ports_and_consoles_write_to_the_scratch_directory():
    root, _ = drilled()
    serials = root.findall("devices/serial")
    assert [(s.get("type"), s.find("source").get("path"), s.find("target").get("port")) for s in serials] == [
        ("file", "/scratch/web-drill-1/serial0.log", "0"), ("file", "/scratch/web-drill-1/serial1.log", "1")]
    assert not root.findall("devices/serial/log") and not root.findall("devices/serial/protocol")
    consoles = root.findall("devices/console")  # the serial one is libvirt's alias of serial0 again
    assert [(c.get("type"), c.find("target").get("type")) for c in consoles] == [("file", "virtio")]
    xml = ET.tostring(root, encoding="unicode")
    assert isolate.serial_logs(xml) == [Path("/scratch/web-drill-1/serial0.log"),
                                        Path("/scratch/web-drill-1/serial1.log"),
                                        Path("/scratch/web-drill-1/console2.log")]


def test_identity_mark_nvram_agent_and_memory():
    root, _ = drilled()
    assert root.find("uuid").text == "11111111-2222-3333-4444-555555555555"
    assert root.find(f"metadata/{isolate.MARK_TAG}").attrib == {"uuid": "1111", "vm": "web"}
    assert root.find("os/nvram").text == "/scratch/web-drill-1/VARS.fd"  # UEFI without one: in the scratch dir
    xml = ET.tostring(root, encoding="unicode")
    assert isolate.has_agent(xml) and not isolate.has_agent(HOSTILE_XML.replace("guest_agent", "other"))
    assert isolate.memory_bytes(xml) == 1536 * MiB
    assert isolate.memory_bytes("<domain><memory>1024</memory></domain>") == 1024 * 1024


# -- which points --------------------------------------------------------------------------------------------------


def test_point_spec():
    assert PointSpec.parse(None) == PointSpec("latest") == PointSpec.parse("latest")
    assert PointSpec.parse("random").kind == "random"
    assert PointSpec.parse("3") == PointSpec("index", index=3) and PointSpec.parse("full").index == 0
    assert PointSpec.parse("2026-03-03") == PointSpec("date", date="2026-03-03")
    for bad in ("-1", "2026-13-01", "yesterday", "3.5", "٣"):
        with pytest.raises(UsageError):
            PointSpec.parse(bad)


@pytest.fixture
def two_chains(tmp_path) -> Path:
    """An archived chain of 2 points (March 2-3) and an active one of 3 (March 10-12)."""
    root = tmp_path / "backups"
    old = Chain(root / HOSTILE / "2026-W10" / ".archives" / "chain-2026-03-09", HOSTILE)
    for day in (2, 3):
        old.point({"vda": ([(0, b"o" * 512)], [])}, date=f"2026-03-{day:02d}T22:00:01")
    new = Chain(root / HOSTILE / "2026-W11", HOSTILE)
    for day in (10, 11, 12):
        new.point({"vda": ([(0, b"n" * 512)], [])}, date=f"2026-03-{day:02d}T22:00:01")
    return root


def chosen(root: Path, raw: str, sample: int = 0, seed: int = 1) -> list[tuple[str, int, str]]:
    targets = choose(scan_vm(root, HOSTILE), PointSpec.parse(raw), sample, random.Random(seed))
    return [(t.chain.rel, t.point.index, t.why) for t in targets]


def test_latest_index_date_random_and_sample(two_chains):
    assert chosen(two_chains, "latest") == [("2026-W11", 2, "latest")]
    assert chosen(two_chains, "1") == [("2026-W11", 1, "index")]
    assert chosen(two_chains, "2026-03-09") == [("2026-W10/.archives/chain-2026-03-09", 1, "date")]
    assert chosen(two_chains, "2026-03-11") == [("2026-W11", 1, "date")]
    points = {(p.chain.rel, p.index) for p in complete_points(scan_vm(two_chains, HOSTILE))}
    assert len(points) == 5
    assert {(c, i) for c, i, _ in chosen(two_chains, "random", seed=7)} <= points
    sampled = chosen(two_chains, "latest", sample=10)
    assert sampled[0] == ("2026-W11", 2, "latest") and len(sampled) == 5
    assert {(c, i) for c, i, _ in sampled} == points and {w for _, _, w in sampled[1:]} == {"sample"}
    assert len(chosen(two_chains, "0", sample=2)) == 3


def test_no_point_to_drill_is_a_vm_problem(two_chains, tmp_path):
    with pytest.raises(VmError, match="no complete restore point taken on or before 2026-03-01"):
        chosen(two_chains, "2026-03-01")
    with pytest.raises(VmError, match="has no restore point 7"):
        chosen(two_chains, "7")
    with pytest.raises(VmError, match="no complete restore point"):
        chosen(tmp_path, "latest")


def test_the_point_a_backup_record_made(two_chains):
    tree = scan_vm(two_chains, HOSTILE)
    rec = {"type": "backup", "name": HOSTILE, "outcome": "ok", "target_dir": str(two_chains / HOSTILE / "2026-W11"),
           "checkpoint": "virtnbdbackup.1"}
    t = from_backup(tree, rec)
    assert (t.chain.rel, t.point.index, t.why, t.ref) == ("2026-W11", 1, "backup", "2026-W11:1")
    with pytest.raises(VmError, match="holds no chain"):
        from_backup(tree, {**rec, "target_dir": "/elsewhere"})


def test_an_incomplete_point_is_never_drilled(two_chains):
    chain = two_chains / HOSTILE / "2026-W11"
    (chain / "vda.inc.virtnbdbackup.2.data").unlink()
    assert chosen(two_chains, "latest") == [("2026-W11", 1, "latest")]
    with pytest.raises(VmError, match="incomplete"):
        chosen(two_chains, "2")


# -- partition tables and file systems ------------------------------------------------------------------------------


def reader(image: bytearray):
    return lambda off, n: bytes(image[off:off + n])


def mbr(parts: list[tuple[int, int]]) -> bytearray:
    img = bytearray(8 * MiB)
    for i, (ptype, lba) in enumerate(parts):
        img[446 + 16 * i + 4] = ptype
        struct.pack_into("<II", img, 446 + 16 * i + 8, lba, 2048)
    img[510:512] = b"\x55\xaa"
    return img


def test_an_mbr_with_ext4_and_swap():
    img = mbr([(0x83, 2048), (0x82, 6144), (0x05, 10000)])
    img[2048 * 512 + 1080:2048 * 512 + 1082] = b"\x53\xef"
    img[6144 * 512 + 4086:6144 * 512 + 4096] = b"SWAPSPACE2"
    assert describe(reader(img), len(img)) == ("mbr: 1 ext4, 2 swap", 2)


def test_a_gpt_with_fat_and_an_unknown_partition():
    img = mbr([(0xEE, 1)])
    struct.pack_into("<8s", img, 512, b"EFI PART")
    struct.pack_into("<QII", img, 512 + 72, 2, 128, 128)
    for i, first in enumerate((2048, 4096)):
        entry = 1024 + i * 128
        img[entry:entry + 16] = b"\x01" * 16
        struct.pack_into("<QQ", img, entry + 32, first, first + 2047)
    img[2048 * 512 + 82:2048 * 512 + 90] = b"FAT32   "
    assert describe(reader(img), len(img)) == ("gpt: 1 vfat, 2 unknown", 1)


def test_a_bare_file_system_and_nothing():
    img = bytearray(2 * MiB)
    img[0:4] = b"XFSB"
    assert describe(reader(img), len(img)) == ("xfs", 1)
    assert describe(reader(bytearray(MiB)), MiB) == ("no partition table, no file system", 0)


def test_probe_reads_the_merged_chain(tmp_path):
    """The ext4 magic lies in the incremental, over the full's zeroes."""
    full, inc = tmp_path / "vda.full.data", tmp_path / "vda.inc.virtnbdbackup.1.data"
    write_stream(full, "vda", 4 * MiB, data=[(0, b"\0" * 4096)])
    write_stream(inc, "vda", 4 * MiB, data=[(1024, b"\0" * 56 + b"\x53\xef")], checkpoint="virtnbdbackup.1",
                 parent="virtnbdbackup.0", inc=True)
    assert filesystems.probe({"vda": [full, inc]}) == (True, "vda: ext4")
    assert filesystems.probe({"vda": [full]}) == (False, "vda: no partition table, no file system")


# -- pictures ------------------------------------------------------------------------------------------------------


def png_pixels(png: bytes) -> tuple[int, int, bytes]:
    assert png.startswith(picture.PNG_SIGNATURE)
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:10] == b"\x08\x02"  # 8 bits, RGB
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    w, h = size
    rows = [raw[y * (3 * w + 1):(y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, b"".join(r[1:] for r in rows)


def test_a_ppm_becomes_a_png_with_the_same_pixels():
    pixels = bytes(random.Random(3).randrange(256) for _ in range(5 * 3 * 3))
    png = picture.ppm_to_png(b"P6\n# a comment\n5 3\n255\n" + pixels)
    assert png_pixels(png) == (5, 3, pixels)
    for bad in (b"P3\n1 1\n255\n0 0 0", b"P6\n2 2\n65535\n" + bytes(24), b"P6\n4 4\n255\n" + bytes(10)):
        with pytest.raises(ValueError):
            picture.ppm_to_png(bad)


def test_pictures_are_kept_per_vm_and_pruned(tmp_path):
    root = tmp_path / "backups"
    for n in range(4):
        for vm in ("web", "a/b"):
            png, txt = picture.keep(root, vm, f"{vm.replace('/', '_')}-drill-{n}", b"\x89PNG\r\n\x1a\n" + bytes(1000),
                                    "login:\n")
            os.utime(png, (1000 + n, 1000 + n))
            os.utime(txt, (1000 + n, 1000 + n))
    assert (root / "_state" / "drills" / "a%2Fb").is_dir()
    gone = picture.prune(root, per_vm=3, max_bytes=1 << 20)
    assert sorted(p.name for p in gone) == sorted(f"{v}-drill-0{s}" for v in ("web", "a_b") for s in picture.SUFFIXES)
    gone = picture.prune(root, per_vm=3, max_bytes=2 * 1015 + 4 * 7)  # two drills of ~1 KiB + their texts
    assert len(gone) == 8
    left = sorted(p.name for p in (root / "_state" / "drills").rglob("*.png"))
    assert left == ["a_b-drill-3.png", "web-drill-3.png"]


# -- the marker and the sweep ---------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "run"
    monkeypatch.setattr(backupjob, "RUN_DIR", d)
    monkeypatch.setattr(tpm, "SWTPM_ROOT", tmp_path / "swtpm")
    return d


def leftover(tmp_path: Path, n: int) -> leftovers.Leftovers:
    uuid = f"{n:08d}-2222-3333-4444-555555555555"
    left = leftovers.Leftovers(f"web-drill-{n}", "web", uuid, tmp_path / "scratch" / f"web-drill-{n}", None, "t")
    left.scratch.mkdir(parents=True)
    (left.scratch / "web.qcow2").write_bytes(b"x")
    left.tpm_dir.mkdir(parents=True)
    return left


@pytest.fixture
def conn():
    libvirt.registerErrorHandler(lambda *a: None, None)
    c = libvirt.open(TEST_URI)
    yield c
    c.close()


def test_the_sweep_removes_what_a_dead_drill_left_and_never_a_live_one(run_dir, tmp_path, conn):
    dead, live = leftover(tmp_path, 1), leftover(tmp_path, 2)
    runmarker.abandon(dead.mark())  # its drill is gone: the lock went with the fd
    fd = live.mark()
    try:
        # a third held by another process (a vmbk-drill running beside this one)
        other = leftover(tmp_path, 3)
        runmarker.abandon(other.mark())
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                                   "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                                   "time.sleep(60)", str(other.marker)], stdout=subprocess.PIPE)
        assert holder.stdout.readline() == b"held\n"
        done = leftovers.sweep(conn)
        assert done == [f"TPM state {dead.tpm_dir}", str(dead.scratch)]
        assert not dead.marker.exists() and not dead.scratch.exists() and not dead.tpm_dir.exists()
        for kept in (live, other):
            assert kept.marker.exists() and kept.scratch.exists() and kept.tpm_dir.exists()
        holder.kill()
        holder.wait()
        assert leftovers.sweep(conn) == [f"TPM state {other.tpm_dir}", str(other.scratch)]
    finally:
        live.unmark(fd)
    assert list(run_dir.iterdir()) == []


def test_a_marker_is_whole_or_absent(run_dir, tmp_path):
    left = leftover(tmp_path, 4)
    fd = left.mark()
    try:
        assert json.loads(left.marker.read_text())["scratch"] == str(left.scratch)
        assert [p.name for p in run_dir.iterdir()] == [left.marker.name]  # the temporary name is gone
        with pytest.raises(BlockingIOError):
            fcntl.flock(os.open(left.marker, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        left.unmark(fd)
    assert not left.marker.exists()


def test_marked_domains_and_networks_whose_drill_is_gone_are_removed_others_never(run_dir, tmp_path, conn):
    def domain(name: str, mark: str) -> None:
        conn.createXML(f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>"
                       f"<metadata>{mark}</metadata></domain>", 0)

    gone = leftover(tmp_path, 5)
    mark = f"<m:drill xmlns:m='{isolate.MARK_NS}' uuid='{gone.uuid}'/>"
    domain("web-drill-orphan", mark)
    domain("db-drill-not-ours", "<x:y xmlns:x='urn:someone'/>")
    conn.networkCreateXML(f"<network><name>vmbk-drill-{gone.uuid[:8]}</name><metadata>{mark}</metadata>"
                          "<bridge stp='off' delay='0'/></network>")
    running = leftover(tmp_path, 6)
    fd = running.mark()
    domain("web-drill-running", f"<m:drill xmlns:m='{isolate.MARK_NS}' uuid='{running.uuid}'/>")
    try:
        done = leftovers.sweep(conn)
        assert done == ["domain web-drill-orphan", f"network vmbk-drill-{gone.uuid[:8]}"]
        names = {d.name() for d in conn.listAllDomains(0)}
        assert "web-drill-running" in names and "db-drill-not-ours" in names and "web-drill-orphan" not in names
    finally:
        running.unmark(fd)
        for name in ("web-drill-running", "db-drill-not-ours"):
            conn.lookupByName(name).destroy()


# -- settings, checks, the exit status ---------------------------------------------------------------------------


def test_drill_settings():
    cfg = from_mapping({"drill": {"scratch_dir": "/srv/drill", "network": "none", "boot_timeout": 60,
                                  "vm": {"web": {"file": "/etc/hostname", "pattern": "^web$",
                                                 "command": ["systemctl", "is-system-running"],
                                                 "boot_timeout": 600}, "db": {"exclude": True}}}},
                       instance="x", source=None)
    d = cfg.drill
    assert (d.scratch_dir, d.network, d.boot_timeout, d.restore_timeout) == ("/srv/drill", "none", 60, 3600)
    assert d.vm("web").command == ("systemctl", "is-system-running") and d.vm("web").boot_timeout == 600
    assert d.vm("db").exclude and d.vm("other").file is None
    for bad, msg in (({"network": "bridge"}, "one of isolated, none"), ({"scratch_dir": "rel"}, "absolute"),
                     ({"console_pattern": "("}, "regular expression"), ({"vm": {"web": {"pattern": "x"}}}, "goes with"),
                     ({"vm": {"web": {"file": "etc/x"}}}, "absolute path in the guest"), ({"boot": 1}, "unknown key"),
                     ({"vm": {"web": {"command": "true"}}}, "list of strings"), ({"check_timeout": 0}, ">= 1")):
        with pytest.raises(ConfigError, match=msg):
            from_mapping({"drill": bad}, instance="x", source=None)


def test_the_example_documents_every_drill_key(tmp_path):
    import dataclasses

    from vmbk import config
    from vmbk.settings import Drill, DrillVm

    text = EXAMPLE.read_text()
    (tmp_path / "default.toml").write_text(text)
    d = config.load(env={"VMBK_CONFIG_DIR": str(tmp_path)}).drill
    assert d.vm("web01").command and d.vm("appliance").console_pattern and d.vm("scratch-vm").exclude
    for f in dataclasses.fields(Drill) + dataclasses.fields(DrillVm):
        assert f.name == "vms" or f"\n{f.name} = " in text, f.name


def c(name: str, verdict: str, lvl: str | None = None) -> Check:
    return Check(name, verdict, 0.0, "", level=lvl)


def test_the_level_reached():
    ok = [c("resources", PASSED), c("disks", PASSED, "disks"), c("start", PASSED, "started")]
    assert level([]) == "none" and level([c("resources", FAILED)]) == "none"
    assert level(ok[:2] + [c("start", FAILED, "started")]) == "disks"
    assert level(ok + [c("agent", PASSED, "agent"), c("check", PASSED, "check")]) == "check"
    assert level(ok + [c("agent", PASSED, "agent"), c("check", FAILED, "check")]) == "agent"
    assert level(ok + [c("agent", FAILED), c("check", SKIPPED), c("console", PASSED, "console")]) == "console"
    assert level(ok + [c("console", PASSED, "filesystems")]) == "filesystems"
    assert level(ok + [c("console", FAILED, "filesystems")]) == "started"


def test_a_stage_that_counts_its_successes():
    """A failed drill's record is no success: every drill failed -> their code, not 9."""
    e = Emitter(io.StringIO(), stage="vmbk-drill", json=True)
    for code in (5, 5):
        e.emit({"type": "drill", "outcome": "failed"})
        e.emit({"type": "error", "code": code})
    assert e.exit_code() == Exit.PARTIAL and e.exit_code(successes=0) == Exit.VM
    assert e.exit_code(successes=1) == Exit.PARTIAL


# -- the command -------------------------------------------------------------------------------------------------


def drill(root: Path, *argv: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
    """vmbk-drill in-process against libvirt's test driver: (exit status, stdout, stderr)."""
    out, err = io.BytesIO(), io.StringIO()
    code = cli.run(command.__doc__ or "", command.body, ["--json", "--backup-path", str(root), "--connect", TEST_URI,
                                                         *argv], io.BytesIO(stdin), out, prog="vmbk-drill", stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_usage_errors(two_chains, run_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    for argv in (["--point", "soon"], ["--sample", "-2"], ["--sample", "x"], ["--network", "bridge"],
                 ["--jobs", "0"], ["--boot-timeout", "0"]):
        code, out, err = drill(two_chains, "--vm", HOSTILE, *argv)
        assert code == Exit.USAGE and out == b"" and err.startswith("vmbk-drill: "), (argv, err)


def test_records_pass_through_and_failed_or_excluded_backups_are_not_drilled(two_chains, run_dir, monkeypatch,
                                                                             tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text('[drill.vm."excluded"]\nexclude = true\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    lines = [b'{"type":"vm","v":1,"name":"web",  "extra":{"k":1}}\n',
             orjson.dumps({"type": "backup", "v": 1, "name": HOSTILE, "outcome": "skipped"}) + b"\n",
             orjson.dumps({"type": "backup", "v": 1, "name": "excluded", "outcome": "ok"}) + b"\n",
             b'{"type":"error","v":1,"stage":"vmbk-backup","vm":"db","kind":"vm","code":5,"message":"gone"}\n']
    code, out, _ = drill(two_chains, stdin=b"".join(lines))
    assert out == b"".join(lines)  # byte for byte, in order, nothing drilled
    assert code == Exit.VM  # the error that came in counts


def test_a_vm_without_backups_is_an_error_record(two_chains, run_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    code, out, _ = drill(two_chains, "--vm", "nobody")
    recs = [orjson.loads(line) for line in out.splitlines()]
    assert code == Exit.VM and [(r["type"], r["vm"], r["code"]) for r in recs] == [("error", "nobody", 5)]


@pytest.mark.parametrize("cmd", [["--bogus"], ["--help"], ["--config-instance", "nope"]])
def test_the_command_s_usage_help_and_instance(cmd, tmp_path, monkeypatch):
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(command.__doc__ or "", command.body, cmd, io.StringIO(""), out, prog="vmbk-drill", stderr=err)
    if cmd == ["--help"]:
        assert code == 0 and out.getvalue().strip() == (command.__doc__ or "").strip()
        return
    assert code == (Exit.USAGE if cmd == ["--bogus"] else Exit.CONFIG) and out.getvalue() == ""
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("vmbk-drill: ")


# -- drills that end before the boot (libvirt's test driver: nothing is started) ----------------------------------


@pytest.fixture
def drill_env(two_chains, run_dir, tmp_path, monkeypatch) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text(f'[drill]\nscratch_dir = "{tmp_path / "scratch"}"\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    return tmp_path / "scratch"


def failed_drill(root: Path, scratch: Path, code: int, check: str) -> dict:
    status, out, err = drill(root, "--vm", HOSTILE)
    recs = [orjson.loads(line) for line in out.splitlines()]
    assert status == code, err
    rec, error = recs
    assert rec["outcome"] == "failed" and rec["level"] == "none" and rec["checks"][-1]["check"] == check
    assert (error["type"], error["kind"], error["code"], error["vm"]) == ("error", "drill", code, HOSTILE)
    assert not scratch.exists() or list(scratch.iterdir()) == []  # cleaned up
    assert list(backupjob.RUN_DIR.iterdir()) == []  # the marker went last
    from contract_doc import undocumented

    assert undocumented(recs) == {}
    db = sqlite3.connect(root / "_state" / "vmbk.db")
    assert db.execute("SELECT outcome, level, exit_code FROM drills").fetchall() == [("failed", "none", code)]
    assert db.execute("SELECT mode, outcome, exit_code FROM restore_sessions").fetchall() == [("drill", "failed", code)]
    return rec


def test_refused_without_the_memory_the_vm_needs(two_chains, drill_env, monkeypatch):
    from vmbk.drill import one

    monkeypatch.setattr(one, "available_memory", lambda: 32 * MiB)
    rec = failed_drill(two_chains, drill_env, Exit.VM, "resources")
    assert rec["checks"][0]["detail"] == (f"not enough free memory to boot a copy of {HOSTILE}: it needs 70.4 MiB, "
                                          "32.0 MiB is available")


def test_refused_without_space_for_the_copy(two_chains, drill_env, monkeypatch):
    from vmbk.restore import preflight

    monkeypatch.setattr(preflight, "free_space", lambda path: 1000)
    rec = failed_drill(two_chains, drill_env, Exit.STORAGE, "resources")
    assert "insufficient space" in rec["error"] and "scratch directory" in rec["error"]


def test_a_damaged_stream_fails_the_disks_check_naming_it(two_chains, drill_env):
    from test_restore_command import flip_payload_byte

    damaged = two_chains / HOSTILE / "2026-W11" / "vda.inc.virtnbdbackup.2.data"
    flip_payload_byte(damaged)
    rec = failed_drill(two_chains, drill_env, Exit.STORAGE, "disks")
    assert str(damaged) in rec["checks"][1]["detail"] and ".chksum says" in rec["error"]
