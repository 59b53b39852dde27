"""Fault injection (issue #11, "Proof"): kill -9 of vmbk-backup at many points.

One no-OS domain (its disk changes only when the test writes to it, through
QEMU's own block layer with HMP ``qemu-io``), the daily policy steered with
``--now``: the first run of a day is a full, the next ones incrementals.
48 rounds: 20 days with one round (a full), 4 days with 7 (a full, then 6
incrementals).  Each round writes something new, starts ``vmbk-backup``
as a process and SIGKILLs it at a point chosen in turn from

* ``marker``    -- the hold marker appears (just before the pause),
* ``suspended`` -- libvirt's SUSPENDED lifecycle event (the domain is held),
* ``scratch``   -- libvirt made the job's scratch file (inside ``backupBegin``),
* ``job``       -- libvirt reports the backup job (``backupBegin`` ran),
* ``resumed``   -- libvirt's RESUMED event (the transfer begins),
* ``bytes``     -- a random number of bytes of the ``.data.partial`` are on disk,
* ``stream``    -- the stream is renamed into place (before the side files
  and the ``.cpt``, the point's commit),
* ``delay``     -- a random delay after the start,

half of the days with LZ4-HC compression (a slower transfer).  After each
kill: the domain runs again within seconds (the guard) and has no marker;
the next run succeeds; then no libvirt job, no marker, no ``.partial``
file and no guard is left.  At the end every restore point that
``vmbk-restore --list-restore-points`` lists -- points made by killed runs
that got that far included -- restores byte-exact (``qemu-img compare``)
against the disk as it was when that point was made (the disk is copied
after each write, when nothing writes to it until the next one).

Seeded (VMBK_KILL_SEED) so a failure can be replayed; the seed is printed.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import subprocess
import time
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest
from backup_helpers import backup_ok, run_restore
from kill_helpers import (
    Lifecycle,
    allocated,
    job_started,
    kill_on_event,
    kill_when,
    marker_of,
    scratch_files,
    spawn_backup,
    wait_no_job,
    wait_released,
)

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
FIRST_DAY = _dt.datetime(2026, 3, 2, 1, 30, tzinfo=_dt.UTC)
FULL_DAYS = 20  # a day (a new period) with one killed run: a full
INC_DAYS = 4  # a day with a killed full, then INCS_PER_DAY killed incrementals
INCS_PER_DAY = 6  # 24 killed fulls, 24 killed incrementals
TRIGGERS = ("marker", "suspended", "scratch", "job", "resumed", "bytes", "stream", "delay")
VDA = "/machine/peripheral/virtio-disk0/virtio-backend"


def hmp_io(dom: libvirt.virDomain, command: str) -> None:
    libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {VDA} "{command}"',
                                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def guards_of(uuid: str) -> list[int]:
    """Guard processes whose marker is this domain's (others' tests run guards too)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"vmbk.virt.guard" in cmdline and uuid.encode() in cmdline:
            found.append(int(proc.name))
    return found


