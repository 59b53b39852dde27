"""vmbk-report: the end of the pipe -- what the run did, for people and machines.

``summary.py``: the records of a run folded into the session summary
(vmbackup manual, "Session Summary": backed up per policy, excluded,
skipped, failed; per VM its action, consistency, duration, bytes, errors;
rotate and replicate outcomes; the backup file system's space; the
subject line) -- pure; ``text.py``: the summary as text (terminal, email,
ping body); ``history.py``: the catalogue's backups of the last days;
``charts.py``: inline SVG drawn from them; ``page.py``: the
self-contained HTML page; ``mail.py``: the email, by SMTP or sendmail;
``notify.py``: the dead-man's-switch ping and the webhook; ``run.py``:
the command's work, in the order that never lets a notification hide
the run's outcome.
"""
