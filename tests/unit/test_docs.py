"""Tested documentation: every command has a current man page; the record
contract page covers every exit code and error kind, every record type and
every field the commands write; the README and CI agree on the test
command."""

import io
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import orjson
import pytest
from contract_doc import documented, undocumented

import vmbk.errors as errors

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "plan"


def scripts():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_has_a_man_page_generated_from_its_help():
    for name in scripts():
        assert (ROOT / "man" / f"{name}.1").exists(), name
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-man"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not shutil.which("man"), reason="man-db is installed by scripts/setup-host")
@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "man").glob("*.[157]")))
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


# -- the record contract written down (man/vmbk-json.7, RECORD TYPES) ------------


def _made_types() -> set[str]:
    """Every record type the code builds with ``make("TYPE", ...)``."""
    types: set[str] = set()
    for path in (ROOT / "vmbk").rglob("*.py"):
        types |= set(re.findall(r'\bmake\(\s*"(\w+)"', path.read_text()))
    return types


def test_the_page_has_a_section_for_every_record_type_the_code_makes():
    made = _made_types()
    assert {"vm", "plan", "backup", "error", "status", "restore"} <= made
    assert made - set(documented()) == set()
    every = (ROOT / "man" / "vmbk-json.7").read_text().split(".SH FIELDS EVERY RECORD HAS")[1].split(".TP\n.B v")[0]
    assert {t for t in made if f"\\fB{t}\\fR" not in every} == set()


def test_a_field_missing_from_the_page_is_caught(tmp_path):
    page = tmp_path / "vmbk-json.7"
    text = (ROOT / "man" / "vmbk-json.7").read_text()
    backup = text.index(".SS backup\n")
    cut = text.index(".TP\n.B disks[].path\n", backup)
    page.write_text(text[:cut] + text[cut + len(".TP\n.B disks[].path\n"):])
    recs = [{"type": "backup", "v": 1, "name": "a", "disks": [{"target": "vda", "path": "/x"}], "new_field": 1},
            {"type": "plan", "v": 1, "vm": {"type": "vm", "v": 1, "name": "a", "novel": {"k": 1}}},
            {"type": "frobnication", "v": 1}]
    assert undocumented(recs, page) == {
        "backup": ["disks[].path", "new_field"],
        "frobnication": ["(no subsection)"],
        "vm": ["novel", "novel.k"],
    }


