"""vmbk-drill: prove that backups restore and boot, by restoring them into throwaway VMs.

A point is restored as a clone into a scratch directory (the restore
library: `vmbk.restore`), started isolated, checked, pictured, recorded
and removed, the production VM never touched.  One module per concern:

``points``      which points: the one a backup just made, latest, random,
                an index, a date, and a random sample of older ones;
``one``         one drill, start to end (the order, and why);
``checks``      the checks, their verdicts and the level reached;
``isolate``     the throwaway VM's domain XML, cut off from what it could reach;
``network``     the isolated network it is attached to;
``guest``       its agent and serial console;
``filesystems`` partition tables and file systems, for a guest that says nothing;
``picture``     its screenshot (PNG) and console tail under ``_state/drills/``;
``leftovers``   the marker of everything a drill creates, and the sweep that
                removes what a killed one left;
``history``     its catalogue rows; ``run`` the stage.
"""
