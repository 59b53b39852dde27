"""vmbk: backup and restore for libvirt/KVM virtual machines.

The package holds everything the ``vmbk-*`` commands share; see
docs/architecture.md for the map and the direction of dependencies.
"""

__version__ = "0.1.0"

#: Version of the JSON-lines record contract (``"v"`` on every record).
RECORD_VERSION = 1
