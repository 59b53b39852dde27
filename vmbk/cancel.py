"""Cooperative cancellation of work running in threads.

Python runs signal handlers in the main thread only.  When a stage runs
several VMs in worker threads and SIGINT/SIGTERM arrives, the main thread
sets a `Cancel` token; workers check it between chunks of work and raise
`Cancelled`, so each unwinds through its own ``finally`` blocks (thaw,
abort the job, remove partial files, delete the checkpoint, release the
lock) before the process exits with 128+N.
"""

from __future__ import annotations

import threading


class Cancelled(BaseException):
    """Raised in a worker when the run is being cancelled.

    A BaseException so that ``except Exception`` does not swallow it.
    """


class Cancel:
    """A cancel token; one with a ``parent`` is also set when the parent is.

    A VM's disk copies share a child of the run's token: the first failing
    disk cancels its siblings only, an interrupt cancels everything.
    """

    def __init__(self, parent: Cancel | None = None) -> None:
        self._event = threading.Event()
        self.parent = parent

    def set(self) -> None:
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set() or (self.parent is not None and self.parent.is_set)

    def check(self) -> None:
        if self.is_set:
            raise Cancelled()
