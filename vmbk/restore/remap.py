"""A VM's XML against the host it is restored on: what is missing there, and the remaps.

A disaster recovery or clone onto *another* host (vmrestore guide,
"Cross-Host Considerations"; Qubes' restore with missing net VMs) meets
networks, bridges, storage pools, directories, firmware files, machine
types, CPU models, an emulator path or swtpm that the target does not
have.  `check` compares the XML the restore would define with the
target's facts (`TargetFacts`, gathered by `vmbk.restore.hostcheck`) and
returns the XML with the remaps applied and every problem left, each with
its fix; the restore defines nothing while a problem remains (exit 5, a
``preflight`` error naming all of them).

What is remapped, and how it is asked for:

* ``--remap-network OLD=NEW``: an interface on network OLD goes on NEW;
  ``--network-fallback NAME``: any network (or bridge) the target lacks
  goes to NAME (Qubes' "ignore missing net VMs": the default net VM);
* ``--remap-pool OLD=NEW``, ``--remap-dir OLD=NEW``: where disks go when
  the restore puts them back in their places (no ``--restore-path``): a
  volume of pool OLD into pool NEW's directory, a file under directory
  OLD under NEW (the longest OLD that matches wins);
* firmware: a loader or NVRAM template that is not on the target is
  replaced by libvirt's firmware auto-selection (``<os firmware='efi'>``,
  the descriptors in /usr/share/qemu/firmware name each distribution's
  OVMF files), secure boot kept; done whenever needed, and recorded;
* a machine type the target's QEMU lacks (``pc-q35-7.2`` on an older
  QEMU) becomes its alias (``q35``, ``pc``), recorded;
* an emulator path that is not there becomes the target's own, recorded;
* a CPU model the target cannot run: ``--cpu host-model`` (a problem
  without it);
* an emulated TPM where swtpm is not installed: a problem (install
  swtpm, or ``--skip-tpm`` and remove the TPM by hand).

Pure: XML text and facts in, XML, remaps and problems out.
"""

from __future__ import annotations

import dataclasses
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence

from vmbk.errors import UsageError, VmError
from vmbk.virt.domain import LIBOSINFO_NS, QEMU_NS

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("libosinfo", LIBOSINFO_NS)


class PreflightError(VmError):
    """The target host lacks what the VM needs: nothing was defined or written."""

    kind = "preflight"


@dataclasses.dataclass(frozen=True)
class Remaps:
    """What the user asked for (the command layer builds it)."""

    networks: tuple[tuple[str, str], ...] = ()
    network_fallback: str | None = None
    pools: tuple[tuple[str, str], ...] = ()
    dirs: tuple[tuple[str, str], ...] = ()
    #: ``--cpu host-model``: a CPU model the target cannot run becomes host-model.
    cpu_host_model: bool = False

    @property
    def any(self) -> bool:
        return bool(self.networks or self.network_fallback or self.pools or self.dirs or self.cpu_host_model)


def parse_pairs(values: Sequence[str], flag: str) -> tuple[tuple[str, str], ...]:
    """``OLD=NEW`` values of a repeatable option; UsageError (7) for anything else."""
    out = []
    for v in values:
        old, sep, new = v.partition("=")
        if not sep or not old or not new:
            raise UsageError(f"{flag} takes OLD=NEW, not {v!r}")
        out.append((old, new))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class TargetFacts:
    """What the host the VM is restored on has (`vmbk.restore.hostcheck.gather`)."""

    #: network name -> active
    networks: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    bridges: frozenset[str] = frozenset()
    #: pool name -> (active, target directory or None)
    pools: Mapping[str, tuple[bool, str | None]] = dataclasses.field(default_factory=dict)
    #: paths that exist there, of those the XML and the placements name
    existing: frozenset[str] = frozenset()
    machines: frozenset[str] = frozenset()
    #: CPU models the target can run (custom mode, usable='yes')
    cpu_models: frozenset[str] = frozenset()
    emulator: str | None = None
    efi_autoselect: bool = False
    swtpm: bool = True


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # network | bridge | pool | directory | firmware | machine | cpu | tpm | emulator
    item: str
    fix: str

    def __str__(self) -> str:
        return f"{self.kind} {self.item!r}: {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Result:
    xml: str
    remaps: list[dict[str, str]] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)


