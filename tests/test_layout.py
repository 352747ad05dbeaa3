"""The package's shape: no import cycles, and the layout written in docs/ matches src/diffpolicy/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffpolicy"
LAYOUT_DOC = ROOT / "docs" / "contributing.md"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their __init__.py)."""
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def imports_of(name: str, file: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (module level or inside functions)."""
    is_package = file.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    # `from a import b` names module a.b when it exists, else an attribute of a
    return {t for t in targets if t in known and t != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, file, set(mods)) for name, file in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None. Importing a package's own submodules from its
    __init__ (re-exports) is not a cycle; a submodule importing its parent package is an edge like any."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package's __init__ re-exporting its own submodule
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": set()}) is None


def documented_layout() -> tuple[set[str], set[str]]:
    """(modules, packages) named in the layout block of docs/contributing.md, relative to src/diffpolicy.

    The block is the first fenced block after '## Package layout'; each line's first word is a file
    (`name.py`) or a folder (`name/`), nested by two-space indentation under `src/diffpolicy/`.
    """
    text = LAYOUT_DOC.read_text()
    section = text[text.index("## Package layout") :]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, f"{LAYOUT_DOC}: no layout block under '## Package layout'"
    files, folders, stack = set(), set(), []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        word = line.split()[0]
        if not word.endswith((".py", "/")):
            continue  # a description continued on the next line
        depth = (len(line) - len(line.lstrip())) // 2
        if word == "src/diffpolicy/":
            stack = []
            continue
        stack = stack[: depth - 1]
        path = "/".join([*stack, word.rstrip("/")])
        if word.endswith("/"):
            folders.add(path)
            stack.append(word.rstrip("/"))
        else:
            files.add(path)
    return files, folders


def test_documented_layout_matches_the_package():
    files, folders = documented_layout()
    actual_files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    actual_files |= {"__init__.py"}
    # Task modules are found by name (tasks/__init__.py), so adding one touches no shared file: the layout
    # need not list them (it may list some as examples).
    from diffpolicy.tasks import available_tasks

    task_files = {f"tasks/{name}.py" for name in available_tasks()}
    files |= actual_files & task_files
    actual_folders = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*") if p.is_dir()}
    actual_folders = {f for f in actual_folders if "__pycache__" not in f}
    assert files - actual_files == set(), f"{LAYOUT_DOC} names modules that do not exist"
    assert actual_files - files == set(), f"modules missing from the layout in {LAYOUT_DOC}"
    assert folders == actual_folders, f"{LAYOUT_DOC}'s layout folders differ from src/diffpolicy's"
