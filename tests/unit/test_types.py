"""mypy over the package (STYLE 12): type errors fail the suite."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.prefix) / "bin" / "mypy").exists(),
                    reason="mypy is a test extra: scripts/setup-host installs it")
def test_mypy_is_clean():
    r = subprocess.run([sys.executable, "-m", "mypy", "vmbk"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
