#!/usr/bin/env python3
"""Build the tiny test guest: a Debian kernel plus a busybox initramfs.

The integration tests boot this guest under libvirt with direct kernel
boot (``<os><kernel/><initrd/><cmdline/>``).  Everything comes from Debian
packages so the build needs only the Debian mirror, not a guest image:

* kernel: ``apt-get download`` of the real ``linux-image-<abi>-amd64``
  package that the ``linux-image-amd64`` metapackage depends on, unpacked
  with ``dpkg-deb -x``.  Its modules are in the same package.
* ``qemu-ga``: ``apt-get download qemu-guest-agent``; its shared
  libraries (as listed by ``ldd``) and the dynamic loader are copied from
  the host, which runs the same Debian release.
* ``busybox`` (busybox-static) and ``mke2fs`` (e2fsprogs) are copied from
  the host: busybox' own mke2fs only makes ext2.

Quirks worth knowing:

* QEMU runs as ``libvirt-qemu`` under ``qemu:///system``, so the kernel,
  the initrd and every directory above them must be world-readable and
  traversable.  That is why the cache is ``/var/cache/vmbk/guest`` for
  root and not ``/root/.cache`` (mode 0700).
* Under TCG (this host's /dev/kvm is kvm_pvm, which cannot boot a normal
  kernel) booting the uncompressed ``vmlinux`` through its PVH ELF note
  saves 2-3 s against the bzImage, which decompresses itself with an
  emulated CPU.  ``vmlinux`` is the xz payload inside the bzImage
  (Debian builds with CONFIG_KERNEL_XZ); we find the xz magic and
  decompress it with :mod:`lzma`.  When the payload is not xz or the ELF
  has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY) we fall back to the
  bzImage.  ``VMBK_GUEST_KERNEL=bzimage`` forces the bzImage.
* The kernel .deb ships no ``modules.dep``: dependencies come from the
  ``depends=`` and ``softdep=`` strings in each module's ELF ``.modinfo``
  section, parsed here without ``modinfo`` (kmod is not necessarily
  installed).  ext4 and jbd2 carry ``softdep=pre: crypto-crc32c``, which
  is the alias of ``crc32c_generic``: it must be loaded first or mounting
  ext4 fails.  busybox ``insmod`` cannot read compressed modules, so
  ``.ko.xz``/``.ko.zst``/``.ko.gz`` are decompressed at build time.
* The initramfs is a newc cpio written by Python (gzip-compressed), so
  device nodes (``/dev/console``) need no root and no ``cpio`` binary.

* The kernel command line has ``random.trust_cpu=on`` and domain.py
  gives the TCG CPU ``rdrand``: otherwise the CRNG is not initialised for
  minutes, libuuid's getrandom(GRND_NONBLOCK) retries 8 x 125 ms per
  UUID, and mke2fs takes 4 s instead of 0.1 s.
* busybox is built with "prefer applets": in the guest's shell a bare
  ``mke2fs`` is busybox's ext2-only applet; e2fsprogs' is /sbin/mke2fs,
  also reachable as mkfs.ext4 (not an applet).

The output is cached in a directory named by a key derived from the
package versions and from the sources of this script and of ``init``.
apt-cache takes ~0.6 s per call here (pkgcache.bin is disabled), so the
versions are memoised on the mtimes of apt's lists and dpkg's status:
a second run takes ~0.05 s and prints the same JSON.  Builds go to a
temporary directory renamed into place, under a lock; old entries are
pruned.

Usage: ``python3 tests/guest/build.py [--force]`` prints
``{"kernel": path, "initrd": path, "cmdline": str, "key": str}``.
Importable as ``from guest.build import build_guest``.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SOURCE = HERE / "init"

KERNEL_META = "linux-image-amd64"
AGENT_PACKAGE = "qemu-guest-agent"
HOST_PACKAGES = ("busybox-static", "e2fsprogs", "libc6", "libglib2.0-0")

# Modules to load, roots only: dependencies are resolved from .modinfo.
# Order matters only for softdeps, which are resolved too.
MODULE_ROOTS = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")
# softdep targets are module aliases; map the ones we need to a module.
SOFTDEP_ALIASES = {"crypto-crc32c": "crc32c_generic", "crc32c": "crc32c_generic"}

BUSYBOX = "/bin/busybox"
MKE2FS = "/sbin/mke2fs"
MKE2FS_CONF = "/etc/mke2fs.conf"

# console=ttyS0: kernel and init messages land in the domain's serial log
# file (not "quiet": it costs nothing measurable and helps debugging).
# random.trust_cpu=on: credit RDRAND (domain.py gives the TCG CPU rdrand),
# else the CRNG is not ready and libuuid (mke2fs) sleeps ~1 s per UUID.
# panic=-1: a dead init reboots at once (domain.py makes reboot destroy).
# i8042.*: skip probing a keyboard controller we do not use (slow in TCG).
# tsc=reliable/no_timer_check/lpj: skip calibrations that take long in TCG.
CMDLINE = (
    "console=ttyS0 panic=-1 "
    "i8042.noaux i8042.nokbd i8042.nopnp "
    "tsc=reliable no_timer_check mitigations=off "
    "random.trust_cpu=on"
)

# Cache entries kept besides the current one (old ones cost ~80 MB each).
KEEP_OLD_ENTRIES = 2

# Bump when the layout of the cache changes in a way the hashes miss.
RECIPE_VERSION = 1

XZ_MAGIC = b"\xfd7zXZ\x00"
XEN_ELFNOTE_PHYS32_ENTRY = 18


class BuildError(RuntimeError):
    """The guest could not be built; the message says why."""


def log(msg: str) -> None:
    print(f"guest-build: {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], *, cwd: str | Path | None = None) -> str:
    """Run a command (argument list, never a shell); return its stdout."""
    try:
        proc = subprocess.run(
            argv, cwd=cwd, check=False, capture_output=True, text=True
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{argv[0]}: not found ({exc})") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"{' '.join(argv)} failed with status {proc.returncode}: "
            f"{proc.stderr.strip()}"
        )
    return proc.stdout


# --------------------------------------------------------------- cache dir


def default_cache_dir() -> Path:
    env = os.environ.get("VMBK_GUEST_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/vmbk/guest")
    return Path.home() / ".cache" / "vmbk" / "guest"


def make_world_dir(path: Path) -> None:
    """Create path (and parents) so that any user can traverse it."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:
            pass
        os.chmod(d, 0o755)  # the umask may have removed bits


