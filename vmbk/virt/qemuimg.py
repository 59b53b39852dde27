"""`qemu-img info` of a disk image, as the planner and backup need it.

``--force-share`` (-U) lets us read the header of an image a running QEMU
holds locked; the answer may be a moment stale, which is fine for sizes and
bitmap names (the backup itself reads through the backup job).
"""

from __future__ import annotations

import subprocess
from typing import Any

import orjson

from vmbk.errors import DependencyError, ToolError

TIMEOUT = 30


def info(path: str, *, fmt: str | None = None, force_share: bool = True) -> dict[str, Any]:
    argv = ["qemu-img", "info", "--output=json"]
    if force_share:
        argv.append("--force-share")
    if fmt:
        argv += ["-f", fmt]
    argv += ["--", path]
    try:
        r = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        raise DependencyError("qemu-img is not installed (apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"qemu-img info {path}: no answer in {TIMEOUT} s") from None
    if r.returncode != 0:
        msg = r.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ToolError(f"qemu-img info {path}: {msg[-1] if msg else 'failed'}")
    data: dict[str, Any] = orjson.loads(r.stdout)
    return data


def image_facts(data: dict[str, Any]) -> dict[str, Any]:
    """The facts of one `info` answer that decide how a disk is backed up.

    Checkpoints need persistent dirty bitmaps, which need qcow2 v3
    (``compat: 1.1``); raw images cannot carry them.
    """
    fmt = data.get("format")
    specific = (data.get("format-specific") or {}).get("data") or {}
    bitmaps = [
        {"name": b.get("name"), "flags": list(b.get("flags") or []), "granularity": b.get("granularity")}
        for b in specific.get("bitmaps") or []
    ]
    return {
        "image_format": fmt,
        "compat": specific.get("compat"),
        "checkpoint_capable": fmt == "qcow2" and specific.get("compat") == "1.1",
        "bitmaps": bitmaps,
        "cluster_size": data.get("cluster-size"),
        "backing_file": data.get("backing-filename"),
    }
