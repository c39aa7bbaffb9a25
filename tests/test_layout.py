"""The package's shape: imports point down the layers of DESIGN.md, never up, never in circles."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer or a lower one, never a higher one.
LAYERS = [
    ["kvcli", "kvcli.errors"],
    ["kvcli.documents", "kvcli.prompts", "kvcli.cache", "kvcli.attention", "kvcli.kernels"],
    ["kvcli.precision", "kvcli.plain", "kvcli.models"],
    ["kvcli.compress", "kvcli.generate", "kvcli.fastpath", "kvcli.citations"],
    ["kvcli.store"],
    ["kvcli.api"],
    ["kvcli.eval", "kvcli.serve"],
    ["kvcli.cli", "kvcli.benchmarks"],
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["kvcli", "kernels", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    files = list((ROOT / "kvcli").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
    return {module_name(p): p for p in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """kvcli modules imported anywhere in the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.startswith("kvcli"):
                found.add(name)
    return found


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            # "kvcli" is the package itself: every module below it must be listed on its own
            inside = name.startswith(prefix + ".") and prefix != "kvcli"
            if (name == prefix or inside) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS"
    return best


GRAPH = {name: imports_of(path, set(modules())) - {name} for name, path in modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(name):
    upward = sorted(dep for dep in GRAPH[name] if dep != "kvcli" and layer_of(dep) > layer_of(name))
    assert not upward, f"{name} (layer {layer_of(name)}) imports higher layers: {upward}"


def test_no_import_circles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in GRAPH.get(node, ()):
            if dep == "kvcli" or dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: a store module importing the api is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from kvcli.api import ask\n")
    deps = imports_of(bad, set(GRAPH))
    assert deps == {"kvcli.api"}
    assert layer_of("kvcli.api") > layer_of("kvcli.store.persist")