def check_world_traversable(path: Path) -> None:
    """Warn when libvirt-qemu could not reach path (QEMU opens the kernel)."""
    for d in [path, *path.parents]:
        try:
            mode = d.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            log(
                f"warning: {d} is not world-traversable; QEMU running as "
                "libvirt-qemu will not be able to open the kernel/initrd"
            )
            return


# ---------------------------------------------------------------- versions


def apt_show(packages: list[str]) -> dict[str, dict[str, str]]:
    """Candidate stanza fields of packages, as {package: {field: value}}."""
    out = run(["apt-cache", "show", "--no-all-versions", *packages])
    result: dict[str, dict[str, str]] = {}
    for stanza in out.strip().split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" in fields:
            result.setdefault(fields["Package"], fields)
    missing = [p for p in packages if p not in result]
    if missing:
        raise BuildError(f"apt-cache knows no {', '.join(missing)} (apt-get update?)")
    return result


def package_versions() -> dict:
    """Versions of everything that goes into the guest, asked from apt/dpkg.

    The kernel package and version come from the Depends of the metapackage
    (``linux-image-6.1.0-56-amd64 (= 6.1.192-2)``).
    """
    shown = apt_show([KERNEL_META, AGENT_PACKAGE])
    kernel = None
    for dep in re.split(r",\s*", shown[KERNEL_META].get("Depends", "")):
        m = re.match(
            r"(linux-image-[0-9][^\s(|]*)(?:\s*\(=\s*([^)\s]+)\))?", dep.strip()
        )
        if m:
            name = m.group(1)
            version = m.group(2) or apt_show([name])[name]["Version"]
            kernel = [name, version]
            break
    if kernel is None:
        raise BuildError(f"{KERNEL_META} depends on no linux-image-<abi> package")
    return {
        "kernel": kernel,
        "agent": [AGENT_PACKAGE, shown[AGENT_PACKAGE]["Version"]],
        "host": host_versions(HOST_PACKAGES),
    }


