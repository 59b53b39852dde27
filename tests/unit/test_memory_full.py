"""``memory = "full"`` (issue #18): the config value, the vm record, the plan.

The planner's decisions themselves are golden cases (tests/golden/plan/
memory-*.json, walkthrough-memory-full.json); here: what reaches them.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from test_plan_golden import GOLDEN, _vm, materialise

from vmbk import config
from vmbk.discover import vm_record
from vmbk.errors import ConfigError, InputError
from vmbk.planner import plan_vm
from vmbk.policy import VmFacts


def load(tmp_path: Path, text: str) -> config.Config:
    (tmp_path / "default.toml").write_text(text)
    return config.load(env={"VMBK_CONFIG_DIR": str(tmp_path)})


@pytest.mark.parametrize("value, mode, saves", [("true", True, True), ("false", False, False),
                                                ('"full"', "full", True)])
def test_the_accepted_values(tmp_path: Path, value: str, mode: object, saves: bool) -> None:
    cfg = load(tmp_path, f'[vm."web"]\nmemory = {value}\n')
    assert cfg.memory_mode("web") == mode and cfg.memory_for("web") is saves
    assert cfg.memory_mode("other") is False and cfg.memory_for("other") is False


@pytest.mark.parametrize("value", ['"yes"', '"Full"', '"true"', "1", "[]"])
def test_anything_else_is_a_config_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"\[vm\.'web'\]: 'memory' must be true, false or \"full\""):
        load(tmp_path, f'[vm."web"]\nmemory = {value}\n')


def test_discover_puts_the_mode_in_the_vm_record(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[vm."web"]\nmemory = "full"\n[vm."db"]\nmemory = true\n')
    assert vm_record({"name": "web"}, cfg, "S")["memory"] == "full"
    assert vm_record({"name": "db"}, cfg, "S")["memory"] is True
    assert vm_record({"name": "other"}, cfg, "S")["memory"] is False


def test_a_vm_record_with_another_memory_value_is_refused() -> None:
    assert VmFacts.from_record({"name": "web", "memory": "full"}).memory == "full"
    with pytest.raises(InputError, match="'memory' must be true, false or 'full'"):
        VmFacts.from_record({"name": "web", "memory": "always"})


def test_the_plan_takes_the_record_s_mode_else_the_config_s(tmp_path: Path) -> None:
    """A hand-written vm record without ``memory`` gets the configuration's (like ``excluded``)."""
    case = json.loads((GOLDEN / "daily-second-run.json").read_text())
    root = tmp_path / "backup"
    materialise(root, case["vm"]["name"], case["vm"]["uuid"], case["tree"])
    now = dt.datetime.fromisoformat(case["now"])
    cfg = load(tmp_path, '[vm."my-vm"]\nmemory = "full"\n')
    rec = _vm(case["vm"])
    assert "memory" not in rec
    assert plan_vm(rec, cfg, root, now)[0].action == "full"
    assert plan_vm({**rec, "memory": True}, cfg, root, now)[0].action == "inc"
    assert plan_vm(rec, config.Config(instance="t", source=None), root, now)[0].action == "inc"
