"""vmbk-status: did last night work, and can each VM be restored?

One ``status`` record per VM from the tree (the truth: restore points,
chains, bytes, the lock) and the catalogue (the history: last success and
attempt, replication, restores, drills), which is optional: with the tree
alone the history fields are null.

``tree.py``: a VM's tree as status sees it (chains with their health, by
the listing's rule in `vmbk.tree.points`); ``history.py``: every
catalogue query, read-only; ``check.py``: the pure verdict (ok, stale,
broken, missing, excluded) and the problems ``--stale`` reports;
``record.py``: the ``status``, ``session_history`` and
``restore_history`` records; ``metrics.py``: the Prometheus textfile;
``run.py``: the command's work.
"""
