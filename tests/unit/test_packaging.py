"""What the Debian package and the wheel are made of, checked without
building them (tests/integration/test_debian_package.py builds, installs
and runs them): the conffile's safe defaults, the units, the dependencies
against pyproject.toml, the launchers, the version's one place."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vmbk
from vmbk.config import parse

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"
#: pyproject's dependencies that Debian 12 packages, and the package that provides each.
DEBIAN_PACKAGES = {"libvirt-python": "python3-libvirt", "lz4": "python3-lz4", "prometheus-client": "python3-prometheus-client",
                   "cryptography": "python3-cryptography"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements() -> dict[str, tuple[int, ...]]:
    out = {}
    for dep in pyproject()["project"]["dependencies"]:
        name, _, low = dep.partition(">=")
        out[name.strip()] = tuple(int(x) for x in low.strip().split(".")) if low else ()
    return out


def test_the_conffile_is_a_safe_default_instance():
    cfg = parse(DEBIAN / "default.toml", "default")
    assert cfg.backup_path == Path("/srv/backup/vm") and cfg.policy == "monthly"
    assert cfg.exclude == () and cfg.vms == {} and cfg.exclusion("any-vm") is None  # every VM
    assert cfg.replication == () and not cfg.email.enabled  # nothing leaves the host
    assert cfg.compression == "none"


def test_every_dependency_is_bundled_or_a_debian_package():
    vendored = {}
    for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([0-9.]+)", (DEBIAN / "vendor.txt").read_text(), re.M):
        vendored[m.group(1).lower()] = tuple(int(x) for x in m.group(2).split("."))
    depends = (DEBIAN / "control").read_text().split("\nDepends:")[1].split("\nRecommends:")[0]
    for name, low in requirements().items():
        if name in vendored:
            assert vendored[name] >= low, f"debian/vendor.txt pins {name} below pyproject's >= {low}"
        else:
            assert name in DEBIAN_PACKAGES and DEBIAN_PACKAGES[name] in depends, \
                f"{name}: neither in debian/vendor.txt nor a Depends of debian/control"
    assert set(vendored) <= set(requirements()), "debian/vendor.txt bundles what pyproject does not need"
    for line in (DEBIAN / "vendor.txt").read_text().splitlines():
        if "==" in line:
            assert line.endswith("\\"), f"{line}: no --hash (scripts/build-deb downloads with --require-hashes)"


def test_the_launchers_are_the_console_scripts(tmp_path):
    subprocess.run([sys.executable, str(DEBIAN / "launchers"), str(tmp_path), "/usr/lib/vmbk"], cwd=ROOT, check=True)
    scripts = pyproject()["project"]["scripts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(scripts)
    for name, target in scripts.items():
        text = (tmp_path / name).read_text()
        module, _, func = target.partition(":")
        assert text.startswith("#!/usr/bin/python3\n") and (tmp_path / name).stat().st_mode & 0o111
        assert 'sys.path.insert(0, "/usr/lib/vmbk")' in text and f"from {module} import {func}" in text
        compile(text, name, "exec")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd is installed by scripts/setup-host")
def test_the_units_verify(tmp_path):
    """systemd-analyze verify works without systemd as PID 1; the man pages it
    looks up are checked by the installed package's test."""
    units = [ROOT / "examples" / "vmbk-backup.service", ROOT / "examples" / "vmbk-backup.timer"]
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    service = units[0].read_text()
    assert "[Install]" not in service  # started by the timer only: nothing to enable but the timer
    assert "LogsDirectory=vmbk" in service and "StateDirectory=vmbk" in service
    assert "/var/log/vmbk/" in service and "/var/lib/vmbk/" in service


def test_the_shell_files_parse():
    for f in ("vmbk.postinst", "vmbk.postrm"):
        subprocess.run(["sh", "-n", str(DEBIAN / f)], check=True)
    subprocess.run(["bash", "-n", str(DEBIAN / "bash-completion")], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "build-deb")], check=True)


def test_the_version_is_written_in_one_place():
    project = pyproject()
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vmbk.__version__"}
    assert not (DEBIAN / "changelog").exists()  # scripts/build-deb writes it from vmbk.__version__
    for page in (ROOT / "man").glob("*.1"):
        assert f'"vmbk {vmbk.__version__}"' in page.read_text().splitlines()[0], page.name


SHA = "0123456789abcdef0123456789abcdef01234567"


def test_version_text_names_the_checkout_s_commit(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    assert vmbk.checkout_commit(tmp_path / "nothing") is None
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert vmbk.checkout_commit(tmp_path) is None  # an unborn branch
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{SHA} refs/heads/main\n")
    assert vmbk.checkout_commit(tmp_path) == SHA
    (git / "refs" / "heads" / "main").write_text(SHA.replace("0", "f") + "\n")
    assert vmbk.checkout_commit(tmp_path) == SHA.replace("0", "f")  # a loose ref wins over packed-refs
    (git / "HEAD").write_text(SHA + "\n")
    assert vmbk.checkout_commit(tmp_path) == SHA  # detached
    (git / "HEAD").write_text("garbage\n")
    assert vmbk.checkout_commit(tmp_path) is None
    # a worktree: .git is a file naming its git dir, whose refs live in the main repository
    wt = tmp_path / "wt"
    (git / "worktrees" / "wt").mkdir(parents=True)
    (git / "worktrees" / "wt" / "HEAD").write_text("ref: refs/heads/feature\n")
    (git / "worktrees" / "wt" / "commondir").write_text("../..\n")
    (git / "refs" / "heads" / "feature").write_text(SHA + "\n")
    wt.mkdir()
    (wt / ".git").write_text(f"gitdir: {git / 'worktrees' / 'wt'}\n")
    assert vmbk.checkout_commit(wt) == SHA


def test_version_from_this_checkout():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert vmbk.version_text() == f"{vmbk.__version__} (git {head.stdout.strip()[:12]})"
