"""vmbk-restore: list, verify and restore what a backup tree holds.

The tree is the only source of truth (DESIGN, "On-disk layout"): nothing
here needs the catalogue, and nothing here writes into the backup tree
(vmrestore guide, section 3: "read-only with respect to your backup
data").  One module per concern:

``source``   ``--vm NAME`` or ``--vm /path`` -> the VM's scanned tree;
           its restore points and what makes one incomplete come from
           `vmbk.tree.points` (shared with rotate and status);
``select``   which chain, point and disks a restore uses;
``listing``  ``--list`` and ``--list-restore-points`` records;
``verify``   ``--verify`` and ``--dump`` records;
``preflight`` names, safety checks and free space, before anything is written;
``image``    one disk: merged chain -> qcow2 (or raw), checked; with
           `vmbk.stream.chainread` (the chain's non-zero clusters in
           disk order), ``qcow2`` (the format writer) and ``checker``
           (``.chksum`` checked alongside);
``vmconfig`` the domain XML and NVRAM the backup kept for a point;
``domainxml`` the XML to define: same identity (DR) or a new one (clone);
``define``   the VM of that name in libvirt: may it be replaced, define;
``livedisks`` which files defined domains use (collision checks);
``report``   the records of a restore; ``history`` its catalogue row;
``run``      the orchestration of one restore: lock, check, write, commit, define.
``remote``   onto another host (``--connect qemu+ssh://``): the preflight of its
           files, each image streamed over ssh as it is written, commit and
           TPM state there;
``crosshost`` ``hostcheck`` ``remap``  the target host's preflight and the remaps.

Instant access, without writing the point out (issue #15):

``serve``    ``--serve``: the point's disks as NBD exports (`vmbk.nbd.server`
           over `vmbk.stream.chainread`), checksums checked first;
``mount``    ``--mount DIR``: its file systems read-only, over ``blockdev``
           (nbdfuse, loop devices, mount) and ``partitions`` (MBR, GPT);
``instant``  ``--instant``: the VM on qcow2 overlays backed by the export,
           then moved to local disks under it (``move``: block copy, pivot);
``marker``   what a session creates, named before it exists, and the sweep.
"""
