"""Manifests: what each restore point holds, hashed and signed (issue #16).

``keys``   the host's Ed25519 signing key (``/etc/vmbk/keys/``, created on
           first use, 0600) and the public keys it trusts;
``sign``   the manifest file: one JSON line (the body) and one signature
           line, Ed25519 over the body's bytes;
``write``  the manifest of a point as vmbk-backup writes it, just before
           the ``.cpt`` that commits the point;
``check``  a chain's manifests against its files: signatures, trusted
           keys, the hash chain over the points, sizes and SHA-256s --
           what `vmbk.tree.points` (the one place that says "complete")
           and ``vmbk-restore --verify`` report.

man/vmbk-format.5 describes the file for an independent reader.
"""
