"""Read vmbackup's configuration files without running them.

vmbackup's instance files (``vmbackup.conf``, ``vm_overrides.conf``, ...)
are bash that vmbackup.sh ``source``s as root.  The importer reads them
instead, for the shapes its manual and templates use, so that importing a
configuration never runs a command in it:

    NAME=value    NAME="value"   NAME='value'   export NAME=value
    NAME+=("a" "b")   NAME=()   NAME=("a")      (arrays)
    MAP["key"]="value"   MAP[key]=value         (associative arrays)
    declare -gA MAP   declare -A MAP            (no value: ignored)
    # comments, blank lines, a "#!" line

Double-quoted and bare words expand ``$NAME`` and ``${NAME}`` from what
the files assigned before (``${NAME:-default}`` too).  Anything else -- a
command substitution, an ``if``, a function, an expansion of a name no file
set -- is returned as a `Skipped` line with the reason, so the importer can
say what it did not carry over instead of guessing.
"""

from __future__ import annotations

import dataclasses
import re

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_ASSIGN = re.compile(rf"^(?P<name>{_NAME})(?:\[(?P<key>[^\]]*)\])?(?P<op>\+?=)")
_DECLARE = re.compile(rf"^(?:declare|typeset|local|readonly|export)((?:\s+-[A-Za-z]+)*)\s+(?={_NAME})")
_BARE_DECLARE = re.compile(rf"^(?:declare|typeset|local|readonly|export)(?:\s+-[A-Za-z]+)*(?:\s+{_NAME})+\s*(?:#.*)?$")
_EXPANSION = re.compile(rf"\$(?:\{{(?P<braced>{_NAME})(?::-(?P<default>[^}}]*))?\}}|(?P<plain>{_NAME}))")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One assignment: a string, an array (list), or one key of a map."""

    name: str
    value: str | list[str]
    file: str
    line: int
    key: str | None = None


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A line that is not one of the shapes above."""

    file: str
    line: int
    text: str
    why: str


class _NotPlain(Exception):
    pass


