"""vmbk-rotate: retention and on-demand cleanup of the backup tree.

The decisions are pure (`vmbk.policy.retention`); this package gathers
their facts and carries them out, one module per concern:

``facts``   a scanned tree (and the catalogue's last backups) -> `TreeFacts`;
``delete``  one removal at a time, crash-safe, and what a killed run left;
``history`` the catalogue: ages read, every decision and deletion written;
``run``     one VM: lock, finish leftovers, decide, delete, ``rotate`` record;
            the stage over ``backup`` records and ``--vm``/``--all``;
``prune``   ``--prune``: the listing, confirmation, the targets.
"""
