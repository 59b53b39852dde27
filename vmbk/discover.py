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
from vmbk.errors import VmError
from vmbk.virt.connection import LibvirtError, connection, libvirt_module
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
    libvirt = libvirt_module()
    # Read-write: guest-ping through the agent is refused on a read-only connection.
    with connection(uri) as conn:
        if names:
            for name in dict.fromkeys(names):
                try:
                    dom = conn.lookupByName(name)
                except libvirt.libvirtError:
                    err = VmError(f"VM {name!r} not found at {uri}", vm=name)
                    yield records.error_record(err, stage=STAGE, session=session)
                    continue
                yield vm_record(domain_facts(dom), cfg, session)
            return
        try:
            domains = conn.listAllDomains(0)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot list domains: {e.get_error_message()}") from None
        for dom in sorted(domains, key=lambda d: d.name()):
            try:
                yield vm_record(domain_facts(dom), cfg, session)
            except libvirt.libvirtError as e:
                # A domain undefined while we looked at it is not an error.
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                raise
