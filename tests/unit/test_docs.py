"""Tested documentation: every command has a current man page; the record
contract page covers every exit code and error kind; the README and CI
agree on the test command."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vmbk.errors as errors

ROOT = Path(__file__).resolve().parents[2]


def scripts():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_has_a_man_page_generated_from_its_help():
    for name in scripts():
        assert (ROOT / "man" / f"{name}.1").exists(), name
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-man"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not shutil.which("man"), reason="man-db is installed by scripts/setup-host")
@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "man").glob("*.[17]")))
def test_man_pages_render(page):
    r = subprocess.run(["man", "-l", str(ROOT / "man" / page)], capture_output=True, text=True,
                       env={"MANWIDTH": "80", "MAN_KEEP_STDERR": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "NAME" in r.stdout, r.stderr


def test_contract_page_documents_every_exit_code_and_error_kind():
    text = (ROOT / "man" / "vmbk-json.7").read_text().replace("\\-", "-")
    for code in errors.Exit:
        assert re.search(rf"^\.B (\d+, )*{int(code)}\b", text, re.M), code
    kinds = {c.kind for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.VmbkError)}
    for kind in kinds:
        assert f"\\fB{kind}\\fR" in text, kind


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test" in readme and "./scripts/demo" in readme
    assert "./scripts/test" in ci
