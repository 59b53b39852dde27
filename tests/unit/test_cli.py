"""The one wrapper: exit codes, one-line errors, help, signals, broken pipes."""

import importlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from vmbk.errors import Exit

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["discover", "plan", "backup", "rotate", "replicate", "report", "restore", "status", "drill"]


def run(cmd, argv, stdin=None, capsys=None):
    mod = importlib.import_module(f"vmbk.commands.{cmd}")
    out = io.StringIO()
    code = mod.main(argv, stdin if stdin is not None else io.StringIO(""), out)
    return code, out.getvalue()


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_option_is_usage_error_with_one_line(cmd, capsys):
    code, out = run(cmd, ["--bogus"])
    err = capsys.readouterr().err
    assert code == Exit.USAGE
    assert out == ""
    assert err.count("\n") == 1 and "--bogus" in err and f"vmbk-{cmd}" in err


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_prints_the_usage_and_exits_0(cmd, capsys):
    code, out = run(cmd, ["--help"])
    mod = importlib.import_module(f"vmbk.commands.{cmd}")
    assert code == 0 and out.strip() == mod.__doc__.strip()


@pytest.mark.parametrize("cmd", COMMANDS)
def test_missing_instance_is_config_error(cmd, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    argv = ["--config-instance", "nope"]
    if cmd == "restore":
        argv = ["--list"] + argv
    code, out = run(cmd, argv)
    err = capsys.readouterr().err
    assert code == Exit.CONFIG and out == ""
    assert err.count("\n") == 1 and "'nope' not found" in err


def test_instance_from_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("VMBK_INSTANCE", "prod")
    code, _ = run("status", [])
    assert code == Exit.CONFIG and "'prod' not found" in capsys.readouterr().err


def test_missing_backup_path_is_storage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    code, out = run("status", ["--backup-path", str(tmp_path / "nothing")])
    assert code == Exit.STORAGE and out == ""


def test_version(capsys):
    code, out = run("plan", ["--version"])
    assert code == 0 and out.startswith("vmbk-plan ")


def test_umbrella_dispatches(capsys, tmp_path):
    from vmbk.commands.umbrella import main

    out = io.StringIO()
    (tmp_path / "web").mkdir()  # named with --vm: reported even without a backup (a problem: exit 5)
    code = main(["status", "--json", "--backup-path", str(tmp_path), "--vm", "web"], io.StringIO(""), out)
    assert code == Exit.VM and '"vm":"web"' in out.getvalue()
    assert main(["frobnicate"], io.StringIO(""), io.StringIO()) == Exit.USAGE
    assert main(["backup", "--bogus"], io.StringIO(""), io.StringIO()) == Exit.USAGE


def test_stage_passes_unknown_records_and_turns_vm_failures_into_errors(capsys, tmp_path):
    stdin = io.StringIO('{"type":"note","v":1,"session":"S9","x":1}\n{"type":"plan","v":1,"name":"a"}\n'
                        '{"type":"plan","v":1,"name":"b","action":"skip"}\n')
    code, out = run("backup", ["--json", "--backup-path", str(tmp_path)], stdin)
    lines = out.splitlines()
    assert lines[0] == '{"type":"note","v":1,"session":"S9","x":1}'
    assert '"type":"error"' in lines[1] and '"session":"S9"' in lines[1] and '"vm":"a"' in lines[1]
    assert '"kind":"input"' in lines[1] and "'action'" in lines[1]
    assert '"type":"backup"' in lines[2] and '"outcome":"skipped"' in lines[2]
    assert code == Exit.PARTIAL


def test_bad_input_record_stops_the_stage(capsys, tmp_path):
    code, out = run("backup", ["--json", "--backup-path", str(tmp_path)], io.StringIO("garbage\n"))
    assert code == Exit.USAGE and out == ""
    assert "line 1" in capsys.readouterr().err


class _ClosedPipe(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_is_a_normal_end(tmp_path, capsys):
    from vmbk.commands.status import main

    (tmp_path / "vm1").mkdir()
    assert main(["--json", "--backup-path", str(tmp_path)], io.StringIO(""), _ClosedPipe()) == 0
    assert capsys.readouterr().err == ""


def _blocked_stage():
    """vmbk-plan waiting on a stdin pipe that never delivers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "bin" / "vmbk-plan"), "--json", "--backup-path", "/tmp"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    p.stdin.write(b'{"type":"other","v":1}\n')
    p.stdin.flush()
    first = p.stdout.readline()  # the pass-through proves it is reading
    assert b'"other"' in first
    return p


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_give_128_plus_n(sig, code):
    p = _blocked_stage()
    try:
        time.sleep(0.1)
        p.send_signal(sig)
        assert p.wait(10) == code
        assert p.stderr.read().decode().count("\n") == 1
    finally:
        p.kill()
        p.wait()


def test_pipe_into_head_exits_0(tmp_path):
    for i in range(2000):
        (tmp_path / f"vm{i}").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$0" "$1" --json --backup-path "$2" | head -1 >/dev/null',
         sys.executable, str(ROOT / "bin" / "vmbk-status"), str(tmp_path)],
        capture_output=True, env=env, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""


# -- a reader that goes away, a writer that dies (vmbk-json(7)) -----------------

NOTES = 20_000  # far more than a pipe holds (64 KiB): the stage must block on its reader


def _notes(path: Path, extra: bytes = b"") -> Path:
    path.write_bytes(b"".join(b'{"type":"note","v":1,"n":%d}\n' % i for i in range(NOTES)) + extra)
    return path


def _reader_goes_after_one_line(tmp_path, cmd, *argv):
    """Run ``vmbk-CMD`` on NOTES records; read one line of its output and close
    the pipe.  (exit code, stderr, whether it read all of its input)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMBK_CONFIG_DIR": str(tmp_path)}
    src = _notes(tmp_path / "in.jsonl")
    with open(src, "rb") as stdin:
        p = subprocess.Popen([sys.executable, str(ROOT / "bin" / f"vmbk-{cmd}"), "--json",
                              "--backup-path", str(tmp_path), *argv],
                             stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert p.stdout.readline().startswith(b'{"type":"note"')
            p.stdout.close()
            err = p.stderr.read().decode()
            code = p.wait(60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        read_all = os.lseek(stdin.fileno(), 0, os.SEEK_CUR) == src.stat().st_size
    return code, err, read_all


@pytest.mark.parametrize("cmd, argv", [("plan", []), ("rotate", ["--dry-run"]), ("replicate", ["--dry-run"])])
def test_a_read_only_stage_stops_quietly_when_its_reader_goes(tmp_path, cmd, argv):
    code, err, read_all = _reader_goes_after_one_line(tmp_path, cmd, *argv)
    assert (code, err) == (0, "")
    assert not read_all


@pytest.mark.parametrize("cmd", ["rotate", "replicate"])
def test_a_stage_that_changes_state_goes_on_without_its_reader(tmp_path, cmd):
    code, err, read_all = _reader_goes_after_one_line(tmp_path, cmd)
    assert read_all, "the stage stopped with its reader"
    assert code == Exit.GENERAL, err
    first, last = err.splitlines()
    assert first.startswith(f"vmbk-{cmd}: standard output was closed")
    lost = int(last.split(": ", 1)[1].split()[0])
    assert NOTES - 4000 < lost < NOTES and last.endswith(" more"), last
    assert "not delivered, standard output was closed: note, note" in last


def test_a_writer_that_dies_mid_record_is_an_input_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMBK_CONFIG_DIR": str(tmp_path)}
    dies = "import os; os.write(1, b'{\"type\":\"note\",\"v\":1}\\n{\"type\":\"vm\",\"v\":1,\"na'); os._exit(9)"
    producer = subprocess.Popen([sys.executable, "-c", dies], stdout=subprocess.PIPE)
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "vmbk-plan"), "--json", "--backup-path", str(tmp_path)],
                       stdin=producer.stdout, capture_output=True, env=env, timeout=60)
    producer.stdout.close()
    assert producer.wait(10) == 9
    assert r.returncode == Exit.USAGE
    assert r.stdout == b'{"type":"note","v":1}\n'
    assert r.stderr.decode() == ("vmbk-plan: stdin line 2: the input ends in the middle of a record "
                                 "(did the command writing it die?)\n")


# -- contract versions: each stage that reads records ---------------------------

VM = {"type": "vm", "v": 1, "name": "web", "uuid": "6f1c2a3e-0000-4000-8000-000000000001", "state": "shut off",
      "persistent": True, "disks": [], "checkpoints": [], "policy": "weekly", "excluded": False}


@pytest.mark.parametrize("cmd, rtype", [("plan", "vm"), ("backup", "plan"), ("rotate", "backup"),
                                        ("replicate", "backup"), ("replicate", "rotate")])
def test_a_stage_refuses_a_record_it_consumes_of_an_unknown_version(tmp_path, capsys, cmd, rtype):
    rec = {**VM, "type": rtype, "v": 2}
    code, out = run(cmd, ["--json", "--backup-path", str(tmp_path)], io.StringIO(orjson.dumps(rec).decode() + "\n"))
    err = capsys.readouterr().err
    assert code == Exit.USAGE and out == ""
    assert err == (f"vmbk-{cmd}: stdin line 1: {rtype} record of contract version 2; this vmbk reads version 1 "
                   "(written by a newer vmbk?)\n")


@pytest.mark.parametrize("cmd", ["plan", "backup", "rotate", "replicate"])
def test_a_stage_passes_records_of_other_types_whatever_their_version(tmp_path, capsys, cmd):
    lines = '{"type":"frobnication", "v":7,"x":[1, 2]}\n{"type":"error","v":2,"code":"x"}\n'
    code, out = run(cmd, ["--json", "--backup-path", str(tmp_path)], io.StringIO(lines))
    assert out == lines
    assert code == Exit.GENERAL  # the error counts, its code is not read


def test_plan_takes_a_vm_record_of_its_version(tmp_path, capsys):
    code, out = run("plan", ["--json", "--backup-path", str(tmp_path), "--now", "2026-03-02T22:00:00Z"],
                    io.StringIO(orjson.dumps(VM).decode() + "\n"))
    (rec,) = map(orjson.loads, out.splitlines())
    assert code == 0 and (rec["type"], rec["name"], rec["vm"]) == ("plan", "web", VM), rec


def test_an_unwrapped_libvirt_error_is_a_tool_failure_not_a_crash():
    """A libvirt call that escaped its wrapper: exit 6 and one line, no traceback."""
    import libvirt

    from vmbk import cli

    def body(args, ctx):
        raise libvirt.libvirtError("internal error: client socket is closed")

    err = io.StringIO()
    code = cli.run("Usage: prog", body, [], io.StringIO(), io.StringIO(), prog="prog", stderr=err)
    assert code == Exit.TOOL == 6
    assert err.getvalue() == "prog: libvirt: internal error: client socket is closed\n"
