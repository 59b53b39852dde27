"""The replication planner: pure decisions over two listings (vmbk.replicate.plan).

Each case is a source tree and a replica as name -> (size, mtime), a sync
mode, and what must be done, in which order.  The order is the point:
a replica cut short anywhere must not show a point whose data is missing
or belongs to another chain.
"""

from __future__ import annotations

import pytest

from vmbk.replicate import files
from vmbk.replicate.files import COMMIT, CPT, DATA, SIDE, Entry
from vmbk.replicate.plan import plan_vm, removal_share

T = 1_700_000_000.0


def L(spec: dict[str, tuple[int, float]]) -> dict[str, Entry]:
    return {rel: Entry(size, T + t) for rel, (size, t) in spec.items()}


def chain(prefix: str, points: int, t: float = 0, size: int = 100,
          cpt: int | None = None) -> dict[str, tuple[int, float]]:
    """A chain's files under ``prefix`` (``web/202603``): ``points`` points; the .cpt lists ``cpt`` of them."""
    out = {f"{prefix}/vda.full.data": (size, t), f"{prefix}/vda.full.data.chksum": (10, t),
           f"{prefix}/checkpoints/virtnbdbackup.0.xml": (5, t), f"{prefix}/vmconfig.virtnbdbackup.0.xml": (7, t),
           f"{prefix}/vda.virtnbdbackup.0.qcow.json": (3, t)}
    for n in range(1, points):
        out |= {f"{prefix}/vda.inc.virtnbdbackup.{n}.data": (20 + n, t + n),
                f"{prefix}/vda.inc.virtnbdbackup.{n}.data.chksum": (10, t + n),
                f"{prefix}/checkpoints/virtnbdbackup.{n}.xml": (5, t + n),
                f"{prefix}/vmconfig.virtnbdbackup.{n}.xml": (7, t + n)}
    n = points if cpt is None else cpt
    out[f"{prefix}/web.cpt"] = (20 * n, t + n)
    return out


