"""The package's layers import downward only: no import circle between ccad's rooms (its
subpackages and top-level modules), nor between the app's modules, counting function-level
imports too (issue 15)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import app.controller
import ccad

ROOT = Path(ccad.__file__).parent
APP = Path(app.controller.__file__).parent


def _room(module: str, top: str = "ccad") -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == top and len(parts) > 1 else None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Room -> rooms it imports (``ccad.features.bank`` is room ``features``; ``ccad.pipeline`` is
    ``pipeline``); relative imports resolved against the importing file's package. The rooms are
    those of the package at ``root`` (``ccad`` or ``app``)."""
    top = root.name
    graph: dict[str, set[str]] = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root.parent).with_suffix("").parts
        package = rel[:-1]  # the package a relative import starts from
        if f.name == "__init__.py":
            rel = rel[:-1]
        src = _room(".".join(rel), top)
        if src is None:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" for a in node.names] if module == top else [module]
            else:
                continue
            for t in targets:
                dst = _room(t, top)
                if dst and dst != src:
                    graph.setdefault(src, set()).add(dst)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_it_is_shown(tmp_path):
    pkg = tmp_path / "ccad"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from ..b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from .a import other\n")
    (pkg / "c.py").write_text("import ccad.b\n")
    graph = import_graph(pkg)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"b"}}
    assert circles(graph) == [["a", "b"]]


def test_ccad_has_no_import_circle():
    graph = import_graph()
    assert {"detector", "pipeline", "features", "data", "methods"} <= set(graph)
    assert circles(graph) == []


def test_the_detector_and_the_data_layer_sit_below_what_uses_them():
    graph = import_graph()
    assert "pipeline" not in graph.get("detector", set())
    assert "features" not in graph.get("data", set())
    assert not graph.get("errors")  # exceptions shared by every layer import nothing of ccad


def test_the_app_has_no_import_circle_and_ccad_never_imports_it():
    graph = import_graph(APP)
    assert {"controller", "control", "main", "forms"} <= set(graph)
    assert circles(graph) == []
    # the engine sits below the app: nothing in ccad imports app
    for f in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "app" or n.startswith("app.") for n in names), f


def test_the_apps_lazy_engine_entry_points_exist():
    """The app imports its ``ccad`` entry points on first use: a moved function must fail here,
    not on a user's first click."""
    import importlib

    from app.engine import DEFAULTS, Engine

    assert set(DEFAULTS) <= {f.name for f in dataclasses.fields(Engine)}
    for attr, (module, name) in DEFAULTS.items():
        assert callable(getattr(importlib.import_module(module), name, None)), f"Engine.{attr}: {module}.{name}"


def _imports_of(root: Path) -> list[tuple[Path, int, str, str | None]]:
    """Every ``from X import name`` / ``import X`` of the package at ``root`` (function-level ones
    too) as (file, line, module, name or None), relative imports resolved."""
    top = root.name
    found = []
    for f in sorted(root.rglob("*.py")):
        package = f.relative_to(root.parent).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                if module.split(".")[0] in ("ccad", "app"):
                    found += [(f, node.lineno, module, a.name) for a in node.names if a.name != "*"]
            elif isinstance(node, ast.Import):
                found += [(f, node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] in (top,)]
    return found


def test_every_import_of_a_ccad_or_app_name_resolves():
    """A moved or renamed function fails here, not in a user's session: many imports sit inside
    functions (lazy) or inside ``try: ... except Exception`` (an optional view), where a stale one
    would fail only when reached, or silently."""
    import importlib

    missing = []
    for root in (ROOT, APP):
        for f, line, module, name in _imports_of(root):
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                missing.append(f"{f.relative_to(root.parent)}:{line}: {module} ({exc})")
                continue
            if name is not None and not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")  # a submodule
                except ImportError:
                    missing.append(f"{f.relative_to(root.parent)}:{line}: {module}.{name}")
    assert not missing, "imports that do not resolve:\n" + "\n".join(missing)
