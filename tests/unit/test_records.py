"""The JSON-lines contract: reading, writing, pass-through, tallies."""

import io

import orjson
import pytest

from vmbk import RECORD_VERSION
from vmbk.errors import Exit, InputError, VmError
from vmbk.output import Emitter
from vmbk.records import make, new_session_id, read_records


def test_read_is_lazy_and_skips_blank_lines():
    def lines():
        yield b'{"type":"vm","v":1,"name":"a"}\n'
        yield b"\n"
        yield b'{"type":"vm","v":1,"name":"b"}\n'
        raise AssertionError("read past what was asked")

    it = read_records(lines())
    assert next(it)["name"] == "a"
    assert next(it)["name"] == "b"


@pytest.mark.parametrize(
    "line, what",
    [
        (b"{not json\n", "not JSON"),
        (b"[1, 2]\n", "not a record"),
        (b'{"name": "x"}\n', "not a record"),
        (b'{"type": 3}\n', "not a record"),
        (b'{"type": "vm", "v": "1"}\n', "'v' must be an integer"),
    ],
)
def test_bad_input_names_the_line(line, what):
    with pytest.raises(InputError) as e:
        list(read_records([b'{"type":"vm","v":1}\n', line]))
    assert "line 2" in str(e.value) and what in str(e.value)
    assert e.value.code == Exit.USAGE


def test_text_input_is_accepted():
    recs = list(read_records(io.StringIO('{"type":"x","v":1,"ü":"é"}\n')))
    assert recs == [{"type": "x", "v": 1, "ü": "é"}]


def test_emitter_writes_one_flushed_line_per_record_with_type_v_session():
    out = io.BytesIO()
    em = Emitter(out, stage="t", json=True, session="S1")
    em.emit(make("vm", name="a b ' ..", extra={"k": [1]}))
    em.passthrough({"type": "unknown-kind", "v": 7, "x": 1})
    lines = out.getvalue().splitlines()
    first = orjson.loads(lines[0])
    assert list(first)[:3] == ["type", "v", "session"]
    assert first["v"] == RECORD_VERSION and first["session"] == "S1"
    assert first["name"] == "a b ' .."
    # pass-through is byte-for-byte what came in, no session stamped on it
    assert orjson.loads(lines[1]) == {"type": "unknown-kind", "v": 7, "x": 1}


def test_emitter_to_text_stream():
    out = io.StringIO()
    Emitter(out, stage="t", json=True).emit(make("vm", name="é"))
    assert orjson.loads(out.getvalue()) == {"type": "vm", "v": RECORD_VERSION, "name": "é"}


def test_exit_code_tally():
    em = Emitter(io.BytesIO(), stage="t", json=True)
    assert em.exit_code() == Exit.OK
    em.emit(make("backup", vm="a"))
    em.error(VmError("gone", vm="b"))
    assert em.exit_code() == Exit.PARTIAL
    only_errors = Emitter(io.BytesIO(), stage="t", json=True)
    only_errors.error(VmError("gone", vm="b"))
    assert only_errors.exit_code() == Exit.VM
    # errors flowing through from an earlier stage count too
    only_errors.passthrough({"type": "error", "v": 1, "code": 4})
    assert only_errors.exit_code() == Exit.GENERAL


def test_error_record_fields():
    out = io.BytesIO()
    em = Emitter(out, stage="vmbk-x", json=True, session="S")
    em.error(VmError("VM 'a' not found", vm="a"))
    rec = orjson.loads(out.getvalue())
    assert rec == {
        "type": "error", "v": RECORD_VERSION, "session": "S", "stage": "vmbk-x",
        "vm": "a", "kind": "vm", "code": 5, "message": "VM 'a' not found",
    }


def test_table_mode_collects_and_renders():
    out = io.StringIO()
    em = Emitter(out, stage="t", json=False)
    em.emit(make("vm", name="web", state="running", policy="daily", disks=[{}, {}], excluded=False))
    assert out.getvalue() == ""
    em.close()
    text = out.getvalue()
    assert "NAME" in text and "web" in text and "running" in text and "\n" in text
    assert "{" not in text


def test_session_ids_sort_and_differ():
    a, b = new_session_id(), new_session_id()
    assert a != b and len(a) == len("20261122T035454Z-467969c8")


def test_a_runaway_line_is_refused_without_reading_it_all(monkeypatch):
    import vmbk.records as records

    monkeypatch.setattr(records, "MAX_LINE", 1000)
    stream = io.BytesIO(b'{"type":"x","v":1}\n' + b" " * 5000 + b"\n")
    it = read_records(stream)
    assert next(it)["type"] == "x"
    with pytest.raises(InputError, match="line 2: record longer than 1000"):
        next(it)
    assert stream.tell() < 3000


# -- contract versions (vmbk-json(7), "Versions") ------------------------------


def test_a_consumed_record_of_an_unknown_version_is_refused():
    lines = [b'{"type":"vm","v":1,"name":"a"}\n', b'{"type":"vm","v":2,"name":"b"}\n']
    it = read_records(lines, understood={"vm"})
    assert next(it)["name"] == "a"
    with pytest.raises(InputError) as e:
        next(it)
    assert e.value.code == Exit.USAGE and e.value.vm is None
    assert "line 2" in str(e.value) and "vm record of contract version 2" in str(e.value)


@pytest.mark.parametrize("v", [0, -1, RECORD_VERSION + 1])
def test_every_unknown_version_is_refused(v):
    with pytest.raises(InputError, match=f"version {v}"):
        list(read_records([orjson.dumps({"type": "plan", "v": v}) + b"\n"], understood={"plan"}))


def test_records_of_other_types_pass_whatever_their_version():
    line = b'{"type":"vm","v":2,  "name": "b"}\n'
    (rec,) = read_records([line], understood={"plan"})
    assert rec == {"type": "vm", "v": 2, "name": "b"} and rec.raw == line


def test_a_record_carried_by_a_consumed_one_is_checked_too():
    line = orjson.dumps({"type": "plan", "v": 1, "name": "a", "vm": {"type": "vm", "v": 3, "name": "a"}}) + b"\n"
    with pytest.raises(InputError, match=r"plan\.vm record of contract version 3"):
        list(read_records([line], understood={"plan"}))
    # objects that are not records (no "v") are not
    ok = orjson.dumps({"type": "vm", "v": 1, "firmware": {"type": "uefi"}}) + b"\n"
    assert len(list(read_records([ok], understood={"vm"}))) == 1


def test_a_record_without_v_is_hand_written_and_of_the_current_version():
    (rec,) = read_records([b'{"type":"vm","name":"a"}\n'], understood={"vm"})
    assert rec["name"] == "a"


def test_a_boolean_v_is_not_a_version():
    with pytest.raises(InputError, match="'v' must be an integer"):
        list(read_records([b'{"type":"vm","v":true}\n']))


def test_input_cut_in_the_middle_of_a_record_says_so():
    with pytest.raises(InputError) as e:
        list(read_records([b'{"type":"vm","v":1}\n', b'{"type":"vm","v":1,"na']))
    assert "line 2" in str(e.value) and "ends in the middle of a record" in str(e.value)
    # a last record without its newline is whole: accepted
    assert len(list(read_records([b'{"type":"vm","v":1}']))) == 1
