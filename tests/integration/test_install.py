"""vmbk installed as a server installs it (issue #23), then run from there.

* The Debian package: scripts/build-deb builds it, ``apt-get install
  ./vmbk_*.deb`` installs it on this machine; its commands (/usr/bin, with a
  clean environment: not the checkout) run the unit's nightly pipe over a
  real VM and restore what it made; its man pages, conffile, disabled timer
  and ``systemd-analyze verify`` of its units are checked; lintian finds no
  error or warning; ``apt-get remove`` keeps the configuration, ``apt-get
  purge`` leaves nothing of vmbk but the backups.  The package is purged
  whatever happens, so the checkout's .venv and the rest of the suite never
  see it (they do not use /usr/bin/vmbk-* or /etc/vmbk: the suite runs the
  checkout with its own VMBK_CONFIG_DIR).
* The wheel and the sdist (``python -m build``) and ``pip install .``: each
  installs in a fresh venv, where ``vmbk-restore --list`` reads a test tree.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from backup_helpers import ROOT, tree_files

import vmbk

pytestmark = pytest.mark.install
MiB = 1 << 20
#: A clean environment: PATH without the checkout's .venv, no PYTHONPATH.
CLEAN = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "TZ": "UTC", "HOME": "/root"}
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"]
#: Written before the package is installed, removed after it is purged: a
#: package left by a test run that was killed is purged by the next run.
MARKER = Path("/var/tmp/vmbk-tests/vmbk-deb-installed")
#: What the package or its runs create and its purge removes: none of it may be there before, or after the purge.
PACKAGE_PATHS = ("/etc/vmbk/default.toml", "/usr/lib/vmbk", "/usr/bin/vmbk", "/usr/bin/vmbk-backup",
                 "/lib/systemd/system/vmbk-backup.service", "/lib/systemd/system/vmbk-backup.timer",
                 "/etc/logrotate.d/vmbk", "/usr/share/doc/vmbk", "/usr/share/bash-completion/completions/vmbk",
                 "/usr/share/man/man1/vmbk-backup.1.gz", "/var/log/vmbk/backup.jsonl", "/var/lib/vmbk/report.html")
#: Directories the package or its runs make, gone after the purge unless something else was in them before.
PACKAGE_DIRS = ("/etc/vmbk", "/var/log/vmbk", "/var/lib/vmbk")
#: Where to look for anything named vmbk besides: not libvirt's (other tests' domains), not apt's or dpkg's.
SCANNED = ("/etc", "/usr", "/lib/systemd", "/var/lib", "/var/log")
NOT_SCANNED = ("/etc/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/lib/dpkg", "/var/lib/apt",
               "/usr/lib/python3", "/usr/local/lib")


def run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 300)
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def installed_packages() -> set[str]:
    r = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n"])
    return {line.split()[0] for line in r.stdout.splitlines() if line.endswith(" installed")}


def package_state() -> str:
    r = run(["dpkg-query", "-W", "-f", "${db:Status-Status}", "vmbk"])
    return r.stdout.strip() if r.returncode == 0 else "not-installed"


def named_vmbk() -> set[str]:
    """Every path under SCANNED whose name says vmbk (its content not listed)."""
    found: set[str] = set()
    for top in SCANNED:
        for dirpath, dirnames, filenames in os.walk(top):
            if dirpath.startswith(NOT_SCANNED):
                dirnames[:] = []
                continue
            for name in [*dirnames, *filenames]:
                # a test domain's files (vmbk-test-*: swtpm and QEMU logs) are the suite's, not the package's
                if "vmbk" in name and not name.startswith("vmbk-test-"):
                    found.add(os.path.join(dirpath, name))
            dirnames[:] = [d for d in dirnames if "vmbk" not in d]
    return found


def purge(pulled: set[str] | frozenset[str] = frozenset()) -> None:
    """vmbk purged, and the dependencies its installation pulled in (those
    still marked as installed automatically: not what someone installed since)."""
    env = {**CLEAN, "DEBIAN_FRONTEND": "noninteractive"}
    r = run([*APT, "purge", "vmbk"], env=env)
    if package_state() != "not-installed":  # apt could not: dpkg alone
        run(["dpkg", "--purge", "vmbk"], env=CLEAN)
    assert package_state() == "not-installed", r.stdout + r.stderr
    auto = set(run(["apt-mark", "showauto", *sorted(pulled)]).stdout.split()) if pulled else set()
    if auto:
        run([*APT, "purge", *sorted(auto)], env=env)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    if not shutil.which("dpkg-buildpackage"):
        pytest.fail("dpkg-dev is not installed: scripts/setup-host installs it")
    out = tmp_path_factory.mktemp("deb")
    r = run([str(ROOT / "scripts" / "build-deb"), "--out", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr
    (path,) = [Path(line) for line in r.stdout.splitlines()]
    assert path.name == f"vmbk_{vmbk.__version__}_{run(['dpkg', '--print-architecture']).stdout.strip()}.deb"
    return path


@pytest.fixture
def host_without_vmbk() -> Iterator[set[str]]:
    """This host as the package finds it: no vmbk, none of its paths; the
    package purged again whatever the test did, with the dependencies its
    installation pulled in (scripts/setup-host installs them, so there
    are none unless a dependency was added to debian/control only)."""
    if MARKER.exists() and package_state() != "not-installed":
        purge()  # left by a test run that was killed
    MARKER.unlink(missing_ok=True)
    if package_state() != "not-installed":
        pytest.skip("the package vmbk is installed on this host (not by this test): not touching it")
    there = [p for p in PACKAGE_PATHS if os.path.lexists(p)]
    if there:
        pytest.skip(f"{', '.join(there)} exist on this host (not the package's): not touching them")
    MARKER.parent.mkdir(parents=True, exist_ok=True)
    MARKER.write_text("the test installs the package vmbk; purged after\n")
    before = installed_packages()
    assert not [p for p in PACKAGE_PATHS if os.path.lexists(p)]
    try:
        yield before
    finally:
        try:
            purge(installed_packages() - before - {"vmbk"})
        finally:
            MARKER.unlink(missing_ok=True)


@pytest.mark.libvirt
def test_the_debian_package_installs_backs_up_restores_and_purges(deb, host_without_vmbk, nos_domain, vm_workdir,
                                                                  tmp_path):
    packages, named = host_without_vmbk, named_vmbk()
    dirs = {d for d in PACKAGE_DIRS if os.path.isdir(d)}  # another vmbk's (a clone's cron, its keys): left as they are
    apt_env = {**CLEAN, "DEBIAN_FRONTEND": "noninteractive"}
    r = run([*APT, "install", f"./{deb.name}"], cwd=deb.parent, env=apt_env)
    assert r.returncode == 0, r.stdout + r.stderr
    pulled = installed_packages() - packages - {"vmbk"}
    if pulled:  # not an error (apt installs dependencies), but scripts/setup-host should have
        print(f"apt-get pulled in {sorted(pulled)}: add them to scripts/setup-host", file=sys.stderr)

    # the commands on PATH, not the checkout's: no git commit in the version
    r = run(["vmbk-discover", "--version"], env=CLEAN, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, f"vmbk-discover {vmbk.__version__}\n"), r.stderr
    assert shutil.which("vmbk-config", path=CLEAN["PATH"]) == "/usr/bin/vmbk-config"
    r = run(["man", "vmbk-backup"], env={**CLEAN, "MANWIDTH": "80", "MAN_KEEP_STDERR": "1"})
    assert r.returncode == 0 and "vmbk-backup" in r.stdout and "EXIT STATUS" in r.stdout, r.stderr
    assert run(["man", "-w", "vmbk-json"], env=CLEAN).returncode == 0

    # the conffile, the units (the timer disabled), what lintian says
    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", "vmbk"]).stdout.split()[::2]
    assert sorted(conffiles) == ["/etc/logrotate.d/vmbk", "/etc/vmbk/default.toml"]
    assert "/srv/backup/vm" in Path("/etc/vmbk/default.toml").read_text()
    units = ["/lib/systemd/system/vmbk-backup.service", "/lib/systemd/system/vmbk-backup.timer"]
    r = run(["systemd-analyze", "verify", *units], env=CLEAN)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    r = run(["systemctl", "is-enabled", "vmbk-backup.timer"], env=CLEAN)
    assert r.stdout.strip() == "disabled", r.stdout + r.stderr
    lint = run(["lintian", "--pedantic", "--fail-on", "error,warning", str(deb)], env=CLEAN)
    assert lint.returncode == 0 and not [ln for ln in lint.stdout.splitlines() if ln[:2] in ("E:", "W:")], lint.stdout

    # the nightly pipe of the unit, with the installed commands, over one VM of
    # this host (every other one is "never"); then a restore of what it made
    nd = nos_domain(1, size="64M", writes=[(0x5A, 0, MiB), (0xA5, 5 * MiB, 2 * MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text(f'backup_path = "{root}"\npolicy = "never"\ncompression = "lz4"\n'
                                      f'[vm."{nd.name}"]\npolicy = "monthly"\n')
    exec_start = next(line for line in Path(units[0]).read_text().splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split(" ", 3)
    assert argv[:3] == ["/bin/bash", "-o", "pipefail"] and argv[3].startswith("-c '")
    for d in ("/var/log/vmbk", "/var/lib/vmbk"):  # what systemd's LogsDirectory= and StateDirectory= make
        os.makedirs(d, mode=0o755, exist_ok=True)
    r = run([*argv[:3], "-c", argv[3].removeprefix("-c '").removesuffix("'")], env={**CLEAN, "VMBK_CONFIG_DIR": str(etc)})
    assert r.returncode == 0, r.stderr
    records = [orjson.loads(line) for line in Path("/var/log/vmbk/backup.jsonl").read_text().splitlines()]
    (backup,) = [rec for rec in records if rec["type"] == "backup" and rec["name"] == nd.name]
    assert (backup["outcome"], backup["action"]) == ("ok", "full"), backup
    assert not [rec for rec in records if rec["type"] == "error"], records
    assert "vmbk-report" in Path("/var/lib/vmbk/report.html").read_text()

    r = run(["vmbk-restore", "--json", "--backup-path", str(root), "--vm", nd.name, "--restore-path",
             str(tmp_path / "restored"), "--skip-config"], env={**CLEAN, "VMBK_CONFIG_DIR": str(etc)})
    assert r.returncode == 0, r.stderr
    image = orjson.loads(r.stdout.splitlines()[-1])["files"][0]
    assert run(["qemu-img", "compare", "-q", "-U", image, str(nd.disks[0])]).returncode == 0
    backups = tree_files(root)

    # remove keeps the configuration (changed by the admin), purge removes it; neither touches the backups
    with open("/etc/vmbk/default.toml", "a") as f:
        f.write("# changed by the admin\n")
    r = run([*APT, "remove", "vmbk"], env=apt_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert package_state() == "config-files"
    assert Path("/etc/vmbk/default.toml").read_text().endswith("# changed by the admin\n")
    assert not os.path.lexists("/usr/bin/vmbk-backup") and not os.path.lexists("/usr/lib/vmbk")
    assert Path("/var/log/vmbk/backup.jsonl").exists()
    purge(pulled)
    assert [p for p in PACKAGE_PATHS if os.path.lexists(p)] == []
    assert {d for d in PACKAGE_DIRS if os.path.isdir(d)} == dirs
    assert named_vmbk() - named == set()
    assert installed_packages() == packages
    assert tree_files(root) == backups


def _chain_builder():
    """tests/unit/test_restore_points.py's Chain: real streams, written by this checkout's vmbk."""
    spec = importlib.util.spec_from_file_location("restore_points", ROOT / "tests" / "unit" / "test_restore_points.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.three_points


def _copy_tree(dest: Path) -> None:
    """The checkout's files as git sees them (tracked, and new ones it does not ignore)."""
    names = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, names.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_pip_install_the_wheel_and_the_sdist_in_a_fresh_venv(tmp_path):
    if run(["/usr/bin/python3", "-c", "import build, setuptools, wheel"]).returncode != 0:
        pytest.fail("python3-build, python3-setuptools or python3-wheel missing: scripts/setup-host installs them")
    src = tmp_path / "src"
    _copy_tree(src)
    dist = tmp_path / "dist"
    r = run(["/usr/bin/python3", "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(dist), str(src)],
            env=CLEAN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    v = vmbk.__version__
    assert sorted(p.name for p in dist.iterdir()) == [f"vmbk-{v}-py3-none-any.whl", f"vmbk-{v}.tar.gz"]

    tree = tmp_path / "backups"
    _chain_builder()(tree / "web01" / "202603", "web01")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

    def check(how: str) -> None:
        for name in scripts:
            assert (venv / "bin" / name).exists(), (how, name)
        r = run([str(venv / "bin" / "vmbk"), "--version"], env=CLEAN, cwd=tmp_path)
        assert r.stdout == f"vmbk {v}\n", (how, r.stdout, r.stderr)  # the venv's, not this checkout's
        r = run([str(venv / "bin" / "vmbk-restore"), "--list", "--json", "--backup-path", str(tree)], env=CLEAN)
        assert r.returncode == 0, (how, r.stderr)
        (listed,) = [orjson.loads(line) for line in r.stdout.splitlines()]
        assert listed["vm"] == "web01", (how, listed)
        r = run([str(venv / "bin" / "vmbk-restore"), "--list-restore-points", "web01", "--json", "--backup-path",
                 str(tree)], env=CLEAN)
        points = [rec for rec in map(orjson.loads, r.stdout.splitlines()) if rec["type"] == "restore_point"]
        assert r.returncode == 0 and [p["index"] for p in points] == [0, 1, 2], (how, r.stdout, r.stderr)

    # `pip install .` (its build isolated, as pip does), which brings the dependencies too
    r = run([*pip, "."], cwd=src, env=CLEAN, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check("pip install .")
    for built in sorted(dist.iterdir()):
        r = run([*pip, "--force-reinstall", "--no-deps", str(built)], env=CLEAN)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        check(built.name)
