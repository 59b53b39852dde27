"""Domain XML for the test guest and for "no-OS" domains.

``guest_domain_xml`` boots the tiny guest of :mod:`guest.build` directly
(``<os><kernel/><initrd/><cmdline/>``): no bootloader, no guest image.
``nos_domain_xml`` has disks but nothing to boot: SeaBIOS finds no boot
signature and idles in ``hlt``, so QEMU runs, its block layer serves
backup jobs and dirty bitmaps, and it costs almost no CPU under TCG.

QEMU/libvirt facts behind the choices:

* Domain type comes from :func:`vmbk.virt.host.domain_type` -- 'qemu'
  (TCG) on hosts where /dev/kvm is kvm_pvm, which cannot boot this kernel.
* machine 'pc' (i440fx): fewer devices to emulate than q35.
* The kernel is normally the uncompressed vmlinux, booted through its PVH
  ELF note (QEMU's pvh.bin option ROM).  PVH needs SeaBIOS: with
  ``uefi=True`` OVMF loads the bzImage (``vmlinuz`` next to the vmlinux,
  EFI stub) instead.  UEFI adds several seconds under TCG.
* Disks are virtio with discard='unmap' (fstrim in the guest reaches the
  qcow2) and cache='writeback': cache='none' means O_DIRECT, which some
  file systems (tmpfs) refuse.
* on_reboot=destroy for the test guest: the kernel runs with panic=-1, so
  a dead init shuts the domain off at once instead of reboot-looping.
  No-OS domains keep the default (restart) and SeaBIOS never retries
  booting (rebootTimeout=-1).
* The agent channel is ``type='unix'`` without a path: libvirt makes the
  socket under /var/lib/libvirt/qemu/channel/target/ and talks to it
  itself (``virDomainQemuAgentCommand``).
* The CPU is qemu64 plus rdrand under TCG (see _cpu_xml): the kernel's
  CRNG is then ready at boot; host-passthrough with real KVM.
* No network, no balloon, no USB, no graphics: less to emulate.
* UEFI (OVMF, secure boot off) and TPM (swtpm, tpm-crb) are optional,
  for tests of NVRAM/TPM state; ``remove_domain`` deletes both.

Helpers: ``make_qcow2`` (qemu-img + qemu-io patterns), ``start_domain``
(define persistently + start, so checkpoint metadata and the domain
outlive a guest shutdown) and
``remove_domain`` (destroy + undefine with checkpoint/snapshot metadata,
NVRAM and TPM state).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from vmbk.virt.host import domain_type

DISK_CACHE = "writeback"


def disk_target(index: int) -> str:
    """vda, vdb, ... vdz, vdaa ... for the index-th virtio disk."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def _cpu_xml() -> str:
    if domain_type() == "kvm":
        return "  <cpu mode='host-passthrough'/>\n"
    # qemu64 plus RDRAND (emulated by TCG): with random.trust_cpu=on the
    # kernel's CRNG is ready at boot.  Without it getrandom() would not be
    # ready for minutes and libuuid retries 8 x 125 ms per call: mke2fs
    # took 4 s instead of 0.1 s.
    return (
        "  <cpu mode='custom' match='exact' check='none'>\n"
        "    <model fallback='forbid'>qemu64</model>\n"
        "    <feature policy='require' name='rdrand'/>\n"
        "  </cpu>\n"
    )


def _disks_xml(disks: Sequence[str | os.PathLike]) -> str:
    out = []
    for i, path in enumerate(disks):
        out.append(
            "    <disk type='file' device='disk'>\n"
            f"      <driver name='qemu' type='qcow2' cache='{DISK_CACHE}' discard='unmap'/>\n"
            f"      <source file={quoteattr(str(path))}/>\n"
            f"      <target dev='{disk_target(i)}' bus='virtio'/>\n"
            "    </disk>\n"
        )
    return "".join(out)


def _serial_xml(console_log: str | os.PathLike | None) -> str:
    if console_log is None:
        return "    <serial type='null'><target port='0'/></serial>\n"
    return (
        "    <serial type='file'>\n"
        f"      <source path={quoteattr(str(console_log))}/>\n"
        "      <target port='0'/>\n"
        "    </serial>\n"
    )


_COMMON_DEVICES = (
    "    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n"
)