def place(source: str, pool: str | None, remaps: Remaps, facts: TargetFacts) -> tuple[str | None, Problem | None]:
    """Where a disk goes on the target when it goes back to its place: its directory.

    ``source``: the disk's file in the backup's XML (a volume: its name);
    ``pool``: the pool of a ``type='volume'`` disk.  (directory, None) or
    (None, the problem).
    """
    if pool is not None:
        new = dict(remaps.pools).get(pool, pool)
        active, path = facts.pools.get(new, (False, None))
        if new not in facts.pools:
            return None, Problem("pool", pool, f"no storage pool {new!r} here: --remap-pool {pool}=POOL, "
                                               "or --restore-path DIR")
        if not active or not path:
            return None, Problem("pool", new, f"storage pool {new!r} is not active (virsh pool-start {new})")
        return path, None
    d = remap_dir(posixpath.dirname(source), remaps)
    if d not in facts.existing:
        return None, Problem("directory", d, f"{d} does not exist here: --remap-dir {posixpath.dirname(source)}=DIR, "
                                             f"--remap-pool POOL=POOL, or --restore-path DIR")
    return d, None


def remap_dir(d: str, remaps: Remaps) -> str:
    """A directory after ``--remap-dir`` (the longest OLD that holds it wins)."""
    best = max((o for o, _ in remaps.dirs if d == o.rstrip("/") or d.startswith(o.rstrip("/") + "/")),
               key=len, default=None)
    return d if best is None else dict(remaps.dirs)[best].rstrip("/") + d[len(best.rstrip("/")):]


def check(xml: str, remaps: Remaps, facts: TargetFacts, *, tpm: bool = True) -> Result:
    """The XML with the remaps applied, what was remapped, and what is still missing."""
    root = ET.fromstring(xml)
    out = Result(xml)
    _networks(root, remaps, facts, out)
    _firmware(root, facts, out)
    _machine(root, facts, out)
    _emulator(root, facts, out)
    _cpu(root, remaps, facts, out)
    if tpm and not facts.swtpm and any(b.get("type") == "emulator" for b in root.findall("devices/tpm/backend")):
        out.problems.append(Problem("tpm", "emulator", "swtpm is not installed here (apt-get install swtpm "
                                                       "swtpm-tools), or remove the TPM from the VM"))
    out.xml = ET.tostring(root, encoding="unicode")
    return out


def _networks(root: ET.Element, remaps: Remaps, facts: TargetFacts, out: Result) -> None:
    table = dict(remaps.networks)
    fallback = remaps.network_fallback
    if fallback is not None and fallback not in facts.networks:
        out.problems.append(Problem("network", fallback, f"--network-fallback {fallback}: no such network here"))
        fallback = None
    for iface in root.findall("devices/interface"):
        src = iface.find("source")
        if src is None:
            continue
        kind = iface.get("type")
        if kind == "network":
            old = src.get("network", "")
            new = table.get(old, old if old in facts.networks else fallback)
            if new is None:
                out.problems.append(Problem("network", old, f"no network {old!r} here: --remap-network {old}=NAME "
                                                            "or --network-fallback NAME"))
                continue
            if new not in facts.networks:
                out.problems.append(Problem("network", new, f"--remap-network {old}={new}: no such network here"))
                continue
            if new != old:
                src.set("network", new)
                src.attrib.pop("portgroup", None)
                out.remaps.append({"kind": "network", "from": old, "to": new})
            if not facts.networks[new]:
                out.problems.append(Problem("network", new, f"network {new!r} is not active (virsh net-start {new})"))
        elif kind == "bridge":
            old = src.get("bridge", "")
            if old in facts.bridges:
                continue
            new = table.get(old, fallback)
            if new is None or new not in facts.networks:
                out.problems.append(Problem("bridge", old, f"no bridge {old!r} here: --remap-network {old}=NETWORK "
                                                           "or --network-fallback NETWORK"))
                continue
            iface.set("type", "network")
            for attr in list(src.attrib):
                del src.attrib[attr]
            src.set("network", new)
            out.remaps.append({"kind": "bridge", "from": old, "to": new})


