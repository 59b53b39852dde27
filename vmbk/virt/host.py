"""Facts about the hypervisor host that decide how domains are defined.

/dev/kvm on some hosts (nested sandboxes, kvm_pvm) is a software
hypervisor that cannot boot a normal distribution kernel.  There is no
hardware virtualisation flag then: use domain type='qemu' (TCG).
"""

from __future__ import annotations

import os


def has_hardware_kvm() -> bool:
    """True when /dev/kvm is backed by VT-x/AMD-V and not by kvm_pvm."""
    if not os.path.exists("/dev/kvm") or os.path.exists("/sys/module/kvm_pvm"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        return False
    return False


def domain_type() -> str:
    """The libvirt domain type to use on this host: 'kvm' or 'qemu'."""
    return "kvm" if has_hardware_kvm() else "qemu"
