"""The one wrapper between a command's ``main`` and the process.

Each ``vmbk/commands/<name>.py`` has its docopt usage as module docstring
and calls `run` with a function ``body(args, ctx) -> int``.  `run` is the
only place that turns exceptions into exit codes (the table is in
`vmbk.errors`), prints the one line a person reads on stderr, ends a
read-only stage whose stdout was closed (``| head``) with the outcome so far
(`vmbk.output.OutputClosed`; a stage that changes state goes on without its
reader) and maps signals to 128+N.  The console scripts call
``sys.exit(main())``; nothing else exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import IO, Any

from docopt import DocoptExit, docopt

from vmbk import version_text
from vmbk.errors import Exit, Terminated, UsageError, VmbkError
from vmbk.output import OutputClosed

log = logging.getLogger("vmbk")


@dataclasses.dataclass
class Context:
    """What a command body gets besides its parsed options."""

    prog: str
    stdin: IO[Any]
    stdout: IO[Any]
    stderr: IO[Any]


Body = Callable[[dict[str, Any], Context], int]

_UNMATCHED = re.compile(r"(?:Option\(\S+, '([^']+)'|Argument\(None, '([^']*)'\))")


def _usage_message(prog: str, exc: DocoptExit) -> str:
    """One clear line from docopt's multi-line complaint."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    if first.startswith("Warning: found unmatched"):
        names = [a or b for a, b in _UNMATCHED.findall(first)]
        what = "unknown option or argument" if names else "unexpected arguments"
        detail = f": {' '.join(names)}" if names else ""
        return f"{prog}: {what}{detail} (see {prog} --help)"
    if first and not first.startswith("Usage:"):
        return f"{prog}: {first} (see {prog} --help)"
    return f"{prog}: invalid arguments (see {prog} --help)"


def _wants_help(argv: list[str]) -> bool:
    for a in argv:
        if a == "--":
            return False
        if a in ("-h", "--help"):
            return True
    return False


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _setup_logging(stderr: IO[Any]) -> None:
    level = os.environ.get("VMBK_LOG", "WARNING").upper()
    root = logging.getLogger("vmbk")
    if not root.handlers:
        handler = logging.StreamHandler(stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.WARNING))


def run(
    doc: str,
    body: Body,
    argv: list[str] | None = None,
    stdin: IO[Any] | None = None,
    stdout: IO[Any] | None = None,
    *,
    prog: str,
    stderr: IO[Any] | None = None,
    options_first: bool = False,
) -> int:
    """Parse ``argv`` with ``doc``, run ``body`` and return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    is_process = stdout is sys.stdout
    _setup_logging(stderr)

    try:
        text = None
        if _wants_help(argv[:1] if options_first else argv):
            text = doc.strip() + "\n"
        elif argv == ["--version"]:
            text = f"{prog} {version_text()}\n"
        if text is None:
            return _run(doc, body, argv, Context(prog, stdin, stdout, stderr), options_first)
        try:
            stdout.write(text)
        except BrokenPipeError:  # `--help | head -1`
            pass
        return int(Exit.OK)
    finally:
        if is_process:
            _settle_stdout(stdout)


def _settle_stdout(stdout: IO[Any]) -> None:
    """Flush stdout; when its reader is gone, point fd 1 at /dev/null so
    that the interpreter's final flush of what is left does not complain."""
    try:
        stdout.flush()
    except (BrokenPipeError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def _run(doc: str, body: Body, argv: list[str], ctx: Context, options_first: bool) -> int:
    prog, stderr = ctx.prog, ctx.stderr
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            args = docopt(doc, argv, default_help=False, options_first=options_first)
        except DocoptExit as e:
            raise UsageError(_usage_message(prog, e)) from None
        return int(body(dict(args), ctx))
    except VmbkError as e:
        msg = str(e)
        if not msg.startswith(prog + ":"):
            msg = f"{prog}: {msg}"
        stderr.write(msg + "\n")
        return int(e.code)
    except OutputClosed as e:
        # A read-only stage whose reader went away (`| head`): it changed
        # nothing, so stopping loses nothing; the outcome so far.
        return e.exit_code
    except KeyboardInterrupt:
        stderr.write(f"{prog}: interrupted\n")
        return int(Exit.SIGINT)
    except Terminated:
        stderr.write(f"{prog}: terminated\n")
        return int(Exit.SIGTERM)
    except Exception as e:  # a bug: say so, with the traceback to report
        if e.__class__.__name__ == "libvirtError":
            # Every libvirt call should be wrapped (LibvirtError); one that
            # is not still fails as the external tool it is, not as a crash.
            stderr.write(f"{prog}: libvirt: {e}\n")
            return int(Exit.TOOL)
        stderr.write(f"{prog}: internal error: {e.__class__.__name__}: {e}\n")
        stderr.write(traceback.format_exc())
        return int(Exit.GENERAL)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
