"""The package's layering, checked on its import graph (every import, function-level ones too).

Imports only point down this list (ARCHITECTURE.md draws it); modules of one layer may import
each other, but no set of modules imports itself in a circle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxserve"

LAYERS = [  # lowest first; a module's layer is that of its longest listed prefix
    ("base", ["jaxserve", "jaxserve.config", "jaxserve.settings", "jaxserve.rules",
              "jaxserve.sharding", "jaxserve.placement", "jaxserve.kv_cache", "jaxserve.flops",
              "jaxserve.sampling_params", "jaxserve.outputs", "jaxserve.package_data",
              "jaxserve.perf", "jaxserve.text", "jaxserve.token_tree"]),
    ("ops", ["jaxserve.ops"]),
    ("models", ["jaxserve.models"]),
    ("runtime", ["jaxserve.runtime", "jaxserve.checkpoint"]),
    ("engine", ["jaxserve.engine"]),
    ("api", ["jaxserve.api"]),
    ("front ends", ["jaxserve.serving", "jaxserve.offline"]),
    ("entry points", ["jaxserve.bench", "jaxserve.cli"]),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports (`from a import b` counts a.b when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} belongs to no layer: add it to LAYERS"
    return rank


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_point_down():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in GRAPH.items() for b in sorted(targets)
              if _layer(b) > _layer(a) and not (a == "jaxserve" and b.startswith("jaxserve."))]
    assert not upward, "\n".join(upward)


def test_models_never_import_the_engine_or_the_server():
    for a, targets in GRAPH.items():
        if a.startswith("jaxserve.models"):
            assert not {t for t in targets if t.startswith(("jaxserve.engine", "jaxserve.runtime",
                                                            "jaxserve.serving", "jaxserve.api"))}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    # package __init__ modules re-export from below them and are left out, as importing a
    # submodule imports its package first anyway
    graph = {a: {b for b in t if MODULES[b].name != "__init__.py"} for a, t in GRAPH.items()}
    assert _circles(graph) == []


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_thin_commands(script):
    text = script.read_text()
    assert "sys.path" not in text
    assert len(text.splitlines()) <= 150, f"{script.name}: move its logic into jaxserve.bench"
