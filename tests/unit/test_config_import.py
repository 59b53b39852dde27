"""vmbk-config import-vmbackup: vmbackup instances (tests/vmbackup_config/,
written from vmbackup's manual) as vmbk TOML instances that vmbk loads and
that do what vmbackup did; every setting named, none run."""

from __future__ import annotations

import fnmatch
import io
import re
import tomllib
from pathlib import Path

import pytest

from vmbk.commands.config import main as config_main
from vmbk.commands.umbrella import main as umbrella_main
from vmbk.config import from_mapping
from vmbk.errors import Exit
from vmbk.settings import Config
from vmbk.vmbackup.config_import import import_instance
from vmbk.vmbackup.shellconf import ShellConf, patterns_file

CASES = Path(__file__).resolve().parents[1] / "vmbackup_config"
_ASSIGNED = re.compile(r"^\s*(?:declare\s+-\w+\s+)?([A-Z][A-Z0-9_]*)(?:\[[^\]]*\])?\+?=", re.M)


def load(text: str) -> Config:
    return from_mapping(tomllib.loads(text), instance="t", source=None)


def settings_in(directory: Path) -> set[str]:
    """Every variable the instance's bash files assign (comments aside)."""
    names: set[str] = set()
    for f in directory.glob("*.conf"):
        if f.name != "fstrim_exclude.conf":
            names |= set(_ASSIGNED.findall(f.read_text()))
    return names


def test_the_manual_s_instance_becomes_the_same_vmbk_instance():
    text = import_instance(CASES / "manual")
    cfg = load(text)
    assert cfg.backup_path == Path("/mnt/backup/vms")
    assert (cfg.policy, cfg.compression, cfg.compression_level) == ("weekly", "lz4", 2)
    r = cfg.retention
    assert (r.daily, r.weekly, r.monthly) == (10, 6, 12)
    assert (r.accumulate_warn_depth, r.accumulate_limit, r.orphan_min_age, r.orphan_max_age) == (30, 60, 14, 120)
    assert cfg.exclude == ("test-*", "*-template")
    assert cfg.fstrim and cfg.fstrim_exclude == ("db-prod-pg", "db-reporting-*", "legacy-win7-*")
    assert {n: o.policy for n, o in cfg.vms.items()} == {
        "critical-db": "accumulate", "dev-sandbox": "daily", "template-vm": "never", "win11-pro": "monthly"}
    assert cfg.exclusion("template-vm") and cfg.exclusion("test-web") and not cfg.exclusion("critical-db")

    opts = cfg.replication_options
    assert (opts.order, opts.on_failure, opts.space_check, opts.min_free_percent) == ("local_first", "continue", "warn", 15)
    nas, ssh, sharepoint, b2 = cfg.replication
    assert (nas.name, nas.transport, nas.path, nas.enabled, nas.sync_mode, nas.verify) == (
        "local-backup", "local", "/mnt/backups", True, "mirror", "size")
    assert (ssh.name, ssh.transport, ssh.host, ssh.user, ssh.port, ssh.ssh_key, ssh.path, ssh.enabled) == (
        "offsite-ssh", "ssh", "backup.example.com", "backupuser", 2222, "/root/.ssh/backup_rsa", "/backups/vms", False)
    assert (ssh.sync_mode, ssh.bwlimit_kbps, ssh.verify) == ("accumulate", 5000, "checksum")
    assert (sharepoint.transport, sharepoint.remote, sharepoint.path, sharepoint.enabled) == (
        "rclone", "sharepoint:", "VMBackups", True)
    # the global scope, sync mode and verification where the destination leaves them empty
    assert (sharepoint.scope, sharepoint.sync_mode, sharepoint.verify) == ("everything", "mirror", "checksum")
    assert sharepoint.exclude_vms == ("scratch", "build-cache") and not sharepoint.replicate_secrets
    assert (b2.enabled, b2.scope, b2.sync_mode, b2.verify, b2.bwlimit_kbps) == (False, "archives-only", "accumulate", "size", 5000)

    em = cfg.email
    assert em.enabled and em.recipients == ("ops@example.com", "oncall@example.com") and em.sender == "backups@example.com"
    assert (em.on_success, em.on_failure, em.hostname) == (False, True, None)
    assert (em.transport, em.sendmail) == ("sendmail", "/usr/bin/msmtp")  # vmbackup mails through msmtp


def test_every_setting_of_the_instance_is_named_in_the_output():
    """A key with its source in a comment, or a comment saying why there is none."""
    for case in ("manual", "odd"):
        text = import_instance(CASES / case)
        missing = sorted(n for n in settings_in(CASES / case) if n not in text)
        assert not missing, (case, missing)
    text = import_instance(CASES / "manual")
    for name in ("PROCESS_PRIORITY", "IO_PRIORITY_CLASS", "LOG_LEVEL", "MAX_RETRIES", "STATE_BACKUP_KEEP_DAYS",
                 "CLOUD_REPLICATION_LOCK_TIMEOUT", "EMAIL_INCLUDE_DISK_SPACE", "CLOUD_DEST_1_MAX_SIZE"):
        (line,) = [ln for ln in text.splitlines() if name in ln]
        assert line.startswith("# ") and "no key" in line, line


def test_vmbackup_s_defaults_are_written_where_they_differ_from_vmbk_s():
    cfg = load(import_instance(CASES / "minimal"))
    assert cfg.backup_path == Path("/srv/vmbackup")
    assert (cfg.policy, cfg.compression, cfg.compression_level) == ("monthly", "lz4", 4)
    assert (cfg.retention.accumulate_warn_depth, cfg.retention.accumulate_limit) == (100, 365)
    assert (cfg.retention.daily, cfg.retention.weekly, cfg.retention.monthly) == (7, 4, 3)
    assert cfg.replication == () and not cfg.email.enabled  # no replication files, no email.conf
    assert cfg.exclude == () and cfg.vms == {}


