"""The measurement package as library code: it imports without jax or the optional peers (so a
benchmark can still choose its devices after parsing its arguments), nothing below it imports
it, and every script is a thin command over it."""

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import jaxserve.bench

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxserve.bench.__path__))
# the training recipes (the tiny model's, the draft's distillation) are jax code from their
# first line; nothing sets devices before they run
IMPORTS_JAX = {"training", "draft_training"}


def run(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(REPO), **env}, check=True)


def test_importing_the_benchmarks_imports_no_jax_torch_or_matplotlib():
    light = [m for m in MODULES if m not in IMPORTS_JAX]
    assert {"offline", "serving", "tp_sweep", "sampling", "moe", "prefix"} <= set(light)
    out = run("import importlib, sys\n"
              f"for m in {light!r}: importlib.import_module('jaxserve.bench.' + m)\n"
              "print(sorted(k for k in ('jax', 'torch', 'transformers', 'matplotlib') "
              "if k in sys.modules))")
    assert out.stdout.strip() == "[]"


def test_simulated_devices_are_set_before_jax_and_a_given_count_wins():
    code = ("from jaxserve.bench.devices import simulate_cpu_devices\n"
            "simulate_cpu_devices({n}, cpu_only=True)\n"
            "import jax; print(len(jax.devices()), jax.default_backend())")
    assert run(code.format(n=3)).stdout.split() == ["3", "cpu"]
    given = run(code.format(n=3), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert given.stdout.split() == ["2", "cpu"]
    late = ("import jax\nfrom jaxserve.bench.devices import simulate_cpu_devices\n"
            "simulate_cpu_devices(4)\nimport os; print(os.environ.get('XLA_FLAGS'))")
    assert run(late, JAX_PLATFORMS="cpu").stdout.strip() == "None"  # too late: left alone


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_nothing_below_the_package_imports_it():
    users = [p.relative_to(REPO) for p in (REPO / "jaxserve").rglob("*.py")
             if "bench" not in p.relative_to(REPO / "jaxserve").parts[:1]
             and any(n.startswith("jaxserve.bench") for n in imported_modules(p))]
    assert users == []


def test_scripts_are_thin_commands_over_the_package():
    for script in sorted((REPO / "scripts").glob("*.py")):
        text = script.read_text()
        assert "sys.path" not in text, script.name
        assert len(text.splitlines()) < 150, script.name
        if script.name != "generate_batch.py":  # that one is `jaxserve generate`
            assert any(n.startswith("jaxserve.bench") for n in imported_modules(script)), \
                script.name
