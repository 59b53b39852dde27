"""Config instances, validation and backup path resolution."""

from pathlib import Path

import pytest

from vmbk import config
from vmbk.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vmbk.toml"


def write(tmp_path, name, text):
    (tmp_path / f"{name}.toml").write_text(text)
    return {"VMBK_CONFIG_DIR": str(tmp_path)}


def test_defaults_without_any_file(tmp_path):
    cfg = config.load(env={"VMBK_CONFIG_DIR": str(tmp_path)})
    assert cfg.instance == "default" and cfg.source is None and cfg.backup_path is None
    assert cfg.policy == "monthly"
    with pytest.raises(ConfigError, match="--backup-path"):
        cfg.require_backup_path()


def test_resolution_order(tmp_path):
    env = write(tmp_path, "default", 'backup_path = "/b/default"\n')
    write(tmp_path, "prod", 'backup_path = "/b/prod"\n')
    assert config.load(env=env).backup_path == Path("/b/default")
    assert config.load(env={**env, "VMBK_INSTANCE": "prod"}).backup_path == Path("/b/prod")
    # the flag beats the environment
    assert config.load("default", env={**env, "VMBK_INSTANCE": "prod"}).backup_path == Path("/b/default")
    # --backup-path beats everything
    assert config.load("prod", "/cli", env=env).backup_path == Path("/cli")


def test_missing_named_instance_lists_known_ones(tmp_path):
    env = write(tmp_path, "prod", "")
    with pytest.raises(ConfigError, match=r"'nope' not found.*known: prod"):
        config.load("nope", env=env)
    with pytest.raises(ConfigError, match="not found"):
        config.load(env={**env, "VMBK_INSTANCE": "nope"})


@pytest.mark.parametrize("name", ["../etc/passwd", ".hidden", "a/b", "", "x" * 70])
def test_instance_names_are_not_paths(tmp_path, name):
    with pytest.raises(ConfigError):
        config.load(name or "/", env={"VMBK_CONFIG_DIR": str(tmp_path)})


@pytest.mark.parametrize(
    "text, match",
    [
        ('polcy = "daily"\n', "unknown key.*polcy"),
        ('policy = "hourly"\n', "'policy' must be one of"),
        ("[retention]\ndaily = 0\n", "'daily' must be >= 1"),
        ("[retention]\ndayly = 3\n", r"\[retention\].*unknown key.*dayly"),
        ('[retention]\narchives = "some"\n', "'archives' must be \"all\" or an integer"),
        ("[retention]\narchives = -1\n", "'archives' must be"),
        ("[retention]\norphan_min_age = 30\norphan_max_age = 10\n", "must not exceed 'orphan_max_age'"),
        ("[retention]\nmin_free_percent = 101\n", "'min_free_percent' must be between 0 and 100"),
        ('exclude = "test-*"\n', "list of strings"),
        ('[vm."web"]\npolicy = "yearly"\n', "web"),
        ('[[replication]]\nname = "n"\npath = "/x"\ntransport = "ssh"\n', "needs 'host'"),
        ("[email]\nenabled = true\n", "needs 'to'"),
        ("policy = \n", "default.toml"),
    ],
)
def test_validation_errors_name_the_key_and_file(tmp_path, text, match):
    env = write(tmp_path, "default", text)
    with pytest.raises(ConfigError, match=match):
        config.load(env=env)


def test_policies_overrides_and_patterns(tmp_path):
    env = write(
        tmp_path,
        "default",
        """
policy = "weekly"
exclude = ["test-*", "*-template"]
fstrim_exclude = ["db-*"]
[vm."critical db"]
policy = "accumulate"
[vm."win11"]
policy = "never"
[vm."db-special"]
fstrim = true
[vm."scratch"]
exclude = true
""",
    )
    cfg = config.load(env=env)
    assert cfg.policy_for("web") == ("weekly", "default")
    assert cfg.policy_for("critical db") == ("accumulate", "override")
    assert cfg.exclusion("web") is None
    assert "never" in cfg.exclusion("win11")
    assert "test-*" in cfg.exclusion("test-1")
    assert "override" in cfg.exclusion("scratch")
    assert cfg.exclusion("TEST-1") is None  # patterns are case-sensitive, like vmbackup's
    assert cfg.fstrim_for("web") and not cfg.fstrim_for("db-1") and cfg.fstrim_for("db-special")


def test_the_shipped_example_is_valid_and_complete(tmp_path):
    env = write(tmp_path, "default", EXAMPLE.read_text())
    cfg = config.load(env=env)
    assert cfg.backup_path and cfg.vms and cfg.replication and cfg.email.enabled is False
    # every key the loader knows appears in the example, so it documents them all
    text = EXAMPLE.read_text()
    for key in ["backup_path", "connect", "policy", "compression", "compression_level", "exclude", "fstrim",
                "fstrim_exclude", "daily", "weekly", "monthly", "accumulate_warn_depth", "accumulate_limit",
                "archives", "orphan_min_age", "orphan_max_age", "min_free_percent",
                "transport", "sync_mode", "bwlimit_kbps", "verify", "ssh_key", "remote", "subject_prefix"]:
        assert key in text, key


def test_retention_keys_and_their_defaults(tmp_path):
    d = config.load(env={"VMBK_CONFIG_DIR": str(tmp_path)}).retention
    assert (d.archives, d.orphan_min_age, d.orphan_max_age, d.min_free_percent) == (None, 7, 90, 20)
    assert (d.keep("daily"), d.keep("weekly"), d.keep("monthly"), d.keep("accumulate"), d.keep("never")) == \
        (7, 4, 3, None, None)
    env = write(tmp_path, "default", "[retention]\narchives = 2\norphan_min_age = 0\norphan_max_age = 30\n"
                                     "min_free_percent = 0\n")
    r = config.load(env=env).retention
    assert (r.archives, r.keep("accumulate"), r.orphan_min_age, r.orphan_max_age, r.min_free_percent) == \
        (2, 2, 0, 30, 0)
    env = write(tmp_path, "default", '[retention]\narchives = "all"\n')
    assert config.load(env=env).retention.archives is None
