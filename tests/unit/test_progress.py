"""Progress goes to a terminal only, one shared line for parallel copies."""

import io
import threading

from vmbk import progress
from vmbk.progress import board_for


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_nothing_when_not_a_terminal():
    assert board_for(io.StringIO()) is None
    assert board_for(object()) is None


def test_parallel_copies_share_a_line_and_finish_on_their_own(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL", 0)
    out = Tty()
    board = board_for(out)
    a, b = board.callback("web/vda"), board.callback("web/vdb")
    threads = [threading.Thread(target=lambda p=p: [p(i * 1024, 10 * 1024) for i in range(11)]) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.finish()
    text = out.getvalue()
    assert "web/vda 100%" in text and "web/vdb" in text
    assert "\rweb/vda: 10.0 KiB in" in text and text.count("\n") == 1
    b.finish()
    assert out.getvalue().count("\n") == 2
