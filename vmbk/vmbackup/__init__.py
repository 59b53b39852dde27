"""What vmbk shares with vmbackup/vmrestore on one backup tree (issue #14).

A site moves from vmbackup to vmbk (and may move back) on the same tree.
The data files, checkpoints and locks are common already; this package
holds the rest, read from the real tools (for facts, not code):

``markers``   the state files vmbackup reads before it decides full or
              incremental (``.full-backup-month``), the ``config/`` domain
              XML vmrestore takes a clone's names from, ``.tpm-backup-marker``,
              and ``chain-manifest.json`` kept up to date;
``db``        vmbackup's catalogue ``_state/vmbackup.db``, read-only, its
              schema detected (sessions, VM backups, chain health);
``importer``  ``vmbk-status --import-vmbackup``: its VM backups into
              vmbk's catalogue, once each.
"""
