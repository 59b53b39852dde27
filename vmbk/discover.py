"""Discovery: one `vm` record per libvirt domain, with the policy that applies.

The libvirt facts come from `vmbk.virt.domain`; this module adds what the
configuration says (policy, exclusion) and turns unknown names into
`error` records, so a typo in ``--vm`` fails that name, not the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from vmbk import records
from vmbk.config import Config, Host
from vmbk.errors import VmbkError, VmError
from vmbk.tree.scan import host_root, vm_dirs
from vmbk.virt.connection import LibvirtError, Link, libvirt_module
from vmbk.virt.domain import domain_facts
from vmbk.virt.remote import host_name, with_keyfile

STAGE = "vmbk-discover"


def vm_record(facts: dict[str, Any], cfg: Config, session: str | None, host: Host | None = None) -> records.Record:
    name = facts["name"]
    policy, policy_source = cfg.policy_for(name)
    reason = cfg.exclusion(name)
    where = {"host": host.name, "uri": host.uri} if host is not None else {}
    return records.make(
        "vm",
        session,
        **where,
        **facts,
        policy=policy,
        policy_source=policy_source,
        excluded=reason is not None,
        reason=reason,
        fstrim=cfg.fstrim_for(name),
        compression=cfg.compression_for(name),
        memory=cfg.memory_mode(name),
    )


def discover_hosts(hosts: Sequence[Host], cfg: Config, *, names: Sequence[str] = (),
                   session: str | None = None) -> Iterator[records.Record]:
    """`discover` on each host in turn (`vmbk.config.hosts_for`).

    A host that cannot be reached (ssh, libvirtd) is an ``error`` record
    per VM of it -- the names asked for, else those of its directory in
    the tree -- and the other hosts go on.  ``NAME`` in ``names`` is
    looked for on every host, ``HOST/NAME`` on that host only.
    """
    for host in hosts:
        wanted = [n.rpartition("/")[2] for n in names if "/" not in n or n.rpartition("/")[0] == host.name]
        if names and not wanted:
            continue
        try:
            link = Link(with_keyfile(host.uri, host.ssh_key))
        except LibvirtError as e:
            yield from _unreachable(host, cfg, wanted, str(e), session)
            continue
        yield from discover(link, cfg, names=wanted, session=session, host=host)


def _unreachable(host: Host, cfg: Config, names: Sequence[str], why: str,
                 session: str | None) -> Iterator[records.Record]:
    known: list[str | None] = list(names)
    if not known and cfg.backup_path is not None:
        root = host_root(cfg.backup_path, host.name, layered=cfg.host_level)
        with contextlib.suppress(VmbkError):
            known = [e.name for e in vm_dirs(root)] if root.is_dir() else []
    for vm in known or [None]:
        err = LibvirtError(f"host {host.name} ({host.uri}) cannot be reached: {why}", vm=vm)
        yield {**records.error_record(err, stage=STAGE, session=session), "host": host.name}


def discover(uri: str | Link, cfg: Config, *, names: Sequence[str] = (), session: str | None = None,
             host: Host | None = None) -> Iterator[records.Record]:
    """One ``vm`` record per domain (or per name), an ``error`` record per failure.

    A failure to read one domain fails that domain only; when libvirtd
    went away meanwhile, the next domain waits for it to come back
    (`vmbk.virt.connection.Link`).  ``host``: the configured host ``uri``
    is (its name goes into the records; its files are read over ssh when
    it is remote).
    """
    libvirt = libvirt_module()
    # Read-write: guest-ping through the agent is refused on a read-only connection.
    link = uri if isinstance(uri, Link) else Link(uri)
    uri = link.uri
    if host is None:
        host = Host(name=host_name(uri), uri=uri)
    try:
        if names:
            todo: list[Any] = list(dict.fromkeys(names))
        else:
            try:
                todo = sorted(d.name() for d in link.get().listAllDomains(0))
            except libvirt.libvirtError as e:
                raise LibvirtError(f"cannot list domains: {e.get_error_message()}") from None
        for name in todo:
            try:
                dom = link.get().lookupByName(name)
            except LibvirtError as e:
                yield records.error_record(LibvirtError(f"not discovered: {e}", vm=name), stage=STAGE, session=session)
                continue
            except libvirt.libvirtError as e:
                if not names and e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we looked: not an error
                err: VmbkError = (VmError(f"VM {name!r} not found at {uri}", vm=name)
                                  if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
                                  else LibvirtError(f"cannot look up VM {name!r}: {e.get_error_message()}", vm=name))
                yield records.error_record(err, stage=STAGE, session=session)
                continue
            try:
                facts = domain_facts(dom, files=link.files)
            except libvirt.libvirtError as e:
                if not names and e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                err = LibvirtError(f"cannot read the facts of VM {name!r}: {e.get_error_message()}", vm=name)
                yield records.error_record(err, stage=STAGE, session=session)
                continue
            yield vm_record(facts, cfg, session, host)
    finally:
        link.close()