def _firmware(root: ET.Element, facts: TargetFacts, out: Result) -> None:
    os_el = root.find("os")
    if os_el is None:
        return
    loader = os_el.find("loader")
    nvram = os_el.find("nvram")
    missing = [p for p in ((loader.text or "").strip() if loader is not None else "",
                           nvram.get("template", "") if nvram is not None else "") if p and p not in facts.existing]
    if not missing:
        return
    if not facts.efi_autoselect:
        for p in missing:
            out.problems.append(Problem("firmware", p, f"{p} is not here and libvirt cannot select firmware by "
                                                       "descriptor (install ovmf)"))
        return
    secure = loader is not None and loader.get("secure") == "yes"
    os_el.set("firmware", "efi")
    if loader is not None:
        os_el.remove(loader)
    if secure:  # auto-selection keeps what the firmware must do
        ET.SubElement(os_el, "loader", {"secure": "yes"})
    if nvram is not None:
        nvram.attrib.pop("template", None)
    out.remaps.append({"kind": "firmware", "from": ", ".join(missing), "to": "auto-selection (firmware='efi')"})


def _machine(root: ET.Element, facts: TargetFacts, out: Result) -> None:
    t = root.find("os/type")
    machine = t.get("machine") if t is not None else None
    if t is None or not machine or not facts.machines or machine in facts.machines:
        return
    alias = "q35" if "q35" in machine else "pc" if machine.startswith(("pc-i440fx", "pc-")) or machine == "pc" else None
    if alias is not None and alias in facts.machines:
        t.set("machine", alias)
        out.remaps.append({"kind": "machine", "from": machine, "to": alias})
    else:
        out.problems.append(Problem("machine", machine, "this host's QEMU has no such machine type: edit the XML "
                                                        f"(one of {', '.join(sorted(facts.machines)[:6])} ...)"))


def _emulator(root: ET.Element, facts: TargetFacts, out: Result) -> None:
    em = root.find("devices/emulator")
    if em is None or not (em.text or "").strip():
        return
    path = (em.text or "").strip()
    if path in facts.existing:
        return
    if facts.emulator:
        em.text = facts.emulator
        out.remaps.append({"kind": "emulator", "from": path, "to": facts.emulator})
    else:
        out.problems.append(Problem("emulator", path, "no such emulator here, and libvirt names none"))


def _cpu(root: ET.Element, remaps: Remaps, facts: TargetFacts, out: Result) -> None:
    cpu = root.find("cpu")
    if cpu is None or cpu.get("mode", "custom") != "custom":
        return
    model = cpu.findtext("model")
    if not model or not facts.cpu_models or model in facts.cpu_models:
        return
    if not remaps.cpu_host_model:
        out.problems.append(Problem("cpu", model, "this host cannot run that CPU model: --cpu host-model"))
        return
    for child in list(cpu):
        if child.tag in ("model", "vendor", "feature"):
            cpu.remove(child)
    cpu.set("mode", "host-model")
    cpu.attrib.pop("match", None)
    cpu.attrib.pop("check", None)
    out.remaps.append({"kind": "cpu", "from": model, "to": "host-model"})


def disk_places(xml: str) -> dict[str, tuple[str, str | None]]:
    """target -> (its file, or a volume's name; the volume's pool or None) in the backup's XML."""
    out: dict[str, tuple[str, str | None]] = {}
    for disk in ET.fromstring(xml).findall("devices/disk"):
        target = disk.find("target")
        src = disk.find("source")
        if target is None or src is None or disk.get("device", "disk") != "disk":
            continue
        if disk.get("type") == "volume":
            out[target.get("dev", "")] = (src.get("volume", ""), src.get("pool"))
        elif src.get("file") or src.get("dev"):
            out[target.get("dev", "")] = (src.get("file") or src.get("dev") or "", None)
    return out


def paths_named(xml: str) -> set[str]:
    """The paths of the XML whose existence on the target `check` asks about."""
    root = ET.fromstring(xml)
    out = {(root.findtext("os/loader") or "").strip(), (root.findtext("devices/emulator") or "").strip()}
    nv = root.find("os/nvram")
    if nv is not None and nv.get("template"):
        out.add(nv.get("template", ""))
    return {p for p in out if p}
