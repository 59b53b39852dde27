"""vmbk.stream.atomic: a kill at every step leaves no data file without the .chksum that describes it.

Each case forks a child that writes a stream with `write_stream_atomic`
and dies (``os._exit``, no cleanup runs, as with SIGKILL) at one step of
the commit: before the ``.chksum`` is written, before each rename, after
the last.  The parent then checks the directory as every reader sees it.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from vmbk.stream import StreamMeta, atomic, write_stream_atomic

STEPS = ("write_checksum_file", "rename", "rename")


def _write_and_die_at(path: Path, step: int) -> None:
    """In a child: write ``path``; ``os._exit`` just before call ``step`` of STEPS (never: the end)."""
    calls = {"n": 0}

    def dying(real):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            if calls["n"] == step:
                os._exit(0)
            calls["n"] += 1
            return real(*args, **kwargs)
        return wrapper

    pid = os.fork()
    if pid == 0:
        try:
            atomic.write_checksum_file = dying(atomic.write_checksum_file)  # type: ignore[method-assign]
            atomic.os.rename = dying(os.rename)  # type: ignore[assignment]
            meta = StreamMeta(virtual_size=1 << 20, data_size=4096, disk_name="vda")
            with write_stream_atomic(path, meta, fsync=False) as w:
                w.write_data(8192, os.urandom(4096))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("step", range(len(STEPS) + 1))
@pytest.mark.parametrize("older", [False, True], ids=["new", "rewritten"])
def test_a_kill_at_any_step_never_leaves_data_without_its_checksum(tmp_path: Path, step: int, older: bool) -> None:
    path = tmp_path / "vda.inc.virtnbdbackup.3.data"
    if older:  # a file of the same name, with its checksum, is written again
        old = b"an older stream"
        path.write_bytes(old)
        Path(f"{path}.chksum").write_text(str(zlib.adler32(old)))
    _write_and_die_at(path, step)
    names = sorted(os.listdir(tmp_path))
    data = path.read_bytes() if path.exists() else None
    chksum = Path(f"{path}.chksum").read_text() if Path(f"{path}.chksum").exists() else None
    if data is not None:  # the data file never exists without a .chksum
        assert chksum is not None, names
        if not older or step == len(STEPS):  # new data: its own checksum, always
            assert chksum == str(zlib.adler32(data)), names
        # an older file and the new checksum disagree: a mismatch, reported, never silent
    if step == len(STEPS):
        assert names == [path.name, f"{path.name}.chksum"]
    else:  # interrupted: the .partial says so
        assert f"{path.name}.partial" in names