class ShellConf:
    """The settings of several files read in order (later ones see earlier values)."""

    def __init__(self) -> None:
        self.scalars: dict[str, Setting] = {}
        self.arrays: dict[str, Setting] = {}
        self.maps: dict[str, dict[str, Setting]] = {}
        self.skipped: list[Skipped] = []

    def value(self, name: str) -> str | None:
        s = self.scalars.get(name)
        return s.value if s is not None and isinstance(s.value, str) else None

    def read(self, text: str, file: str) -> None:
        for number, line in _logical_lines(text):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            try:
                self._line(stripped, file, number)
            except _NotPlain as e:
                self.skipped.append(Skipped(file, number, stripped, str(e)))

    def _line(self, line: str, file: str, number: int) -> None:
        if _BARE_DECLARE.match(line):
            return
        m = _DECLARE.match(line)
        if m:
            line = line[m.end():]
        m = _ASSIGN.match(line)
        if not m:
            raise _NotPlain("not an assignment")
        name, key, op = m.group("name"), m.group("key"), m.group("op")
        rest = line[m.end():]
        if rest.startswith("("):
            if key is not None:
                raise _NotPlain("an array as a map's value")
            words, rest = self._words(rest[1:], file, until=")")
            _end(rest)
            old = self.arrays.get(name)
            items = (list(old.value) if op == "+=" and old else []) + words
            self.arrays[name] = Setting(name, items, file, number)
            return
        words, rest = self._words(rest, file, until=None, at_most=1)
        _end(rest)
        value = words[0] if words else ""
        if key is not None:
            mkey, _ = self._words(key, file, until=None, at_most=1)
            self.maps.setdefault(name, {})[mkey[0] if mkey else ""] = Setting(name, value, file, number, key=mkey[0] if mkey else "")
            return
        if op == "+=":
            if name in self.arrays:  # ARR+=value appends to element 0 in bash; not a shape vmbackup uses
                raise _NotPlain("+= on an array without parentheses")
            old_value = self.value(name) or ""
            value = old_value + value
        self.scalars[name] = Setting(name, value, file, number)

    def _words(self, text: str, file: str, *, until: str | None, at_most: int | None = None) -> tuple[list[str], str]:
        """Shell words from ``text`` up to ``until`` (or the end); the rest after it."""
        words: list[str] = []
        i, n = 0, len(text)
        while True:
            while i < n and text[i] in " \t":
                i += 1
            if i >= n:
                if until:
                    raise _NotPlain(f"no closing {until!r}")
                return words, ""
            if until and text[i] == until:
                return words, text[i + 1:]
            if text[i] == "#" or (at_most is not None and len(words) >= at_most):
                return words, text[i:]
            word, i = self._word(text, i, until)
            words.append(word)

    def _word(self, text: str, i: int, until: str | None) -> tuple[str, int]:
        out: list[str] = []
        n = len(text)
        while i < n and text[i] not in " \t" and text[i] != until:
            c = text[i]
            if c == "'":
                j = text.find("'", i + 1)
                if j < 0:
                    raise _NotPlain("unterminated quote")
                out.append(text[i + 1:j])
                i = j + 1
            elif c == '"':
                j = i + 1
                while j < n and text[j] != '"':
                    if text[j] == "\\" and j + 1 < n and text[j + 1] in '$`"\\':
                        out.append(text[j + 1])
                        j += 2
                    elif text[j] == "`":
                        raise _NotPlain("command substitution")
                    elif text[j] == "$":
                        value, j = self._dollar(text, j)
                        out.append(value)
                    else:
                        out.append(text[j])
                        j += 1
                if j >= n:
                    raise _NotPlain("unterminated quote")
                i = j + 1
            elif c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
            elif c in ";&|<>`(){}":
                raise _NotPlain(f"shell syntax {c!r}")
            elif c == "$":
                value, i = self._dollar(text, i)
                out.append(value)
            else:
                out.append(c)
                i += 1
        return "".join(out), i

    def _dollar(self, text: str, i: int) -> tuple[str, int]:
        """The value of ``$NAME``, ``${NAME}`` or ``${NAME:-default}`` at ``text[i]``."""
        m = _EXPANSION.match(text, i)
        if not m:
            raise _NotPlain("an expansion other than $NAME or ${NAME}")
        name = m.group("braced") or m.group("plain")
        value = self.value(name)
        if m.group("default") is not None and not value:
            return m.group("default"), m.end()
        if value is None:
            raise _NotPlain(f"${name} is not set in these files")
        return value, m.end()


def _end(rest: str) -> None:
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise _NotPlain(f"more after the value: {rest[:30]!r}")


_OPEN_ARRAY = re.compile(rf"^\s*(?:(?:declare|typeset|local|readonly|export)(?:\s+-[A-Za-z]+)*\s+)?{_NAME}\+?=\([^)]*$")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with backslash-newline continuations and arrays written over
    several lines joined, each with its first line's number."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    in_array = False
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
            in_array = bool(_OPEN_ARRAY.match(line)) and not line.lstrip().startswith("#")
        elif in_array and ")" in line:
            in_array = False
        if line.endswith("\\") and not line.lstrip().startswith("#"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        if in_array:
            pending.append(" ")
            continue
        out.append((start, "".join(pending)))
        pending = []
    if pending:
        out.append((start, "".join(pending)))
    return out


def patterns_file(text: str) -> list[str]:
    """``fstrim_exclude.conf``: one glob per line, as vmbackup reads it
    (``sed 's/#.*//' | xargs``: from ``#`` on is a comment, blanks trimmed)."""
    out = []
    for line in text.splitlines():
        pattern = line.split("#", 1)[0].strip()
        if pattern:
            out.append(pattern)
    return out