def host_versions(packages: tuple[str, ...]) -> dict[str, str]:
    out = run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *packages])
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def apt_fingerprint() -> str:
    """Changes whenever apt's package lists or dpkg's status change."""
    h = hashlib.sha256()
    paths = sorted(Path("/var/lib/apt/lists").glob("*Packages*"))
    paths.append(Path("/var/lib/dpkg/status"))
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_package_versions(cache: Path) -> dict:
    """package_versions(), memoised on apt_fingerprint().

    apt-cache takes ~0.6 s per call here (Debian container images disable
    pkgcache.bin, so every call re-parses the lists): without the memo a
    warm build_guest() would not be instant.
    """
    memo = cache / ".versions.json"
    fingerprint = apt_fingerprint()
    try:
        saved = json.loads(memo.read_text())
        if saved.get("fingerprint") == fingerprint:
            return saved["versions"]
    except (OSError, ValueError, KeyError):
        pass
    versions = package_versions()
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "versions": versions}))
    os.chmod(tmp, 0o644)
    os.replace(tmp, memo)
    return versions


def build_key(cache: Path) -> tuple[str, dict]:
    """The cache key and the facts it was derived from."""
    facts = {
        "recipe": RECIPE_VERSION,
        **cached_package_versions(cache),
        "build.py": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "init": hashlib.sha256(INIT_SOURCE.read_bytes()).hexdigest(),
        "kernel_mode": os.environ.get("VMBK_GUEST_KERNEL", "auto"),
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    abi = facts["kernel"][0].removeprefix("linux-image-")
    return f"{abi}-{digest[:12]}", facts


# ------------------------------------------------------------------ kernel


def apt_download(package: str, version: str, dest: Path) -> Path:
    """Download package=version into dest and return the .deb path."""
    # Sandbox.User=root: the _apt user cannot write into our 0700 tempdir.
    run(
        [
            "apt-get",
            "download",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            f"{package}={version}",
        ],
        cwd=dest,
    )
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise BuildError(f"apt-get download {package} produced no .deb")
    return debs[-1]


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage with an xz payload, else None."""
    # The setup header says where the compressed payload is; searching the
    # magic from there avoids false hits in the setup code.
    start = 0
    if bzimage[0x202:0x206] == b"HdrS":
        setup_sects = bzimage[0x1F1] or 4
        payload_offset = struct.unpack_from("<I", bzimage, 0x248)[0]
        start = (setup_sects + 1) * 512 + payload_offset
    pos = bzimage.find(XZ_MAGIC, start)
    if pos < 0:
        pos = bzimage.find(XZ_MAGIC)
    if pos < 0:
        return None
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        elf = dec.decompress(bzimage[pos:])
    except lzma.LZMAError:
        return None
    if not elf.startswith(b"\x7fELF") or not has_pvh_note(elf):
        return None
    return elf


def has_pvh_note(elf: bytes) -> bool:
    """True when the ELF has a Xen PHYS32_ENTRY note (QEMU boots it as PVH)."""
    if elf[4] != 2:  # ELFCLASS64
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, off)
            name = elf[off + 12 : off + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            off += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


# ----------------------------------------------------------------- modules


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """Contents of a section of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        for i in range(shnum)
    ]
    strtab = headers[shstrndx][4]
    for sh in headers:
        name_end = data.index(b"\0", strtab + sh[0])
        if data[strtab + sh[0] : name_end].decode() == wanted:
            return data[sh[4] : sh[4] + sh[5]]
    return None


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed when the file is .ko.xz/.ko.gz/.ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(
            ["zstd", "-dc", str(path)], check=True, capture_output=True
        ).stdout
    return data


def modinfo(data: bytes) -> dict[str, list[str]]:
    section = elf_section(data, ".modinfo") or b""
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        if b"=" in item:
            k, _, v = item.decode(errors="replace").partition("=")
            info.setdefault(k, []).append(v)
    return info


