"""The README's first command works: the demo runs end to end.

Run under a unique VM name and directory (VMBK_DEMO_NAME, VMBK_DEMO_DIR),
removed afterwards, so the suite leaves no demo VM behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import libvirt
import pytest
from guest.domain import remove_domain

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]
ROOT = Path(__file__).resolve().parents[2]


def test_demo_backs_up_restores_a_clone_and_verifies_it(libvirt_conn, vm_workdir):
    name = f"vmbk-demo-test-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "VMBK_DEMO_NAME": name, "VMBK_DEMO_DIR": str(vm_workdir / "demo")}
    try:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "clone of the latest point verified OK" in r.stdout
        assert "full + inc backup" in r.stdout
        assert "identical to the disk at backup time" in r.stderr
        assert "round 2: vmbk-rotate (" in r.stderr and "1 kept, 0 removed" in r.stderr  # one period, today's
        assert "round 2: vmbk-replicate to " in r.stderr and "restore point(s) of" in r.stderr
        assert "all complete" in r.stderr  # the local replica lists every point complete
        assert "vmbk-drill: outcome ok, level check; the throwaway VM and its files are gone" in r.stderr
        assert '"last_drill":{"at":' in r.stdout  # vmbk-status shows it
        assert '"type":"status","v":1' in r.stdout and '"state":"ok"' in r.stdout  # vmbk-status at the end
        report = vm_workdir / "demo" / "report.html"
        assert f"report: the HTML report of the last run is {report}" in r.stdout
        assert "1 backed up - OK" in report.read_text()
    finally:
        for n in (name, f"{name}-clone"):
            try:
                remove_domain(libvirt_conn.lookupByName(n))
            except libvirt.libvirtError:
                pass  # never created, or already gone
