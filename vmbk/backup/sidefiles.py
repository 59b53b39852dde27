"""The files beside the streams that make a backup restorable.

Names follow virtnbdbackup (read for facts) and are spelled in
`vmbk.tree.names`: ``vmconfig.<ident>.xml``, ``checkpoints/<checkpoint>.xml``,
``<vm>.cpt`` (JSON list of checkpoint names), ``<dev>.<ident>.qcow.json``
(``qemu-img info``), the NVRAM file as ``<basename>.<ident>``.  TPM state
goes to ``tpm-state/`` (root only, 0600, no SGID: the backup group must
not read TPM keys) and is replaced only when it changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import orjson

from vmbk.errors import StorageError
from vmbk.fsutil import PARTIAL, SECRET_FILE_MODE, ensure_dir, ensure_secret_dir, write_file_atomic
from vmbk.tree import names
from vmbk.virt.hostfiles import LOCAL, HostFiles


def write_vmconfig(target_dir: Path, name: str, xml: str) -> Path:
    path = target_dir / names.vmconfig_name(name)
    write_file_atomic(path, xml.encode())
    return path


def write_checkpoint_xml(target_dir: Path, checkpoint: str, xml: str) -> Path:
    ensure_dir(target_dir / names.CHECKPOINTS)
    path = target_dir / names.checkpoint_xml_name(checkpoint)
    write_file_atomic(path, xml.encode())
    return path


def next_cpt(target_dir: Path, vm: str, checkpoint: str) -> tuple[Path, list[str], bytes]:
    """The ``.cpt`` with ``checkpoint`` appended: (path, list, bytes), not written yet."""
    path = target_dir / names.cpt_name(vm)
    listed: list[str] = []
    if path.exists():
        try:
            listed = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            raise StorageError(f"{path} is not a JSON list of checkpoints", vm=vm) from None
    if checkpoint not in listed:
        listed.append(checkpoint)
    return path, listed, orjson.dumps(listed)


def append_cpt(target_dir: Path, vm: str, checkpoint: str) -> Path:
    path, _, data = next_cpt(target_dir, vm, checkpoint)
    write_file_atomic(path, data)
    return path


def write_qemu_info(target_dir: Path, target: str, name: str, source: str, fmt: str | None,
                    files: HostFiles = LOCAL) -> Path:
    """``qemu-img info`` of ``source`` on the VM's host (``files``: here or over ssh)."""
    info: dict[str, Any] = files.disk_info(source, fmt)[1]
    path = target_dir / names.qemu_info_name(target, name)
    write_file_atomic(path, orjson.dumps(info, option=orjson.OPT_INDENT_2))
    return path


def copy_nvram(target_dir: Path, nvram: str, name: str, level: str, data: bytes | None = None) -> Path:
    """The NVRAM file saved as ``<basename>.<ident>``; ``data``: its bytes as read on the VM's host."""
    path = target_dir / names.nvram_name(os.path.basename(nvram), name, level)
    write_file_atomic(path, Path(nvram).read_bytes() if data is None else data)
    return path


def _tree_digest(root: Path) -> str:
    return _files_digest({str(p.relative_to(root)): p.read_bytes()
                          for p in sorted(root.rglob("*")) if p.is_file()})


def _files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        h.update(files[rel])
    return h.hexdigest()


def save_tpm_state(target_dir: Path, state_dir: Path | dict[str, bytes]) -> tuple[Path, bool]:
    """Copy swtpm state into ``tpm-state/``; (path, whether it changed).

    ``state_dir``: the state's directory here, or its files by relative
    path as read on the VM's host (`vmbk.virt.hostfiles`: a remote host's
    state comes over ssh).
    """
    state = state_dir if isinstance(state_dir, dict) else \
        {str(p.relative_to(state_dir)): p.read_bytes() for p in sorted(state_dir.rglob("*")) if p.is_file()}
    dest = target_dir / names.TPM_STATE
    if dest.exists() and _tree_digest(dest) == _files_digest(state):
        return dest, False
    tmp = target_dir / (names.TPM_STATE + PARTIAL)
    shutil.rmtree(tmp, ignore_errors=True)
    ensure_secret_dir(tmp)
    for rel, data in state.items():
        parts = Path(rel).parts
        if not parts or ".." in parts or Path(rel).is_absolute():
            continue
        for i in range(1, len(parts)):
            ensure_secret_dir(tmp.joinpath(*parts[:i]))
        fd = os.open(tmp / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, SECRET_FILE_MODE)
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
        os.chmod(tmp / rel, SECRET_FILE_MODE)
        if os.geteuid() == 0:
            os.chown(tmp / rel, 0, 0)
    old = target_dir / (names.TPM_STATE + ".old")
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest, True
