"""The ``.chksum`` of a disk's streams, checked while the disk is written.

The adler32 of every stream must be checked before a restore commits
anything (a flipped payload byte passes every structural check).  Checking
first and writing afterwards reads the chain twice in a row; on a 2-core
host the check runs as well in a thread beside the write, both reading
through the page cache (adler32 and ``readv`` release the GIL): a
4.25 GB chain (full + 3 incrementals) restores in 1.74 s instead of 2.16
(bench/restore.py).  The writer calls `SourceCheck.raise_if_failed`
between windows, so a bad stream stops it early, and waits for
`SourceCheck.result` before the image counts as built: nothing is
renamed into place before every checksum matched.  A stream whose
manifest gives its SHA-256 stream digest is checked against both on the
same read (`vmbk.stream.digest.file_digest`, its payloads hashed by a few
threads: a 3.5 GiB chain restores in 3.05-3.48 s instead of 3.77-3.84).  ``tolerate`` (``--force``)
names a stream that fails, as unchecked, and goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from vmbk.errors import VmbkError
from vmbk.stream import read_checksum_file, verify_checksum
from vmbk.stream.digest import file_digest
from vmbk.stream.format import StreamError

log = logging.getLogger("vmbk.restore")

BUFFER = 4 << 20


class Stopped(Exception):
    """The check was stopped before it finished (the restore failed or was interrupted)."""


class SourceCheck:
    """Checks ``paths`` against their ``.chksum`` files in a thread, started at once."""

    def __init__(self, paths: Iterable[Path], digests: Sequence[str | None] = (), *, tolerate: bool = False) -> None:
        paths = list(paths)
        self.expected = {p: d for p, d in zip(paths, digests, strict=False) if d}
        self.paths = list(dict.fromkeys(paths))
        self.tolerate = tolerate
        self.unchecked: list[Path] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmbk-chksum", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for path in self.paths:
                try:
                    if not self._one(path):
                        self.unchecked.append(path)
                except VmbkError as e:
                    if not self.tolerate:
                        raise
                    log.warning("--force: %s is restored unchecked: %s", path, e)
                    self.unchecked.append(path)
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 -- handed to the writer's thread
            self.error = e

    def _one(self, path: Path) -> bool:
        """Check one stream (StreamError when it fails); False: it has no ``.chksum``."""
        want = self.expected.get(path)
        if want is None:
            return verify_checksum(path, buffer_size=BUFFER, check=self._check_stop)
        digest, actual, _ = file_digest(path, check=self._check_stop, buffer_size=BUFFER)
        stored = read_checksum_file(path)
        if stored is not None and stored != actual:
            raise StreamError(path, 0, f"adler32 of the file is {actual}, its .chksum says {stored}")
        if digest != want:
            raise StreamError(path, 0, "its SHA-256 stream digest does not match its manifest")
        return stored is not None

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise Stopped

    def raise_if_failed(self) -> None:
        """Raise the check's error now if it has failed already."""
        if self.error is not None:
            raise self.error

    def result(self) -> list[Path]:
        """Wait for the check; the streams without a ``.chksum``, or its error."""
        self._thread.join()
        self.raise_if_failed()
        return self.unchecked

    def stop(self) -> None:
        """Stop the check (it ends within one buffer) and wait for it."""
        self._stop.set()
        self._thread.join()
