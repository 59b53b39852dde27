"""A stage's output (vmbk.output): a reader that goes away, pass-through as
read, the tally of error records whatever they hold."""

import io

import orjson
import pytest

from vmbk.errors import Exit, VmError
from vmbk.output import Emitter, OutputClosed
from vmbk.records import make, read_records


class ClosingPipe(io.BytesIO):
    """A pipe whose reader takes ``keep`` writes, then goes away (EPIPE)."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep

    def write(self, data):
        if self.keep <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.keep -= 1
        return super().write(data)


def test_a_stage_that_changes_state_goes_on_and_names_what_was_not_delivered():
    out, err = ClosingPipe(keep=1), io.StringIO()
    em = Emitter(out, stage="vmbk-backup", json=True, changes_state=True, stderr=err)
    em.emit(make("backup", name="a"))
    em.emit(make("backup", name="b"))  # the reader is gone: no exception
    em.passthrough({"type": "note", "v": 1})
    em.emit(make("backup", name="c"))
    em.close()
    assert [orjson.loads(line)["name"] for line in out.getvalue().splitlines()] == ["a"]
    assert em.successes == 3 and em.undelivered_count == 3
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("vmbk-backup: standard output was closed")
    assert lines[-1] == ("vmbk-backup: 3 record(s) not delivered, standard output was closed: "
                         "backup of 'b', note, backup of 'c'")
    # every backup was made, but the run is not complete: general error
    assert em.exit_code() == Exit.GENERAL


def test_failures_keep_their_code_when_records_are_lost_too():
    em = Emitter(ClosingPipe(keep=0), stage="s", json=True, changes_state=True, stderr=io.StringIO())
    em.error(VmError("gone", vm="a"))
    assert em.exit_code() == Exit.VM
    em.emit(make("backup", name="b"))
    assert em.exit_code() == Exit.PARTIAL


def test_only_so_many_undelivered_records_are_named():
    err = io.StringIO()
    em = Emitter(ClosingPipe(keep=0), stage="s", json=True, changes_state=True, stderr=err)
    for i in range(120):
        em.emit(make("backup", name=f"vm{i}"))
    em.close()
    last = err.getvalue().splitlines()[-1]
    assert last.startswith("s: 120 record(s) not delivered") and "'vm49'" in last and "'vm50'" not in last
    assert last.endswith(" and 70 more")


def test_a_read_only_stage_stops_with_the_outcome_so_far():
    err = io.StringIO()
    em = Emitter(ClosingPipe(keep=1), stage="vmbk-plan", json=True, stderr=err)
    em.passthrough({"type": "error", "v": 1, "code": 5})
    with pytest.raises(OutputClosed) as e:
        em.emit(make("plan", name="a"))
    assert e.value.exit_code == Exit.VM
    with pytest.raises(OutputClosed):
        em.emit(make("plan", name="b"))
    em.close()
    assert err.getvalue() == ""


def test_a_closed_terminal_table_is_not_delivered_either():
    class Tty(ClosingPipe):
        def isatty(self):
            return True

    err = io.StringIO()
    em = Emitter(Tty(keep=0), stage="s", changes_state=True, stderr=err)
    em.emit(make("backup", name="a"))
    em.close()
    assert "1 record(s) not delivered" in err.getvalue() and em.exit_code() == Exit.GENERAL


def test_pass_through_is_the_line_as_read():
    line = b'{"type": "note",  "v": 9, "n": 1.50, "x": "\\u00e9"}\n'
    (rec,) = read_records([line])
    out = io.BytesIO()
    Emitter(out, stage="s", json=True, session="S").passthrough(rec)
    assert out.getvalue() == line


@pytest.mark.parametrize("rec, code", [
    ({"type": "error", "v": 1, "code": 4}, Exit.STORAGE),
    ({"type": "error", "v": 1, "code": "4"}, Exit.GENERAL),
    ({"type": "error", "v": 1, "code": True}, Exit.GENERAL),
    ({"type": "error", "v": 1, "code": 0}, Exit.GENERAL),
    ({"type": "error", "v": 1, "code": 77}, Exit.GENERAL),
    ({"type": "error", "v": 1}, Exit.GENERAL),
    ({"type": "error", "v": 2, "code": 4}, Exit.GENERAL),  # code may mean something else in v2
])
def test_an_error_record_always_counts_as_a_failure(rec, code):
    em = Emitter(io.BytesIO(), stage="s", json=True)
    em.passthrough(rec)
    assert em.exit_code() == code
