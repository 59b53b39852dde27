"""vmbk.heap: glibc's heap thresholds are set once, harmlessly."""

import platform

from vmbk.heap import keep_freed_memory


def test_keep_freed_memory_is_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if platform.libc_ver()[0] == "glibc":
        assert first is True
    blocks = [bytes(600 * 1024) for _ in range(8)]  # malloc still works, above and below the threshold
    assert sum(map(len, blocks)) == 8 * 600 * 1024 and len(bytes(8 << 20)) == 8 << 20