def test_sigkill_at_four_dozen_points_of_full_and_incremental_backups(nos_domain, vm_workdir, tmp_path, monkeypatch):
    seed = int(os.environ.get("VMBK_KILL_SEED", "1111"))
    rng = random.Random(seed)
    print(f"VMBK_KILL_SEED={seed}")
    nd = nos_domain(1, size="64M", writes=[(0x21, 0, 12 * MiB), (0x22, 40 * MiB, 4 * MiB)])
    uuid = nd.dom.UUIDString()
    root = vm_workdir / "backups"
    root.mkdir()
    vm_dir = root / nd.name
    refs_dir = vm_workdir / "refs"
    refs_dir.mkdir()
    configs = {}
    for kind, extra in (("plain", ""), ("lz4", 'compression = "lz4"\ncompression_level = 9\n')):
        configs[kind] = tmp_path / f"etc-{kind}"
        configs[kind].mkdir()
        (configs[kind] / "default.toml").write_text(f'policy = "daily"\n{extra}')

    refs: list[Path] = []  # version -> the disk as it was
    version_of: dict[int, int] = {}  # inode of a .data file -> the version it holds
    t_start = time.monotonic()

    def new_version(n: int, trigger: str) -> None:
        if trigger == "bytes":  # something to be in the middle of
            hmp_io(nd.dom, f"write -P {n % 250 + 1} {rng.randrange(16, 32) * MiB} {8 * MiB}")
        if n > 0:
            for k in range(rng.randint(1, 3)):
                offset = rng.randrange(0, 62) * MiB + rng.choice((0, 4096, 65536))
                length = rng.choice((64 << 10, MiB, 2 * MiB))
                hmp_io(nd.dom, f"write -P {(n * 7 + k) % 250 + 1} {offset} {length}")
            if rng.random() < 0.3:  # a range that becomes zero again
                hmp_io(nd.dom, f"write -z {rng.randrange(0, 12) * MiB} {MiB}")
        hmp_io(nd.dom, "flush")  # what the reference reads is on the file
        ref = refs_dir / f"v{n}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(nd.disks[0]), str(ref)],
                       check=True, capture_output=True)
        refs.append(ref)

    def map_files(version: int) -> None:
        """Every stream file not seen before holds ``version`` (nothing was written since)."""
        present = {f.stat().st_ino: f for f in vm_dir.rglob("*.data")}
        for ino in list(version_of):
            if ino not in present:
                del version_of[ino]  # removed by the self-healing: its inode may come back
        for ino in present:
            version_of.setdefault(ino, version)

    def partial_bytes() -> int:  # the chains being written (archives are under .archives: not matched)
        return allocated(vm_dir.glob("*/*.data.partial"))

    def streams() -> set[Path]:
        try:
            return set(vm_dir.glob("*/*.data"))
        except OSError:  # a chain archived under our feet
            return set()

    # (day, round): round 0 of a day is a full (a new period), the others incrementals
    schedule = [(d, 0) for d in range(FULL_DAYS)] + [
        (FULL_DAYS + d, r) for d in range(INC_DAYS) for r in range(1 + INCS_PER_DAY)]
    kills = {"full": 0, "inc": 0}
    with Lifecycle(uuid) as lc:
        for i, (day, r) in enumerate(schedule):
            now = (FIRST_DAY + _dt.timedelta(days=day)).isoformat()
            lz4 = day % 2 == 1
            config = configs["lz4" if lz4 else "plain"]
            monkeypatch.setenv("VMBK_CONFIG_DIR", str(config))
            n = len(refs)
            trigger = TRIGGERS[i % len(TRIGGERS)]
            new_version(n, trigger)
            before, scratches = streams(), scratch_files()
            p = spawn_backup(root, nd.name, tmp_path / f"run{n}", "--now", now, config_dir=config)
            t0 = time.monotonic()
            if trigger in ("suspended", "resumed"):
                event = libvirt.VIR_DOMAIN_EVENT_SUSPENDED if trigger == "suspended" else \
                    libvirt.VIR_DOMAIN_EVENT_RESUMED
                flag = kill_on_event(lc, p, event)
                p.wait(120)
                lc.handler = None
                killed = flag.is_set()
            elif trigger == "scratch":
                killed = kill_when(p, lambda scratches=scratches: bool(scratch_files() - scratches))
            elif trigger == "marker":
                killed = kill_when(p, marker_of(nd.dom).exists)
            elif trigger == "job":
                killed = kill_when(p, lambda: job_started(nd.dom))
            elif trigger == "bytes":
                threshold = rng.randint(1, 16 << 10 if lz4 else 2 * MiB)  # lz4: the pattern shrinks ~250x
                killed = kill_when(p, lambda threshold=threshold: partial_bytes() >= threshold)
            elif trigger == "stream":
                killed = kill_when(p, lambda before=before: bool(streams() - before))
            else:
                delay = rng.uniform(0.1, 0.5)
                killed = kill_when(p, lambda t0=t0, delay=delay: time.monotonic() - t0 >= delay)
            died_after = time.monotonic() - t0
            if not killed:
                assert p.returncode == 0, (tmp_path / f"run{n}.err").read_text()
            kills["inc" if r else "full"] += killed
            healed_in = wait_released(nd.dom, timeout=10)
            rec = backup_ok(root, nd.name, "--now", now)
            job_gone_in = wait_no_job(nd.dom)
            assert not marker_of(nd.dom).exists()
            assert not list(root.rglob("*.partial")), f"round {n}: {list(root.rglob('*.partial'))}"
            deadline = time.monotonic() + 10
            while guards_of(uuid):
                assert time.monotonic() < deadline, f"round {n}: guard left: {guards_of(uuid)}"
                time.sleep(0.05)
            map_files(n)
            print(f"v{n:<2} day {day:2} {'inc ' if r else 'full'} {'lz4  ' if lz4 else 'plain'} {trigger:9s} "
                       f"{'killed' if killed else 'ended '} after {died_after:4.2f} s, running {healed_in:4.2f} s "
                       f"later; next: {rec['action']} {rec['checkpoint']} ({rec['consistency']}), "
                       f"job gone {job_gone_in:.2f} s after, {[e['event'] for e in rec['events']]}", flush=True)
    backups_done = time.monotonic() - t_start
    assert kills["full"] >= 20 and kills["inc"] >= 20, f"killed only {kills} of {len(refs)} runs"

    code, recs = run_restore("--backup-path", str(root), "--list-restore-points", nd.name)
    assert code == 0, recs
    chains = [r for r in recs if r["type"] == "chain"]
    points = [r for r in recs if r["type"] == "restore_point"]
    assert len(chains) >= FULL_DAYS + INC_DAYS and len(points) >= len(refs)
    # A run killed after its stream was renamed into place but before the .cpt
    # (the commit) leaves a point that did not finish; the next run archives
    # that chain and starts a new one (the planner's self-healing).  Such a
    # point -- the last of an archived chain -- is listed as incomplete, its
    # chain with a warning, and nothing else is.
    last = {}
    for p in points:
        last[p["chain"]] = max(last.get(p["chain"], 0), p["index"])
    unfinished = [p for p in points if not p["complete"]]
    assert [(p["chain"], p["index"], p["problems"]) for p in unfinished
            if not p["archived"] or p["index"] != last[p["chain"]]
            or not all("did not finish" in x for x in p["problems"])] == []
    unfinished_chain = ("does not match the data files", "the chain has no checkpoint list")
    assert [(c["chain"], c["warnings"]) for c in chains if not c["complete"] and not (
        c["archived"] and all(any(u in w for u in unfinished_chain) for w in c["warnings"]))] == []
    for i, point in enumerate(points):
        chain = Path(point["path"])
        data = chain / ("vda.full.data" if point["index"] == 0 else f"vda.inc.{point['checkpoint']}.data")
        version = version_of[data.stat().st_ino]
        where = ["--vm", str(chain)] if point["archived"] else ["--vm", nd.name, "--period", point["period"]]
        out = tmp_path / f"restored{i}"
        forensic = [] if point["complete"] else ["--include-incomplete"]
        code, recs = run_restore("--backup-path", str(root), *where, "--restore-point", str(point["index"]),
                                 "--restore-path", str(out), "--skip-config", *forensic)
        assert code == 0, recs
        (image,) = recs[-1]["files"]
        same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image, str(refs[version])],
                              check=False).returncode == 0
        assert same, f"{point['chain']} point {point['index']} does not restore to v{version}"
        Path(image).unlink()
    print(f"{kills} kills in {len(refs)} rounds, {backups_done:.0f} s; {len(points)} restore points "
          f"({len(unfinished)} unfinished) in {len(chains)} chains restored exactly; "
          f"{time.monotonic() - t_start:.0f} s in all")