def module_order(moddir: Path, roots: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """[(name, uncompressed .ko)] for roots and dependencies, deps first.

    Modules that are built into the kernel (absent from the tree) are
    skipped when modules.builtin lists them, and are an error otherwise.
    """
    files: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", path.name).replace("-", "_")
        files[name] = path
    builtin: set[str] = set()
    builtin_list = moddir / "modules.builtin"
    if builtin_list.exists():
        for line in builtin_list.read_text().splitlines():
            builtin.add(Path(line).name.removesuffix(".ko").replace("-", "_"))

    ordered: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in visiting:
            raise BuildError(f"module dependency cycle at {name}")
        if name not in files:
            if name in builtin:
                done.add(name)
                return
            raise BuildError(f"module {name} not found under {moddir}")
        visiting.add(name)
        data = read_module(files[name])
        info = modinfo(data)
        for soft in info.get("softdep", []):
            # "pre: a b post: c" -- only "pre" matters for load order.
            words = soft.split()
            pre = False
            for w in words:
                if w.endswith(":"):
                    pre = w == "pre:"
                elif pre:
                    target = SOFTDEP_ALIASES.get(w, w).replace("-", "_")
                    if target in files or target in builtin:
                        visit(target)
                    else:
                        log(f"note: softdep {w} of {name} not resolved, skipped")
        for deps in info.get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep)
        visiting.discard(name)
        done.add(name)
        ordered.append((name, data))

    for root in roots:
        visit(root)
    return ordered


# -------------------------------------------------------------- initramfs


class Cpio:
    """Minimal writer for the newc ("070701") cpio format the kernel reads."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.lstrip("/")
        if name in self.names:
            raise BuildError(f"duplicate initramfs entry {name}")
        self.names.add(name)
        nameb = name.encode() + b"\0"
        fields = (
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(nameb),
            0,
        )
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + nameb)
        self.buf.write(b"\0" * (-(len(header) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self.names:
                self._entry(sub, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def exists(self, name: str) -> bool:
        return name.strip("/") in self.names

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def shared_libraries(binary: str | Path) -> list[str]:
    """Absolute paths of the libraries ldd lists, loader included."""
    out = run(["ldd", str(binary)])
    libs = []
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def add_binary(cpio: Cpio, source: str | Path, dest: str) -> None:
    """Copy an executable and its shared libraries (at ldd's paths)."""
    cpio.file(dest, Path(source).read_bytes(), 0o755)
    for lib in shared_libraries(source):
        if not cpio.exists(lib):
            cpio.file(lib, Path(os.path.realpath(lib)).read_bytes(), 0o755)


def busybox_applets() -> list[str]:
    out = run([BUSYBOX, "--list-full"])
    return [line.strip() for line in out.splitlines() if line.strip()]


def build_initramfs(kernel_root: Path, abi: str, agent_root: Path) -> bytes:
    cpio = Cpio()
    for d in (
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "mnt",
        "etc",
        "root",
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "var",
    ):
        cpio.dir(d)
    cpio.symlink("var/run", "/run")
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)

    init = INIT_SOURCE.read_bytes()
    cpio.file("init", init, 0o755)
    # The init script is multi-call: invoked as shutdown/poweroff/reboot/
    # halt it syncs, unmounts /mnt/* and powers off (qemu-ga's
    # guest-shutdown runs /sbin/shutdown).
    special = {"sbin/shutdown", "sbin/poweroff", "sbin/reboot", "sbin/halt"}
    for name in sorted(special):
        cpio.symlink(name, "/init")

    add_binary(cpio, MKE2FS, "sbin/mke2fs")
    for alias in ("mkfs.ext4", "mkfs.ext3", "mkfs.ext2"):
        cpio.symlink(f"sbin/{alias}", "mke2fs")
    if Path(MKE2FS_CONF).exists():
        cpio.file("etc/mke2fs.conf", Path(MKE2FS_CONF).read_bytes())

    agent = agent_root / "usr/sbin/qemu-ga"
    if not agent.exists():
        raise BuildError(f"{agent} missing from the {AGENT_PACKAGE} package")
    add_binary(cpio, agent, "usr/sbin/qemu-ga")
    # glibc's pthread_cancel/unwinding dlopens libgcc_s at run time.
    for lib in ("/lib/x86_64-linux-gnu/libgcc_s.so.1",):
        if Path(lib).exists() and not cpio.exists(lib):
            cpio.file(lib, Path(lib).read_bytes(), 0o755)

    # busybox applets last: the real mke2fs and qemu-ga win over applets.
    cpio.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    for applet in busybox_applets():
        applet = applet.lstrip("/")
        if applet in special or applet == "bin/busybox" or cpio.exists(applet):
            continue
        cpio.symlink(applet, "/bin/busybox")

    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/hostname", b"vmbk-guest\n")

    moddir = kernel_root / "lib/modules" / abi
    names = []
    for i, (name, data) in enumerate(module_order(moddir, MODULE_ROOTS)):
        cpio.file(f"lib/modules/{i:02d}-{name}.ko", data)
        names.append(name)
    log(f"modules: {' '.join(names)}")

    # Level 1: under TCG the kernel's inflate speed matters more than size.
    return gzip.compress(cpio.finish(), compresslevel=1, mtime=0)


