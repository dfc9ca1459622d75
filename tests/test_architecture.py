"""The package's layers (docs/architecture.md): no import cycles, no import pointing up a layer.

The imports are read from the source with ``ast`` — every ``import`` and ``from ... import``,
including those inside functions and under ``TYPE_CHECKING`` (a cycle hidden behind a lazy import is
still a cycle for a reader) — so nothing is executed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "ctrl_csc"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# What each layer (a subpackage of ctrl_csc) may import besides itself. Lowest first: the math
# (nn, losses) and the data; models on nn; eval measures models; the engine runs the game;
# pretrained builds released models; the command line puts them together; repro runs the
# command line's experiments. "entry" is the package itself (ctrl_csc/__init__.py: the Python
# API's load_pretrained); there are no other top-level modules: the ways in are the console
# scripts and ``python -m ctrl_csc.cli.train`` / ``ctrl_csc.cli.evaluate`` (test below).
ALLOWED: dict[str, set[str]] = {
    "nn": set(),
    "losses": set(),
    "data": set(),
    "models": {"nn"},
    "eval": {"nn", "models"},
    "engine": {"nn", "losses", "models", "eval"},
    "pretrained": {"nn", "data", "models", "engine"},
    "cli": {"nn", "losses", "data", "models", "eval", "engine", "pretrained"},
    "repro": {"nn", "losses", "data", "models", "eval", "engine", "pretrained", "cli"},
    "entry": {"nn", "losses", "data", "models", "eval", "engine", "pretrained", "cli", "repro"},
}

# Imports that point up a layer today, each with why it is still there. The test fails when one
# of them disappears, so that the exception is removed with it.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (a package counts as its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub where there is one
            targets = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            targets = targets or [module]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    return "entry" if len(parts) == 1 else parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_layer_is_listed(graph):
    assert {layer(m) for m in graph} <= set(ALLOWED)


def test_the_ways_in_are_the_console_scripts_and_the_cli_modules():
    # one home per command: no top-level module beside the package's __init__ (a file
    # ctrl_csc/<name>.py would be a second name for a cli/ module, as train.py/evaluate.py were)
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py"]
    pyproject = (ROOT.parent / "pyproject.toml").read_text()  # (no tomllib on Python 3.10)
    section = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))
    assert scripts == {
        "ctrl-csc-train": "ctrl_csc.cli.train:main",
        "ctrl-csc-eval": "ctrl_csc.cli.evaluate:main",
        "ctrl-csc-repro": "ctrl_csc.repro.__main__:main",
    }
    for command in ("train", "evaluate"):  # python -m ctrl_csc.cli.<command> runs main()
        tree = ast.parse((ROOT / "cli" / f"{command}.py").read_text())
        guards = [ast.unparse(n) for n in tree.body if isinstance(n, ast.If)]
        assert "if __name__ == '__main__':\n    main()" in guards, command


def test_no_import_points_up_the_layers(graph):
    upward = {
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if layer(t) != layer(m) and layer(t) not in ALLOWED[layer(m)]
    }
    unexplained = sorted(upward - set(EXCEPTIONS))
    assert not unexplained, "imports pointing up the layers (docs/architecture.md): " + ", ".join(
        f"{m} -> {t}" for m, t in unexplained
    )
    stale = sorted(set(EXCEPTIONS) - upward)
    assert not stale, f"exceptions no longer needed, remove them from EXCEPTIONS: {stale}"


def test_no_import_cycles(graph):
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_parser_sees_lazy_and_type_checking_imports(graph):
    # the two kinds of import the layer rules must not miss
    assert "ctrl_csc.engine.game" in graph["ctrl_csc.engine.steps"]  # under TYPE_CHECKING
    assert "ctrl_csc.eval.visualize" in graph["ctrl_csc.engine.trainer"]  # inside a method
