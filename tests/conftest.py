"""Test setup: 8 simulated CPU devices (set before jax is imported) and tiny HF reference models.

Every fixture model is a random HF transformers model saved with `save_pretrained` and converted
with our converter, so each test compares jaxserve against the reference implementation.
"""

import atexit
import os
import shutil
import tempfile

# LLVM at -O0: the suite checks what the programs compute, not how fast they run, and most of
# its time is compiling tiny programs. The HLO passes (fusion, layout, sharding) are the same at
# every backend level and floating-point semantics are strict at each, so the numbers are too.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs go to a cache of this run's own, never the user's (CLI and server
# subprocesses inherit it). Engines compile each program when a step first needs it: a
# background warm-up for every engine the suite builds would multiply its compile time.
# tests/test_compile.py tests the defaults themselves.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxserve-test-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAXSERVE_COMPILATION_CACHE"] = _XLA_CACHE
os.environ["JAXSERVE_COMPILATION"] = "on_use"

import pytest  # noqa: E402

from tests.hf_models import HF_CONFIGS, make_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """family name -> (HF directory, converted jaxserve directory), built once per session."""
    from jaxserve.checkpoint import convert_hf

    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            hf_dir = make_hf_model(name, root / "hf")
            convert_hf(hf_dir, root / "jaxserve", dtype="float32")
            cache[name] = (hf_dir, root / "jaxserve")
        return cache[name]

    return get


def pytest_collection_modifyitems(config, items):
    assert set(HF_CONFIGS)  # the fixture models exist