def archived(prefix: str, name: str, spec: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    root = f"{prefix}/.archives/{name}"
    return {root + rel[len(prefix):]: v for rel, v in spec.items()}


def test_phases_and_chain_directories():
    assert files.phase("web/202603/vda.full.data") == DATA
    assert files.phase("web/202603/vda.inc.virtnbdbackup.3.data.chksum") == DATA
    assert files.phase("web/202603/web.cpt") == CPT
    assert files.phase("web/202603/checkpoints/virtnbdbackup.1.xml") == COMMIT
    assert files.phase("web/vmconfig.copy.xml") == COMMIT
    assert files.phase("web/202603/tpm-state/tpm2/tpm2-00.permall") == SIDE
    assert files.phase("web/202603/OVMF_VARS.fd.virtnbdbackup.0") == SIDE
    assert files.phase("checkpoints/202603/vda.full.data") == DATA  # a VM named checkpoints
    assert files.chain_dir("web/202603/checkpoints/virtnbdbackup.1.xml") == "web/202603"
    assert files.chain_dir("web/202603/tpm-state/tpm2/f") == "web/202603"
    assert files.chain_dir("web/vda.full.data") == "web"
    assert files.chain_dir("web/.archives/chain-2026-03-01/checkpoints/x.xml") == "web/.archives/chain-2026-03-01"
    assert files.is_secret("web/202603/tpm-state/bitlocker-recovery-keys.txt")
    assert not files.is_secret("tpm-state/202603/vda.full.data")


def test_what_is_never_replicated():
    assert files.replicable("web/202603/vda.full.data")
    assert files.replicable("_state/vmbk.db")
    for rel in ("_state/locks/vmbackup-web.lock", "_state/vmbk.db-wal", "web/202603/vda.full.data.partial",
                "web/.deleting-202601/vda.full.data", "web/202603/.~tmp~/vda.full.data",
                ".vmbk-partial/web/202603/vda.full.data", "web/202603/tpm-state.partial/tpm2/f",
                "web/202603/tpm-state.old/tpm2/f", "lost+found/x"):
        assert not files.replicable(rel), rel


@pytest.mark.parametrize("scope, rel, inside", [
    ("everything", "web/20260301/vda.full.data", True),
    ("monthly", "web/202603/vda.full.data", True),
    ("monthly", "web/202603/.archives/chain-2026-03-09/vda.full.data", True),
    ("monthly", "web/2026-W10/vda.full.data", False),
    ("monthly", "web/vda.full.data", False),
    ("archives-only", "web/202603/.archives/chain-2026-03-09/vda.full.data", True),
    ("archives-only", "web/.archives/chain-2026-03-09/vda.full.data", True),
    ("archives-only", "web/202603/vda.full.data", False),
])
def test_scopes(scope, rel, inside):
    assert files.in_scope(rel, scope) is inside


def test_a_fresh_replica_gets_everything_data_first():
    src = L(chain("web/202603", 2))
    plan = plan_vm("web", src, {}, "mirror", 1.0)
    assert plan.new[DATA] == sorted(r for r in src if r.endswith((".data", ".chksum")))
    assert plan.new[SIDE] == ["web/202603/vda.virtnbdbackup.0.qcow.json"]
    assert plan.new[CPT] == ["web/202603/web.cpt"]  # alone, last
    assert plan.files == len(src) and plan.send_bytes == sum(e.size for e in src.values())
    assert not (plan.moves or plan.retract or plan.deletes or plan.updates[COMMIT])


def test_up_to_date_is_nothing_and_times_within_the_tolerance_are_the_same():
    src = L(chain("web/202603", 3))
    dst = {r: Entry(e.size, e.mtime + 0.4) for r, e in src.items()}
    plan = plan_vm("web", src, dst, "mirror", 1.0)
    assert plan.files == 0 and not plan.deletes and not plan.moves
    assert plan_vm("web", src, dst, "mirror", 0.001).files == len(src)  # a local replica keeps nanoseconds


def test_an_incremental_moves_only_its_files_and_the_longer_cpt():
    dst = L(chain("web/202603", 2))
    src = L(chain("web/202603", 3))
    plan = plan_vm("web", src, dst, "mirror", 1.0)
    assert plan.new[DATA] == ["web/202603/vda.inc.virtnbdbackup.2.data",
                              "web/202603/vda.inc.virtnbdbackup.2.data.chksum"]
    assert plan.new[COMMIT] == ["web/202603/checkpoints/virtnbdbackup.2.xml", "web/202603/vmconfig.virtnbdbackup.2.xml"]
    assert plan.updates[CPT] == ["web/202603/web.cpt"]
    assert not plan.deletes and not plan.retract


def test_a_chain_archived_at_the_source_is_renamed_and_the_new_one_copied():
    old = chain("web/202603", 3)
    dst = L(old)
    src = L(archived("web/202603", "chain-2026-03-09", old) | chain("web/202603", 1, t=100, size=300))
    plan = plan_vm("web", src, dst, "mirror", 1.0)
    moved = dict(plan.moves)
    assert len(moved) == len(old) and not plan.retract and not plan.deletes
    assert moved["web/202603/web.cpt"] == "web/202603/.archives/chain-2026-03-09/web.cpt"
    # the archive gets its data before its .cpt; the old place loses its data first
    order = [a for a, _ in plan.moves]
    assert order.index("web/202603/vda.full.data") < order.index("web/202603/web.cpt")
    assert plan.new[DATA] == ["web/202603/vda.full.data", "web/202603/vda.full.data.chksum"]
    assert plan.files == 6  # the new chain only: nothing of the archive is copied
    assert "web/202603/checkpoints" not in plan.emptied  # the new chain has one


def test_a_replica_behind_its_source_retracts_the_old_cpt_before_the_new_chain_lands():
    """The replica had points 0-1; the source then made point 2, archived the
    chain and began a new one.  The old .cpt (two points) matches no file of
    the archive: it is deleted first, so a cut here cannot show the new full
    with an old incremental as a complete point."""
    dst = L(chain("web/202603", 2))
    src = L(archived("web/202603", "chain-2026-03-09", chain("web/202603", 3)) | chain("web/202603", 1, 100, 300))
    plan = plan_vm("web", src, dst, "mirror", 1.0)
    assert plan.retract == ["web/202603/web.cpt"]
    assert {a for a, _ in plan.moves} == set(dst) - {"web/202603/web.cpt"}
    assert "web/202603/.archives/chain-2026-03-09/vda.inc.virtnbdbackup.2.data" in plan.new[DATA]
    assert plan.new[CPT] == ["web/202603/.archives/chain-2026-03-09/web.cpt", "web/202603/web.cpt"]


def test_mirror_deletes_an_old_chain_no_archive_accounts_for_before_copying():
    dst = L(chain("web/202603", 3))
    src = L(chain("web/202603", 1, t=100, size=300))  # the archive was already rotated away
    plan = plan_vm("web", src, dst, "mirror", 1.0)
    assert plan.retract[0] == "web/202603/web.cpt"
    assert plan.retract.index("web/202603/vmconfig.virtnbdbackup.2.xml") < plan.retract.index(
        "web/202603/vda.inc.virtnbdbackup.2.data")
    assert "web/202603/vda.full.data" in plan.retract and "web/202603/vda.inc.virtnbdbackup.1.data" in plan.retract
    assert plan.new[DATA] == ["web/202603/vda.full.data", "web/202603/vda.full.data.chksum"]


@pytest.mark.parametrize("mode", ["accumulate", "append-only"])
def test_a_mode_that_never_deletes_blocks_a_directory_holding_an_unaccounted_chain(mode):
    dst = L(chain("web/202603", 3) | chain("web/202602", 2))
    src = L(chain("web/202603", 1, t=100, size=300) | chain("web/202602", 3))
    plan = plan_vm("web", src, dst, mode, 1.0)
    assert plan.blocked == ["web/202603"] and "never deletes" in plan.problems[0]
    assert not any(r.startswith("web/202603/") for p in files.PHASES for r in plan.new[p] + plan.updates[p])
    assert "web/202602/vda.inc.virtnbdbackup.2.data" in plan.new[DATA]  # the other chain goes on
    assert not plan.retract and not plan.deletes


def test_accumulate_follows_archives_and_keeps_what_rotate_deleted():
    old = chain("web/202603", 2)
    dst = L(old | chain("web/202601", 2))
    src = L(archived("web/202603", "chain-2026-03-09", old) | chain("web/202603", 1, 100, 300))
    plan = plan_vm("web", src, dst, "accumulate", 1.0)
    assert len(plan.moves) == len(old) and not plan.problems
    assert not plan.deletes and not plan.retract  # 202601 stays on the replica


def test_append_only_takes_a_new_cpt_and_tpm_state_as_updates_and_keeps_other_first_copies():
    dst = L(chain("web/202603", 2) | {"web/202603/tpm-state/tpm2/a": (5, 0), "web/.agent-status": (3, 0)})
    src = L(chain("web/202603", 3) | {"web/202603/tpm-state/tpm2/a": (6, 9), "web/.agent-status": (4, 9)})
    plan = plan_vm("web", src, dst, "append-only", 1.0)
    assert plan.updates[CPT] == ["web/202603/web.cpt"]
    assert plan.updates[SIDE] == ["web/202603/tpm-state/tpm2/a"]
    assert plan.warnings == ["web/.agent-status changed at the source; the append-only replica keeps its first copy"]
    assert not plan.deletes and not plan.emptied


def test_mirror_deletes_a_rotated_period_cpt_first_then_its_emptied_directories():
    dst = L(chain("web/202601", 2) | chain("web/202603", 1))
    src = L(chain("web/202603", 1))
    plan = plan_vm("web", src, dst, "mirror", 1.0)
    assert plan.deletes[0] == "web/202601/web.cpt"
    assert plan.deletes.index("web/202601/vmconfig.virtnbdbackup.1.xml") < plan.deletes.index(
        "web/202601/vda.virtnbdbackup.0.qcow.json") < plan.deletes.index("web/202601/vda.full.data")
    assert plan.emptied == ["web/202601/checkpoints", "web/202601"]
    assert removal_share([plan], dst) == (2, 3)  # streams: the full and the incremental of 202601, of three


def test_a_vm_gone_from_the_source_goes_from_the_mirror():
    dst = L(chain("web/202603", 1))
    plan = plan_vm("web", {}, dst, "mirror", 1.0)
    assert sorted(plan.deletes) == sorted(dst) and plan.emptied[-1] == "web"
    assert plan_vm("web", {}, dst, "accumulate", 1.0).deletes == []
