"""vmbk-backup refuses plan records it cannot carry out, naming what is wrong (`Plan.from_record`)."""

import pytest

from vmbk.policy import Plan, PlannedVm
from vmbk.errors import InputError

GOOD = {"type": "plan", "v": 1, "name": "web 'x'", "action": "inc", "target": "202611",
        "checkpoint": "virtnbdbackup.2", "parent": "virtnbdbackup.1",
        "disks": [{"target": "vda", "mode": "inc"}, {"target": "vdb", "mode": "skip"}]}


def check_plan(rec):
    return Plan.from_record(rec).name


def test_good_plans():
    assert check_plan(GOOD) == "web 'x'"
    assert check_plan({"name": "a", "action": "skip"}) == "a"
    assert check_plan({**GOOD, "action": "copy", "checkpoint": None, "parent": None}) == "web 'x'"


def test_typed_plan_round_trips_the_planner_record():
    plan = Plan.from_record(GOOD)
    assert plan.action == "inc" and plan.online and plan.parent == "virtnbdbackup.1"
    assert [(d.target, d.mode) for d in plan.disks] == [("vda", "inc"), ("vdb", "skip")]
    again = Plan.from_record({"type": "plan", "v": 1, **plan.to_dict()})
    assert again == plan


def test_planned_vm_types_the_vm_facts():
    rec = {**GOOD, "target_dir": "/b/web/202611",
           "vm": {"name": "web 'x'", "agent": True, "fstrim": False, "windows": True,
                  "firmware": {"nvram": "/n/VARS.fd"}, "tpm": {"state_dir": "/s/uuid"},
                  "disks": [{"target": "vda", "source": "/d/a.qcow2", "format": "qcow2", "type": "file"}]}}
    pv = PlannedVm.from_record(rec)
    assert pv.target_dir == "/b/web/202611"
    assert pv.vm.agent and pv.vm.fstrim is False and pv.vm.windows and pv.vm.tpm
    assert pv.vm.nvram == "/n/VARS.fd" and pv.vm.tpm_state_dir == "/s/uuid"
    assert pv.vm.disk("vda").source == "/d/a.qcow2" and pv.vm.disk("vdb") is None
    with pytest.raises(InputError, match="'vm'"):
        PlannedVm.from_record({**GOOD, "vm": "web"})


@pytest.mark.parametrize("change, what", [
    ({"name": ""}, "'name'"),
    ({"name": 3}, "'name'"),
    ({"action": "diff"}, "'action'"),
    ({"target": None}, "'target'"),
    ({"disks": [{"target": "vda"}]}, "'disks'"),
    ({"disks": "vda"}, "'disks'"),
    ({"checkpoint": None}, "'checkpoint'"),
    ({"parent": None}, "'parent'"),
    ({"reasons": "because"}, "'reasons'"),
    ({"cleanup": [1]}, "'cleanup'"),
    ({"archive": True}, "'archive'"),
    ({"checkpoint": 3}, "'checkpoint'"),
])
def test_bad_plans(change, what):
    with pytest.raises(InputError, match=what) as e:
        check_plan({**GOOD, **change})
    assert e.value.vm
