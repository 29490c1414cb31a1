"""The layers import downward only: no module cycles, no upward import, no project import hidden in a function.

Layers, lowest first (README, "Architecture"); a module may import its own layer's package and lower layers:
  0 bench.base       errors, registry, typed fields, hashing and atomic files
  1 bench.measure    metrics, conformal, calibration, MACs         datasets (loaders; bench.base only)
  2 bench.core       task, the method contract, operating points, conformance checks
  3 bench.backbones  network plugins
  4 methods          method plugins
  5 bench.results    tidy files, summary, report, plots
  6 bench.pipeline   configuration, task loading, orchestration, evaluation, executors, real runner
  7 bench.cli, then 8 bench.__main__ and bench.gpu_check (the device check)
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods", "datasets")
LAYERS = [("bench.base", 0), ("bench.measure", 1), ("datasets", 1), ("bench.core", 2), ("bench.backbones", 3),
          ("methods", 4), ("bench.results", 5), ("bench.pipeline", 6), ("bench.cli", 7), ("bench.__main__", 8),
          ("bench.gpu_check", 8),  # the device check: drives the CLI and the pipeline, imported by nothing
          ("bench", 0)]  # the bench package itself (an empty __init__)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def group(module: str) -> tuple[str, int]:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README)")


def _targets(node: ast.AST, current: str, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = current.split(".")
            if not mods[current].name == "__init__.py":
                parts = parts[:-1]
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in mods and name != current:
            out.append(name)
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> project modules it imports, and the project imports placed inside functions."""
    mods = modules()
    edges, inner = {}, []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        edges[name] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for t in _targets(node, name, mods)}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(node, name, mods):
                        inner.append(f"{name}.{fn.name} imports {', '.join(_targets(node, name, mods))}")
    return edges, inner


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycles():
    edges, _ = import_graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_layers_import_downward_only():
    edges, _ = import_graph()
    bad = []
    for a, targets in edges.items():
        ga, ra = group(a)
        for b in targets:
            gb, rb = group(b)
            if gb != ga and rb >= ra and gb != "bench":
                bad.append(f"{a} (layer {ra}) imports {b} (layer {rb})")
    assert not bad, "\n".join(bad)


def test_datasets_use_only_the_base_layer():
    edges, _ = import_graph()
    bad = [f"{a} imports {b}" for a, ts in edges.items() if a.startswith("datasets")
           for b in ts if not (b.startswith("datasets") or b.startswith("bench.base"))]
    assert not bad, bad


def test_no_project_import_inside_a_function():
    _, inner = import_graph()
    assert not inner, "\n".join(inner)


def test_the_checker_finds_cycles_and_upward_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert group("bench.pipeline.run") == ("bench.pipeline", 6) and group("methods.jeidnn") == ("methods", 4)
    assert group("bench.base.errors")[1] < group("datasets._base")[1] < group("bench.core.task")[1]