def test_what_the_importer_cannot_take_is_said_not_guessed():
    text = import_instance(CASES / "odd")
    cfg = load(text)
    assert cfg.backup_path == Path("/data/vms")  # ${BASE}/vms/, BASE set above it
    assert cfg.policy == "monthly" and "DEFAULT_ROTATION_POLICY=biweekly: not one of" in text
    assert cfg.compression_level == 1  # level 0, which vmbackup raises to 1
    assert cfg.retention.accumulate_limit == 365 and "ACCUMULATE_HARD_LIMIT=lots" in text
    assert cfg.retention.orphan_max_age == 36500  # orphan cleanup off: nothing of the kind is ever deleted
    assert cfg.exclude == ("test-*", "old vm")  # the manual's EXCLUDE_PATTERN spelling
    assert set(cfg.vms) == {"db"} and "VM_POLICY[web 01]=hourly" in text
    assert "vmbk differs here" in text  # ENABLE_AUTO_RECOVERY_ON_CHECKPOINT_CORRUPTION=warn
    assert "not read (an expansion other than $NAME or ${NAME}): HOSTNAME_SHORT=$(hostname -s)" in text
    assert "not read (not an assignment): if [[ -d /mnt/fast ]]" in text
    assert cfg.replication_options.on_failure == "abort" and "REPLICATION_ORDER=whenever" in text
    smb, ssh, s3 = cfg.replication
    assert (smb.name, smb.transport, smb.path) == ("NAS-in-the-basement", "local", "/mnt/smb/backups")
    assert (ssh.name, ssh.host, ssh.path) == ("NAS-in-the-basement-2", "vault.example.org", "/srv/vms")
    assert "DEST_3_TRANSPORT=ftp" in text and "CLOUD_DEST_1_REMOTE is not set" in text
    assert not s3.enabled  # CLOUD_REPLICATION_ENABLED=no
    assert [p for p in s3.exclude_vms if fnmatch.fnmatchcase("web[1]", p)] == ["web[[]1]"]
    assert not s3.excludes("web1") and not s3.excludes("lab-x") and s3.excludes("lab*")


def test_importing_runs_nothing_in_the_files(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "vmbackup.conf").write_text(
        f'BACKUP_PATH="/srv/b"\nLOG_LEVEL=$(touch {marker})\ntouch {marker}\nMAX_RETRIES=`touch {marker}`\n')
    text = import_instance(tmp_path)
    assert not marker.exists()
    assert text.count("not read") == 3 and load(text).backup_path == Path("/srv/b")


def test_the_command_prints_the_instance_and_fails_with_one_line(tmp_path, capsys):
    out = io.StringIO()
    assert config_main(["import-vmbackup", str(CASES / "manual")], io.StringIO(), out) == 0
    assert out.getvalue() == import_instance(CASES / "manual")
    out = io.StringIO()
    assert umbrella_main(["config", "import-vmbackup", str(CASES / "minimal")], io.StringIO(), out) == 0
    assert out.getvalue() == import_instance(CASES / "minimal")
    capsys.readouterr()
    assert config_main(["import-vmbackup", str(tmp_path / "nope")], io.StringIO(), io.StringIO()) == Exit.CONFIG
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "config" / "default").mkdir(parents=True)
    (tmp_path / "config" / "default" / "vmbackup.conf").write_text("BACKUP_PATH=/x\n")
    assert config_main(["import-vmbackup", str(tmp_path)], io.StringIO(), io.StringIO()) == Exit.CONFIG
    err = capsys.readouterr().err.strip()
    assert "no vmbackup.conf" in err and f"{tmp_path}/config/default" in err and len(err.splitlines()) == 1
    assert config_main([], io.StringIO(), io.StringIO()) == Exit.USAGE


def test_shell_values_as_bash_reads_them():
    conf = ShellConf()
    conf.read('A=plain\nB="two words" # comment\nC=\'$NOT\'\nD="${A}-$A \\"q\\" \\$x"\nexport E=e\n'
              'F=${UNSET:-fallback}\nG=a\\ b\nH=one\\\ntwo\nARR=(\n  "x y"\n  z\n)\nARR+=(w)\n'
              "declare -gA M\nM[k1]=v1\nM['k 2']=\"v 2\"\nI=\nJ+=more\n", "t.conf")
    v = conf.value
    assert (v("A"), v("B"), v("C"), v("D"), v("E"), v("F"), v("G"), v("H")) == (
        "plain", "two words", "$NOT", 'plain-plain "q" $x', "e", "fallback", "a b", "onetwo")
    assert conf.arrays["ARR"].value == ["x y", "z", "w"]
    assert {k: s.value for k, s in conf.maps["M"].items()} == {"k1": "v1", "k 2": "v 2"}
    assert (v("I"), v("J")) == ("", "more")
    assert conf.skipped == []
    assert conf.arrays["ARR"].line == 14 and conf.scalars["H"].line == 8


@pytest.mark.parametrize("line", ["A=$(date)", "A=`date`", "A=x; rm -rf /", "A=$UNSET_NAME", "A=\"open",
                                  "source other.conf", "A=x | tee", "f() { :; }"])
def test_what_is_not_a_plain_assignment_is_skipped(line):
    conf = ShellConf()
    conf.read(line + "\n", "t.conf")
    assert conf.scalars == {} and len(conf.skipped) == 1


def test_fstrim_exclude_lines_as_vmbackup_reads_them():
    assert patterns_file("# c\n\ndb-*   # trailing\n  legacy-*  \nweb#1\n") == ["db-*", "legacy-*", "web"]
