"""The replication keys of a configuration instance: [[replication]] and [replicate]."""

from __future__ import annotations

import pytest

from vmbk import config
from vmbk.errors import ConfigError
from vmbk.replicate.destinations import choose, lanes


def load(tmp_path, text):
    (tmp_path / "default.toml").write_text(text)
    return config.load(env={"VMBK_CONFIG_DIR": str(tmp_path)})


def test_defaults_and_every_key(tmp_path):
    cfg = load(tmp_path, """
[[replication]]
name = "nas"
path = "/mnt/nas"
[[replication]]
name = "vault"
transport = "ssh"
host = "h"
path = "/"
sync_mode = "append-only"
scope = "archives-only"
exclude_vms = ["test-*"]
max_delete_percent = 10
strict_host_key_checking = "accept-new"
known_hosts = "/etc/vmbk/known_hosts"
[[replication]]
name = "cloud"
transport = "rclone"
remote = "b2:"
path = "x"
rclone_config = "/etc/vmbk/rclone.conf"
replicate_secrets = true
enabled = false
[replicate]
order = "simultaneous"
on_failure = "abort"
space_check = "warn"
min_free_percent = 5
""")
    nas, vault, cloud = cfg.replication
    assert (nas.transport, nas.sync_mode, nas.verify, nas.scope, nas.max_delete_percent, nas.replicate_secrets,
            nas.strict_host_key_checking) == ("local", "mirror", "size", "everything", 50, False, "yes")
    assert vault.excludes("test-1") and not vault.excludes("web") and vault.known_hosts == "/etc/vmbk/known_hosts"
    assert cloud.is_cloud and cloud.rclone_config == "/etc/vmbk/rclone.conf" and cloud.replicate_secrets
    o = cfg.replication_options
    assert (o.order, o.on_failure, o.space_check, o.min_free_percent) == ("simultaneous", "abort", "warn", 5)
    assert config.load(env={"VMBK_CONFIG_DIR": str(tmp_path / "none")}).replication_options.order == "config"
    # which destinations, in what order
    assert [d.name for d in choose(cfg, None, writing=True)] == ["nas", "vault"]
    assert [d.name for d in choose(cfg, "cloud", writing=False)] == ["cloud"]
    with pytest.raises(ConfigError, match="disabled"):
        choose(cfg, "cloud", writing=True)
    with pytest.raises(ConfigError, match=r"no replication destination 'x' \(known: nas, vault, cloud\)"):
        choose(cfg, "x", writing=True)
    every = list(cfg.replication)
    assert [[d.name for d in lane] for lane in lanes(every, "simultaneous")] == [["nas", "vault"], ["cloud"]]
    assert [[d.name for d in lane] for lane in lanes(every, "cloud_first")] == [["cloud", "nas", "vault"]]
    assert [[d.name for d in lane] for lane in lanes(every, "config")] == [["nas", "vault", "cloud"]]


@pytest.mark.parametrize("text, match", [
    ('[[replication]]\nname = "a"\npath = "/x"\nsync_mode = "append-only"\n', "needs transport 'ssh'"),
    ('[[replication]]\nname = "a"\npath = "/x"\n[[replication]]\nname = "a"\npath = "/y"\n', "unique: a"),
    ('[[replication]]\nname = "a/b"\npath = "/x"\n', "'name' must be"),
    ('[[replication]]\nname = "a"\npath = "/x"\nscope = "weekly"\n', "'scope' must be one of"),
    ('[[replication]]\nname = "a"\npath = "/x"\nexclude_vms = "web"\n', "list of strings"),
    ('[[replication]]\nname = "a"\npath = "/x"\nmax_delete_percent = 101\n', "between 0 and 100"),
    ('[[replication]]\nname = "a"\npath = "/x"\nstrict_host_key_checking = "ask"\n', "must be one of"),
    ('[replicate]\norder = "random"\n', r"\[replicate\].*'order'"),
    ('[replicate]\non_error = "abort"\n', r"\[replicate\].*unknown key.*on_error"),
])
def test_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, text)
