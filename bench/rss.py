"""Peak RSS of vmbk-backup on a VM with four disks (by hand, not a test).

    .venv/bin/python bench/rss.py [--data-mib 768] [--runs 2]

The issue's memory target is "peak RSS < 200 MiB for a 4-disk VM": the
disks of one VM are copied in parallel, each with its own NBD reader
(16 buffers of 512 KiB) and, compressed, up to 32 frames waiting for an
older one (`vmbk.backup.disk.COMPRESSED_WINDOW`).  This starts a no-OS
domain with four qcow2 disks of ``--data-mib`` MiB of data each (random
and log-like text, so lz4 has work), and runs the whole command --
``vmbk-backup --vm DOM`` full, uncompressed and with ``compression =
"lz4"`` -- under GNU time, ``--runs`` times each.  It prints every run
and checks the target.  Everything is removed at the end, as bench/run.py
does (it shares its lock, so the two never run at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # bench/run.py: measure, lock, libvirt
from run import MiB, measure

TARGET_MIB = 200
VENV_BIN = Path(sys.executable).parent


def make_disk(path: Path, data_mib: int) -> None:
    """A qcow2 with data_mib MiB of data: 2/3 random, 1/3 text, 1 GiB holes after."""
    raw = path.with_suffix(".raw")
    text = b"".join(b"2026-11-22 03:%02d:%02d host kernel: eth0 link up, 1000 Mbps full duplex\n" % (i // 60, i % 60)
                    for i in range(3600))
    with open(raw, "wb") as f:
        random_mib = data_mib * 2 // 3
        for _ in range(random_mib):
            f.write(os.urandom(MiB))
        for _ in range(data_mib - random_mib):
            f.write((text * (MiB // len(text) + 1))[:MiB])
        f.truncate((data_mib + 1024) * MiB)
    common.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()
    os.chmod(path, 0o644)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=768, help="MiB of data in each of the 4 disks (default 768)")
    ap.add_argument("--runs", type=int, default=2, help="runs of each case (default 2)")
    opts = ap.parse_args()
    _lock = common.start_session("lock", "bench/rss.py")  # run.py's lock: never beside it
    import libvirt

    from guest.domain import nos_domain_xml, remove_domain, start_domain

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = common.open_libvirt()
    work = Path(tempfile.mkdtemp(prefix="work-rss-", dir=common.BENCH_DIR))
    os.chmod(work, 0o755)
    out = Path(tempfile.mkdtemp(prefix="vmbk-bench-rss-", dir=common.default_out_base()))
    dom = None
    peaks: dict[str, list[int]] = {"none": [], "lz4": []}
    try:
        disks = [work / f"disk{i}.qcow2" for i in range(4)]
        for d in disks:
            make_disk(d, opts.data_mib)
        dom = start_domain(conn, nos_domain_xml(f"{common.DOMAIN_PREFIX}rss-{uuid.uuid4().hex[:8]}", disks))
        print(f"domain {dom.name()}: 4 disks of {opts.data_mib} MiB data each", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "VMBK_INSTANCE")}
        for compression in ("none", "lz4"):
            cfg = work / f"config-{compression}"
            cfg.mkdir()
            (cfg / "default.toml").write_text(f'compression = "{compression}"\n')
            env_c = {**env, "VMBK_CONFIG_DIR": str(cfg), "PYTHONPYCACHEPREFIX": str(work / "pycache")}
            for i in range(opts.runs):
                for cp in reversed(dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)):
                    cp.delete(0)
                root = out / f"{compression}-{i}"
                root.mkdir()
                p = measure([str(VENV_BIN / "vmbk-backup"), "--vm", dom.name(), "--backup-path", str(root),
                             "--json"], env=env_c)
                rec = next(json.loads(x) for x in p.stdout.splitlines() if '"type":"backup"' in x.replace(" ", ""))
                if rec.get("outcome") != "ok" or len(rec.get("disks") or []) != 4:
                    raise RuntimeError(f"vmbk-backup did not back up 4 disks: {p.stdout[-2000:]}{p.stderr[-2000:]}")
                peaks[compression].append(p.rss)
                print(f"  vmbk-backup full, compression {compression:4s}  {p.seconds:6.2f} s  "
                      f"CPU {p.cpu:5.2f} s  peak RSS {p.rss / MiB:5.1f} MiB", flush=True)
                shutil.rmtree(root)
    finally:
        if dom is not None:
            with contextlib.suppress(Exception):
                remove_domain(dom)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        conn.close()
    worst = max(max(v) for v in peaks.values())
    verdict = "PASS" if worst < TARGET_MIB * MiB else "FAIL"
    print(f"{verdict}  peak RSS of vmbk-backup, 4 disks: {worst / MiB:.1f} MiB (target < {TARGET_MIB} MiB)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
