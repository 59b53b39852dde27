"""Discovery: one `vm` record per libvirt domain, with the policy that applies.

The libvirt facts come from `vmbk.virt.domain`; this module adds what the
configuration says (policy, exclusion) and turns unknown names into
`error` records, so a typo in ``--vm`` fails that name, not the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from vmbk import records
from vmbk.config import Config
from vmbk.errors import VmbkError, VmError
from vmbk.virt.connection import LibvirtError, Link, libvirt_module
from vmbk.virt.domain import domain_facts

STAGE = "vmbk-discover"


def vm_record(facts: dict[str, Any], cfg: Config, session: str | None) -> records.Record:
    name = facts["name"]
    policy, policy_source = cfg.policy_for(name)
    reason = cfg.exclusion(name)
    return records.make(
        "vm",
        session,
        **facts,
        policy=policy,
        policy_source=policy_source,
        excluded=reason is not None,
        reason=reason,
        fstrim=cfg.fstrim_for(name),
        compression=cfg.compression_for(name),
    )


def discover(uri: str, cfg: Config, *, names: Sequence[str] = (), session: str | None = None) -> Iterator[records.Record]:
    """One ``vm`` record per domain (or per name), an ``error`` record per failure.

    A failure to read one domain fails that domain only; when libvirtd
    went away meanwhile, the next domain waits for it to come back
    (`vmbk.virt.connection.Link`).
    """
    libvirt = libvirt_module()
    # Read-write: guest-ping through the agent is refused on a read-only connection.
    link = Link(uri)
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
                facts = domain_facts(dom)
            except libvirt.libvirtError as e:
                if not names and e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                err = LibvirtError(f"cannot read the facts of VM {name!r}: {e.get_error_message()}", vm=name)
                yield records.error_record(err, stage=STAGE, session=session)
                continue
            yield vm_record(facts, cfg, session)
    finally:
        link.close()
