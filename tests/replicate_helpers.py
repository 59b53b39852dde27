"""Running vmbk-replicate from tests, and what they build and look at.

`configure` writes a configuration instance with ``[[replication]]``
tables (the fixtures in tests/fixtures/replication.py make them);
`replicate` runs the command in-process, `replicate_process` as a real
process (for kill -9); `synthetic_tree` is a VM tree of made-up files
for the transport suite (the streams are not streams); `points` reads a
tree back through ``vmbk-restore --list-restore-points``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from vmbk.commands.replicate import main as replicate_main
from vmbk.commands.restore import main as restore_main

ROOT = Path(__file__).resolve().parents[1]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return orjson.dumps(str(v)).decode()


def configure(config_dir: Path, destinations: Iterable[Mapping[str, Any]], *,
              replicate: Mapping[str, Any] | None = None, **top: Any) -> Path:
    """``config_dir/default.toml`` with these destinations, a ``[replicate]``
    table and top-level keys."""
    config_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for d in destinations:
        lines.append("[[replication]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()]
    if replicate:
        lines.append("[replicate]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in replicate.items()]
    (config_dir / "default.toml").write_text("\n".join(lines) + "\n")
    return config_dir


def replicate(config_dir: Path, root: Path, *argv: str, stdin: str = "") -> tuple[int, list[dict[str, Any]]]:
    """``vmbk-replicate --json --backup-path ROOT ARGV...`` in-process."""
    old = os.environ.get("VMBK_CONFIG_DIR")
    os.environ["VMBK_CONFIG_DIR"] = str(config_dir)
    try:
        out = io.StringIO()
        code = replicate_main(["--json", "--backup-path", str(root), *argv], io.StringIO(stdin), out)
    finally:
        if old is None:
            os.environ.pop("VMBK_CONFIG_DIR", None)
        else:
            os.environ["VMBK_CONFIG_DIR"] = old
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def replicate_process(config_dir: Path, root: Path, *argv: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VMBK_CONFIG_DIR": str(config_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-replicate"), "--json", "--backup-path",
                             str(root), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def only(records: list[dict[str, Any]], rtype: str) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == rtype]


def synthetic_tree(root: Path, vm: str, *, data_mib: int = 1, points: int = 2, stamp: float | None = None) -> Path:
    """A VM tree of made-up files in the tree's names: a monthly chain with
    ``points`` points, its side and commit files, TPM state (0600)."""
    chain = root / vm / "202603"
    (chain / "checkpoints").mkdir(parents=True, exist_ok=True)
    (chain / "tpm-state" / "tpm2").mkdir(parents=True, exist_ok=True)
    os.chmod(chain / "tpm-state", 0o700)
    os.chmod(chain / "tpm-state" / "tpm2", 0o700)
    files = {"vda.full.data": os.urandom(data_mib << 20), "vda.full.data.chksum": b"1",
             "vda.virtnbdbackup.0.qcow.json": b"{}", "checkpoints/virtnbdbackup.0.xml": b"<x/>",
             "vmconfig.virtnbdbackup.0.xml": b"<domain/>", "tpm-state/tpm2/tpm2-00.permall": b"secret"}
    for n in range(1, points):
        files[f"vda.inc.virtnbdbackup.{n}.data"] = os.urandom(64 << 10)
        files[f"vda.inc.virtnbdbackup.{n}.data.chksum"] = b"2"
        files[f"checkpoints/virtnbdbackup.{n}.xml"] = b"<x/>"
        files[f"vmconfig.virtnbdbackup.{n}.xml"] = b"<domain/>"
    files[f"{vm}.cpt"] = orjson.dumps([f"virtnbdbackup.{n}" for n in range(points)])
    t = stamp if stamp is not None else time.time() - 3600
    for name, data in files.items():
        (chain / name).write_bytes(data)
        os.utime(chain / name, (t, t))
    os.chmod(chain / "tpm-state" / "tpm2" / "tpm2-00.permall", 0o600)
    return chain


def tree_listing(root: Path) -> dict[str, tuple[int, float]]:
    """Every file below ``root``: relative name -> (size, mtime)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime)
            for p in sorted(root.rglob("*")) if p.is_file()}


def points(root: Path, vm: str) -> list[dict[str, Any]]:
    """``restore_point`` records of ``vm`` in the tree at ``root`` (every chain)."""
    out = io.StringIO()
    code = restore_main(["--json", "--backup-path", str(root), "--list-restore-points", vm], io.StringIO(""), out)
    recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code in (0, 9), recs
    return [r for r in recs if r["type"] == "restore_point"]


MiB = 1 << 20


def qemu_write(dom: Any, pattern: int, offset_mib: int, length: str = "1M") -> None:
    """Write into a running no-OS domain's vda through QEMU."""
    import libvirt_qemu

    libvirt_qemu.qemuMonitorCommand(
        dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P {pattern} {offset_mib}M {length}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def reference(disk: Path, dest: Path) -> Path:
    """The disk as it is now, raw (what a restore of the backup just made must equal)."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(dest)], check=True)
    return dest


def restore_point(chain_dir: Path, point: int, into: Path) -> Path:
    """Restore point ``point`` of the chain in ``chain_dir`` (a period or archive
    directory of any tree); the restored image."""
    out = io.StringIO()
    code = restore_main(["--json", "--vm", str(chain_dir), "--restore-point", str(point), "--restore-path", str(into),
                         "--skip-config"], io.StringIO(""), out)
    recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, recs
    (disk,) = [r["target"] for r in recs if r["type"] == "restore_disk"]
    return Path(disk)


def same_disk(image: Path, ref: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(image), str(ref)]).returncode == 0


def copiers(mark: str) -> list[str]:
    """Command lines of the rsync/rclone processes (and far-side servers)
    whose command line names ``mark``: the copiers of one test."""
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mark in cmd and ("rsync" in cmd or "rclone" in cmd or "--receive" in cmd):
            out.append(cmd)
    return out


def vm_with_points(nos_domain: Any, workdir: Path, refs_dir: Path, changes: Iterable[tuple[int, int, str]],
                   size: str = "32M") -> tuple[Any, Path, dict[str, Any], list[Path]]:
    """A running no-OS VM backed up once (a full), then once more after each
    ``(pattern, offset MiB, length)`` write (incrementals): the domain, the
    backup root, the full's ``backup`` record and the disk as it was at each
    point (raw)."""
    from backup_helpers import backup_ok

    nd = nos_domain(1, size=size, writes=[(0x11, 0, MiB)])
    root = workdir / "backups"
    root.mkdir()
    first = backup_ok(root, nd.name)
    refs = [reference(nd.disks[0], refs_dir / "p0.raw")]
    for n, (pattern, offset, length) in enumerate(changes, 1):
        qemu_write(nd.dom, pattern, offset, length)
        assert backup_ok(root, nd.name)["action"] == "inc"
        refs.append(reference(nd.disks[0], refs_dir / f"p{n}.raw"))
    return nd, root, first, refs
