"""Which destinations a run uses, in which order, through which transport.

The order (``[replicate] order``, the manual's ``REPLICATION_ORDER``):
``config``: one after another as ``[[replication]]`` lists them;
``local_first`` / ``cloud_first``: the rsync destinations (local, ssh)
before the rclone ones or after; ``simultaneous``: the two groups at the
same time, each in its own order.  A run is a list of *lanes*: lanes run
side by side, the destinations of a lane one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmbk.errors import ConfigError
from vmbk.replicate.appendonly import AppendOnlyTransport
from vmbk.replicate.encrypt import EncryptingTransport
from vmbk.replicate.local import LocalTransport
from vmbk.replicate.rclone import RcloneTransport
from vmbk.replicate.ssh import SshTransport
from vmbk.replicate.transport import Transport
from vmbk.settings import Config, Replication


def open_transport(dest: Replication, workdir: Path, *, identities: Sequence[bytes] = ()) -> Transport:
    """The destination's transport; an encrypted one wrapped (`vmbk.replicate.encrypt`)."""
    inner = _plain(dest, workdir)
    if dest.encrypt is None:
        return inner
    return EncryptingTransport(inner, dest, workdir, identities=identities)


def _plain(dest: Replication, workdir: Path) -> Transport:
    if dest.transport == "local":
        return LocalTransport(dest, workdir)
    if dest.transport == "ssh":
        if dest.sync_mode == "append-only":
            return AppendOnlyTransport(dest, workdir)
        return SshTransport(dest, workdir)
    if dest.transport == "rclone":
        return RcloneTransport(dest, workdir)
    raise ConfigError(f"destination {dest.name}: unknown transport {dest.transport!r}")


def choose(cfg: Config, name: str | None, *, writing: bool) -> list[Replication]:
    """``--dest NAME`` or every enabled destination.

    A disabled destination is written only when enabled; it may be read
    (verify, pull) by name: the disaster-recovery host's configuration
    need not switch it on.
    """
    if name is None:
        return [d for d in cfg.replication if d.enabled]
    for d in cfg.replication:
        if d.name == name:
            if writing and not d.enabled:
                raise ConfigError(f"destination {name!r} is disabled (enabled = false in {cfg.source or 'the config'})")
            return [d]
    known = ", ".join(d.name for d in cfg.replication) or "none configured"
    raise ConfigError(f"no replication destination {name!r} (known: {known})")


def lanes(dests: list[Replication], order: str) -> list[list[Replication]]:
    local = [d for d in dests if not d.is_cloud]
    cloud = [d for d in dests if d.is_cloud]
    if order == "local_first":
        return [local + cloud]
    if order == "cloud_first":
        return [cloud + local]
    if order == "simultaneous":
        return [lane for lane in (local, cloud) if lane]
    return [dests]