# ------------------------------------------------------------------- build


def _build_into(dest: Path, final: Path, key: str, facts: dict) -> None:
    """Build into dest; guest.json names the files under final."""
    kpkg, kver = facts["kernel"]
    apkg, aver = facts["agent"]
    abi = kpkg.removeprefix("linux-image-")
    with tempfile.TemporaryDirectory(prefix="vmbk-guest-") as tmp:
        work = Path(tmp)
        log(f"downloading {kpkg}={kver} and {apkg}={aver}")
        kdeb = apt_download(kpkg, kver, work)
        adeb = apt_download(apkg, aver, work)
        kroot, aroot = work / "kernel", work / "agent"
        run(["dpkg-deb", "-x", str(kdeb), str(kroot)])
        run(["dpkg-deb", "-x", str(adeb), str(aroot)])

        bzimage_path = kroot / "boot" / f"vmlinuz-{abi}"
        bzimage = bzimage_path.read_bytes()
        shutil.copyfile(bzimage_path, dest / "vmlinuz")
        kernel = "vmlinuz"
        if os.environ.get("VMBK_GUEST_KERNEL", "auto") != "bzimage":
            vmlinux = extract_vmlinux(bzimage)
            if vmlinux is not None:
                (dest / "vmlinux").write_bytes(vmlinux)
                kernel = "vmlinux"
            else:
                log("no xz payload with a PVH note: booting the bzImage")
        config = kroot / "boot" / f"config-{abi}"
        if config.exists():
            shutil.copyfile(config, dest / "config")

        (dest / "initrd.img").write_bytes(build_initramfs(kroot, abi, aroot))
    info = {
        "kernel": str(final / kernel),
        "initrd": str(final / "initrd.img"),
        "cmdline": CMDLINE,
        "key": key,
    }
    (dest / "facts.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    (dest / "guest.json").write_text(json.dumps(info, sort_keys=True) + "\n")
    for f in dest.iterdir():
        os.chmod(f, 0o644)
    os.chmod(dest, 0o755)


def prune_cache(cache: Path, keep: Path) -> None:
    """Delete all but the newest KEEP_OLD_ENTRIES entries besides keep.

    A running QEMU keeps its kernel/initrd open, so deleting them under
    it is harmless; old entries only exist after a package update or an
    edit of build.py/init.
    """
    entries = [
        d
        for d in cache.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and d != keep
        and (d / "guest.json").exists()
    ]
    entries.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in entries[KEEP_OLD_ENTRIES:]:
        shutil.rmtree(old, ignore_errors=True)
    # Temporary build dirs of interrupted builds (we hold the lock).
    for tmp in cache.glob(".tmp-*"):
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)


def build_guest(cache_dir: str | Path | None = None, *, force: bool = False) -> dict:
    """Build (or find in the cache) the test guest; return its description.

    Returns ``{"kernel": path, "initrd": path, "cmdline": str, "key": str}``.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    make_world_dir(cache)
    check_world_traversable(cache)
    key, facts = build_key(cache)
    final = cache / key
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force and final.exists():
            shutil.rmtree(final)
        if not (final / "guest.json").exists():
            if final.exists():  # a half-deleted entry; start afresh
                shutil.rmtree(final)
            t0 = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
            try:
                _build_into(tmp, final, key, facts)
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
            log(f"built {final} in {time.monotonic() - t0:.1f} s")
            prune_cache(cache, keep=final)
    return json.loads((final / "guest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        help="default: $VMBK_GUEST_CACHE or "
        "/var/cache/vmbk/guest (root) or ~/.cache/vmbk/guest",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        info = build_guest(args.cache_dir, force=args.force)
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    print(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
