"""The package layout (issue 25): no import circle among the project's modules, the library
never imports the training program (``train``) nor its own test helpers, and a function-level
import of a project module says why it is not at module level.

The import graph is read from the source with ``ast`` (nothing is imported). Importing
``a.b.c`` also imports the packages ``a.b`` and ``a`` (their ``__init__``), so those are edges
too: a subpackage whose ``__init__`` re-exports its modules cannot sit in a circle either.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("jaxarith", "train")


def _modules() -> dict[str, str]:
    mods = {}
    for top in PROJECT:
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _with_packages(name: str) -> list[str]:
    out = [name]
    while "." in name:
        name = name.rpartition(".")[0]
        out.append(name)
    return out


def _imports(module: str) -> list[tuple[ast.stmt, list[str], bool]]:
    """(statement, project modules it imports, inside a function?) for every import."""
    path = MODULES[module]
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    in_func: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_func.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        targets = [_resolve(n) for n in names if n.split(".")[0] in PROJECT]
        if targets:
            out.append((node, targets, id(node) in in_func))
    return out


def _graph() -> dict[str, set[str]]:
    """Module-level import edges, including the packages each import initialises."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for _, targets, local in _imports(m):
            if local:
                continue
            for t in targets:
                graph[m].update(p for p in _with_packages(t)
                                if p != m and not m.startswith(p + "."))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_library_never_imports_train_or_its_test_helpers():
    bad = []
    for m in MODULES:
        if not m.startswith("jaxarith.") or m.startswith("jaxarith.testing"):
            continue
        for node, targets, _ in _imports(m):
            for t in targets:
                if t.startswith("train") or t.startswith("jaxarith.testing"):
                    bad.append(f"{m}:{node.lineno} imports {t}")
    assert bad == []


def _says_why(lines: list[str], node: ast.stmt, block_start: int) -> bool:
    """A comment at the end of the import, or on the line above its block of imports."""
    if "#" in lines[node.lineno - 1]:
        return True
    above = lines[block_start - 2].strip() if block_start >= 2 else ""
    return above.startswith("#")


def test_function_level_imports_of_the_project_say_why():
    bad = []
    for m, path in MODULES.items():
        lines = open(path).read().splitlines()
        local = sorted((node.lineno, node) for node, _, is_local in _imports(m) if is_local)
        for lineno, node in local:
            start = lineno  # the first line of the contiguous block of imports it is in
            while start >= 2 and lines[start - 2].strip().startswith(("import ", "from ")):
                start -= 1
            if not _says_why(lines, node, start):
                bad.append(f"{os.path.relpath(path, ROOT)}:{lineno}: {lines[lineno - 1].strip()}")
    assert bad == [], "a function-level import of a project module needs a comment saying why"


@pytest.mark.parametrize("package", ["arith", "average", "data", "decode", "distill", "eval",
                                     "io", "models", "testing"])
def test_subpackages_have_a_documented_public_init(package):
    path = os.path.join(ROOT, "jaxarith", package, "__init__.py")
    tree = ast.parse(open(path).read())
    assert ast.get_docstring(tree), f"jaxarith/{package}/__init__.py has no docstring"


def test_every_module_imports():
    """Moves leave no stale import path behind (a module the suite never imports would hide
    one)."""
    import importlib

    for name in sorted(MODULES):
        if name.endswith("__main__") or name == "train.demo":
            continue
        importlib.import_module(name)
