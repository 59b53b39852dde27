"""The direction of imports (DESIGN, "Layout"; docs/architecture.md, "Layers").

commands -> orchestration (one package per command) -> formats and facts
(tree, stream, policy, nbd, virt, catalogue) -> base.  No import goes up,
no command imports another, and orchestration packages do not reach
sideways into each other (the one exception: vmbk-backup's standalone
mode plans through discover and the planner, as the pipe would).  A new
package fails this test until it is placed in `LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "vmbk"

#: Each top-level unit of vmbk/ (package or module) and its layer, bottom first.
LAYERS: dict[str, int] = {
    # base: no vmbk imports but each other
    "vmbk": 0, "errors": 0, "clock": 0, "fsutil": 0, "heap": 0, "cancel": 0, "settings": 0,
    "records": 0, "lock": 0, "progress": 0, "human": 0, "procs": 0,
    # formats and facts: what the tree, the streams, libvirt and the catalogue hold; pure decisions
    "nbd": 1, "stream": 1, "tree": 1, "policy": 1, "catalogue": 1, "virt": 1, "config": 1, "vmbackup": 1, "disklabel": 1, "runmarker": 1,
    "manifest": 1,
    # orchestration: one package (or module) per command
    "discover": 2, "planner": 2, "backup": 2, "restore": 2, "rotate": 2, "replicate": 2, "status": 2,
    "report": 2, "drill": 2,
    # presentation and the command layer
    "table": 3, "output": 3, "cli": 3, "commands": 4,
}
#: Orchestration that may use another's (same layer): the standalone backup plans as the pipe would;
#: a drill restores with the restore library (plan, images, clone XML, TPM), as a restore would.
SIDEWAYS = {("backup", "discover"), ("backup", "planner"), ("drill", "restore")}
#: Below the command layer but programs of their own, or naming the program.
ARGV_ALLOWED = {
    "vmbk.virt.guard": "a process of its own (python -m vmbk.virt.guard), not a library module",
    "vmbk.virt.hold": "names the program that holds a VM in its marker (sys.argv[0])",
}
#: Command modules any command may use.
COMMAND_HELPERS = {"_common", "_stage"}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in out if n == "vmbk" or n.startswith("vmbk.")}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vmbk"


def _units() -> set[str]:
    return {p.stem if p.is_file() else p.name for p in PKG.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}


def test_every_unit_has_a_layer():
    unplaced = sorted(_units() - set(LAYERS))
    assert not unplaced, f"place {unplaced} in LAYERS of {__file__}"


def test_no_import_goes_up_or_sideways():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module(path)
        src = _unit(mod)
        for name in sorted(_imports(path)):
            dst = _unit(name)
            if dst == src or dst not in LAYERS or name in ("vmbk.__version__", "vmbk.RECORD_VERSION"):
                continue
            if LAYERS[dst] > LAYERS[src]:
                bad.append(f"{mod} imports {name}: up from layer {LAYERS[src]} to {LAYERS[dst]}")
            elif LAYERS[dst] == LAYERS[src] == 2 and (src, dst) not in SIDEWAYS:
                bad.append(f"{mod} imports {name}: sideways between orchestration packages")
    assert not bad, "\n".join(bad)


def test_no_command_imports_another():
    bad = []
    for path in sorted((PKG / "commands").glob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["vmbk", "commands"] and len(parts) > 2 and parts[2] not in COMMAND_HELPERS:
                bad.append(f"commands/{path.name} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_below_the_command_layer_parses_argv_or_exits():
    """STYLE 3: docopt and sys.exit live in the command layer (cli.py runs docopt)."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module(path)
        if _unit(mod) in ("commands", "cli") or mod in ARGV_ALLOWED:
            continue
        text = path.read_text()
        for needle in ("import docopt", "from docopt", "sys.exit(", "sys.argv"):
            if needle in text:
                bad.append(f"{mod}: {needle}")
    assert not bad, "\n".join(bad)