def _json(out: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_every_field_written_without_libvirt_is_documented(tmp_path, monkeypatch):
    """plan (the golden VMs), backup --dry-run, status, and every record of
    vmbk-restore on a tree with three points, NVRAM and TPM state; the
    libvirt-backed rest in tests/integration/test_contract_docs.py."""
    from test_restore_command import HOSTILE, _with_tpm, three_points

    from vmbk.commands import backup, plan, restore, status
    from vmbk.restore import tpm

    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    root = tmp_path / "backups"
    records: list[dict] = []
    vms = [{"type": "vm", "v": 1, **orjson.loads(p.read_bytes())["vm"]} for p in sorted(GOLDEN.glob("*.json"))]
    out = io.StringIO()
    root.mkdir()
    plan.main(["--json", "--backup-path", str(root), "--now", "2026-03-02T22:00:00Z"],
              io.StringIO("".join(orjson.dumps(v).decode() + "\n" for v in vms)), out)
    plans = _json(out)
    assert {r["action"] for r in plans if r["type"] == "plan"} >= {"full", "copy", "skip"}
    out = io.StringIO()
    backup.main(["--json", "--backup-path", str(root), "--dry-run", "--connect", "test:///default"],
                io.StringIO(out_lines(plans)), out)
    records += plans + _json(out)
    assert any(r["type"] == "backup" and r["outcome"] == "dry-run" and r["disks"] for r in records)

    chain = three_points(root / HOSTILE / "2026-W10", HOSTILE)
    _with_tpm(chain)
    monkeypatch.setattr(tpm, "SWTPM_ROOT", tmp_path / "swtpm")
    bp = ["--json", "--backup-path", str(root), "--connect", "test:///default"]
    for argv in (["--list"], ["--list-restore-points", HOSTILE], ["--verify", HOSTILE], ["--dump", HOSTILE],
                 ["--vm", HOSTILE, "--restore-path", str(tmp_path / "dry"), "--dry-run"],
                 ["--vm", HOSTILE, "--restore-path", str(tmp_path / "dr")],
                 ["--vm", HOSTILE, "--restore-path", str(tmp_path / "data"), "--skip-config"]):
        out = io.StringIO()
        restore.main([*bp, *argv], io.StringIO(""), out)
        records += _json(out)
    out = io.StringIO()
    status.main(["--json", "--backup-path", str(root)], io.StringIO(""), out)
    records += _json(out)
    assert {"plan", "backup", "backup_vm", "chain", "restore_point", "verify", "dump", "restore_disk", "restore",
            "status"} <= {r["type"] for r in records}
    assert any(r["type"] == "restore" and r["tpm"] and r["domain"] for r in records)
    assert undocumented(records) == {}


def out_lines(records: list[dict]) -> str:
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


def test_the_page_states_every_stage_s_rules():
    text = (ROOT / "man" / "vmbk-json.7").read_text().replace("\\-", "-")
    stages = text.split(".SH STAGES")[1].split(".SH ")[0]
    closing = text.split(".SH WHEN STANDARD OUTPUT CLOSES")[1].split(".SH ")[0]
    for name in scripts():
        if name != "vmbk":
            assert name in stages and name in closing, name


def test_every_field_vmbk_rotate_writes_is_documented(tmp_path, monkeypatch):
    """rotate records (Tier 1 and 2 removals, protections, a finished leftover,
    low space, a dry run, a prune) and prune_target records."""
    from test_rotate import chain, daily_tree, run
    from test_plan_golden import materialise

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text('policy = "daily"\n[retention]\nmin_free_percent = 100\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    root = tmp_path / "backups"
    tree = {**daily_tree(), "2025-W01": chain("2025-01-01"), "20260301": chain("2026-03-01"),
            "2026-W14": chain("2026-04-03", archives={"chain-2026-04-06": chain("2026-04-05")}),
            ".deleting-20260101": chain("2026-01-01")}
    materialise(root, "web", "u1", tree)
    backup = {"type": "backup", "v": 1, "name": "web", "outcome": "ok", "target_dir": str(root / "web" / "20260408")}
    records: list[dict] = []
    for argv, stdin in ((["--dry-run"], orjson.dumps(backup).decode() + "\n"), ([], orjson.dumps(backup).decode() + "\n"),
                        (["--prune", "list", "--vm", "web"], ""), (["--prune", "list"], ""),
                        (["--prune", "archives", "--vm", "web", "--yes"], "")):
        code, out = run(root, *argv, stdin=stdin)
        assert code == 0, out
        records += out
    rot = [r for r in records if r["type"] == "rotate"]
    assert rot[1]["removed"] and rot[1]["kept"] and rot[1]["protected"] and rot[1]["finished"]
    assert {r["tier"] for r in rot[1]["removed"]} == {"count", "orphan"} and rot[1]["low_space"]
    assert rot[2]["prune"] == "archives" and {r["type"] for r in records} >= {"backup", "rotate", "prune_target"}
    assert undocumented(records) == {}


def test_every_field_vmbk_replicate_writes_is_documented(tmp_path):
    """replicate records (push, a dry run, skipped by exclude_vms and by
    [replicate] on_failure = abort, verify, pull) and its error records."""
    from replicate_helpers import configure, replicate, synthetic_tree

    root = tmp_path / "backups"
    synthetic_tree(root, "web")
    synthetic_tree(root, "db")
    (tmp_path / "nas").mkdir()
    cfg = configure(tmp_path / "etc", [
        {"name": "gone", "transport": "local", "path": str(tmp_path / "not-mounted")},
        {"name": "nas", "transport": "local", "path": str(tmp_path / "nas"), "exclude_vms": ["d*"]},
    ], replicate={"on_failure": "abort"})
    records: list[dict] = []
    for argv in (["--all"], ["--all", "--dest", "nas"], ["--all", "--dest", "nas", "--dry-run"],
                 ["--verify-only", "--dest", "nas"],
                 ["--pull", "--dest", "nas", "--vm", "web", "--to", str(tmp_path / "pulled")]):
        records += replicate(cfg, root, *argv)[1]
    rep = [r for r in records if r["type"] == "replicate"]
    assert {(r["action"], r["outcome"]) for r in rep} == {("push", "skipped"), ("push", "ok"), ("push", "dry-run"),
                                                         ("verify", "ok"), ("pull", "ok")}
    assert any(r["type"] == "error" and r["destination"] == "gone" for r in records)
    assert undocumented(records) == {}