def guest_domain_xml(
    name: str,
    image: dict,
    disks: Sequence[str | os.PathLike],
    *,
    memory_mib: int = 256,
    data: Sequence[str] = ("vda",),
    console_log: str | os.PathLike | None = None,
    uefi: bool = False,
    tpm: bool = False,
    extra_devices: str = "",
) -> str:
    """XML of a domain that boots the test guest.

    image is the dict of :func:`guest.build.build_guest`; disks are qcow2
    paths attached as vda, vdb, ...; data names the disks the guest's init
    formats (ext4, if not already) and mounts at /mnt/<dev>.
    extra_devices is raw XML inserted into <devices>.
    """
    kernel = Path(image["kernel"])
    if uefi:
        kernel = kernel.with_name("vmlinuz")  # OVMF cannot boot PVH
    cmdline = image["cmdline"]
    if data:
        cmdline += " vmbk.data=" + ",".join(data)
    if uefi:
        os_open = "  <os firmware='efi'>\n"
        firmware = (
            "    <firmware>\n"
            "      <feature enabled='no' name='secure-boot'/>\n"
            "      <feature enabled='no' name='enrolled-keys'/>\n"
            "    </firmware>\n"
        )
    else:
        os_open = "  <os>\n"
        firmware = ""
    tpm_xml = (
        "    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n"
        if tpm
        else ""
    )
    return (
        f"<domain type='{domain_type()}'>\n"
        f"  <name>{escape(name)}</name>\n"
        f"  <memory unit='MiB'>{int(memory_mib)}</memory>\n"
        "  <vcpu>1</vcpu>\n"
        f"{_cpu_xml()}"
        f"{os_open}"
        f"{firmware}"
        "    <type arch='x86_64' machine='pc'>hvm</type>\n"
        f"    <kernel>{escape(str(kernel))}</kernel>\n"
        f"    <initrd>{escape(image['initrd'])}</initrd>\n"
        f"    <cmdline>{escape(cmdline)}</cmdline>\n"
        "  </os>\n"
        "  <features><acpi/></features>\n"
        "  <clock offset='utc'/>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>destroy</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        f"{_disks_xml(disks)}"
        "    <channel type='unix'>\n"
        "      <target type='virtio' name='org.qemu.guest_agent.0'/>\n"
        "    </channel>\n"
        f"{_serial_xml(console_log)}"
        f"{tpm_xml}"
        f"{_COMMON_DEVICES}"
        f"{extra_devices}"
        "  </devices>\n"
        "</domain>\n"
    )


def nos_domain_xml(
    name: str,
    disks: Sequence[str | os.PathLike],
    *,
    memory_mib: int = 32,
    extra_devices: str = "",
) -> str:
    """XML of a domain with qcow2 disks and no OS (SeaBIOS idles)."""
    return (
        f"<domain type='{domain_type()}'>\n"
        f"  <name>{escape(name)}</name>\n"
        f"  <memory unit='MiB'>{int(memory_mib)}</memory>\n"
        "  <vcpu>1</vcpu>\n"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc'>hvm</type>\n"
        "    <bootmenu enable='no'/>\n"
        "    <bios rebootTimeout='-1'/>\n"
        "  </os>\n"
        "  <clock offset='utc'/>\n"
        "  <devices>\n"
        f"{_disks_xml(disks)}"
        f"{_serial_xml(None)}"
        f"{_COMMON_DEVICES}"
        f"{extra_devices}"
        "  </devices>\n"
        "</domain>\n"
    )


# ------------------------------------------------------------- helpers


def make_qcow2(
    path: str | os.PathLike,
    size: int | str = "64M",
    *,
    writes: Sequence[tuple[int, int, int]] = (),
    cluster_size: int | None = None,
    backing: str | os.PathLike | None = None,
) -> Path:
    """Create a qcow2 image; writes are (pattern_byte, offset, length).

    The writes go through ``qemu-io -c 'write -P pattern offset length'``,
    so the image has allocated clusters with known content.  The file is
    made world-readable; libvirt chowns it to libvirt-qemu when the domain
    starts (dynamic_ownership) and back when it stops.
    """
    path = Path(path)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    opts = []
    if cluster_size:
        opts.append(f"cluster_size={int(cluster_size)}")
    if backing:
        argv += ["-b", str(backing), "-F", "qcow2"]
    if opts:
        argv += ["-o", ",".join(opts)]
    argv += [str(path), str(size)]
    subprocess.run(argv, check=True, capture_output=True)
    if writes:
        io_argv = ["qemu-io", "-f", "qcow2"]
        for pattern, offset, length in writes:
            io_argv += [
                "-c",
                f"write -q -P {int(pattern):#x} {int(offset)} {int(length)}",
            ]
        subprocess.run([*io_argv, str(path)], check=True, capture_output=True)
    os.chmod(path, 0o644)
    return path


def make_raw(path: str | os.PathLike, size: int | str = "32M", *,
             writes: Sequence[tuple[int, int, int]] = ()) -> Path:
    """A sparse raw image with ``writes`` (pattern, offset, length), world-writable."""
    path = Path(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), str(size)], check=True, capture_output=True)
    for pattern, offset, length in writes:
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -q -P {int(pattern):#x} {int(offset)} {int(length)}",
                        str(path)], check=True, capture_output=True)
    os.chmod(path, 0o666)
    return path


def file_disk_xml(path: str | os.PathLike, dev: str, fmt: str = "raw") -> str:
    """A ``<disk>`` element for ``extra_devices``: a file image on virtio."""
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{path}'/>"
            f"<target dev='{dev}' bus='virtio'/></disk>")


UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    # no VIR_DOMAIN_UNDEFINE_KEEP_TPM: swtpm state goes too
)


def start_domain(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    """Define (persistently) and start a domain; undefine it if start fails."""
    dom = conn.defineXML(xml)
    try:
        dom.create()
    except libvirt.libvirtError:
        remove_domain(dom)
        raise
    return dom


def remove_domain(dom: libvirt.virDomain) -> None:
    """Destroy (if running) and undefine a domain with all its metadata.

    Checkpoint and snapshot metadata, NVRAM and TPM state go too; errors
    because the domain is already gone are ignored.
    """
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        if dom.isActive():
            raise
    try:
        dom.undefineFlags(UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
