"""vmbk-backup refuses plan records it cannot carry out, naming what is wrong."""

import pytest

from vmbk.backup.vm import check_plan
from vmbk.errors import InputError

GOOD = {"type": "plan", "v": 1, "name": "web 'x'", "action": "inc", "target": "202611",
        "checkpoint": "virtnbdbackup.2", "parent": "virtnbdbackup.1",
        "disks": [{"target": "vda", "mode": "inc"}, {"target": "vdb", "mode": "skip"}]}


def test_good_plans():
    assert check_plan(GOOD) == "web 'x'"
    assert check_plan({"name": "a", "action": "skip"}) == "a"
    assert check_plan({**GOOD, "action": "copy", "checkpoint": None, "parent": None}) == "web 'x'"


@pytest.mark.parametrize("change, what", [
    ({"name": ""}, "'name'"),
    ({"name": 3}, "'name'"),
    ({"action": "diff"}, "'action'"),
    ({"target": None}, "'target'"),
    ({"disks": [{"target": "vda"}]}, "'disks'"),
    ({"disks": "vda"}, "'disks'"),
    ({"checkpoint": None}, "'checkpoint'"),
    ({"parent": None}, "'parent'"),
])
def test_bad_plans(change, what):
    with pytest.raises(InputError, match=what) as e:
        check_plan({**GOOD, **change})
    assert e.value.vm
