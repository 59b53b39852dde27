"""vmbk: backup and restore for libvirt/KVM virtual machines.

The package holds everything the ``vmbk-*`` commands share; see
docs/architecture.md for the map and the direction of dependencies.

``__version__`` is the one place the version is written: pyproject.toml
reads it (``[tool.setuptools.dynamic]``), scripts/build-deb puts it in the
Debian package, scripts/gen-man in the man pages, and ``--version`` prints
it with the git commit when vmbk runs from a checkout (`version_text`).
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

#: Version of the JSON-lines record contract (``"v"`` on every record).
RECORD_VERSION = 1


def version_text() -> str:
    """``0.1.0``, or ``0.1.0 (git 1a2b3c4d5e6f)`` when this package is the
    ``vmbk/`` directory of a git checkout (bin/ or an editable install).

    The commit is read from the checkout's files, not by running git: git
    may be missing, or refuse a repository another user owns.  An installed
    copy (a wheel, the Debian package) has no ``.git`` beside it and says
    the version alone.
    """
    commit = checkout_commit(Path(__file__).resolve().parent.parent)
    return f"{__version__} (git {commit[:12]})" if commit else __version__


def checkout_commit(root: Path) -> str | None:
    """The commit HEAD names in the git checkout at ``root``, or None."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            line = git.read_text().strip()
            if not line.startswith("gitdir:"):
                return None
            git = (root / line.partition(":")[2].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if _is_sha(head) else None
        ref = head.partition(":")[2].strip()
        common = git
        if (git / "commondir").is_file():  # a worktree keeps its refs in the main repository
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                sha = (base / ref).read_text().strip()
                return sha if _is_sha(sha) else None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref and _is_sha(sha):
                    return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)
