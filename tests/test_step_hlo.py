"""The compiled decode step reads the KV pool in place: no copy of a layer's pool per step.

With one KV head per device, an earlier attention op wrote through a token-major reshape of
the pool; XLA:CPU laid that reshape out with the head axis moved and copied each layer's whole
pool back, twice a step (a tp=2 decode step of the 55M model took 388 ms against 51 ms
without the copies)."""

import re

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.bench.steps import decode_step_inputs
from jaxserve.package_data import embedded_model


def _pool_copies(llm) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    inputs = decode_step_inputs(llm, 2, 24, 8, params)
    hlo = llm.runner.compiled_step(inputs).as_text()
    layer = llm.runner.kv.layer(0)["k"]
    local = list(layer.sharding.shard_shape(layer.shape))
    pool = rf"\[{','.join(map(str, local))}\]"
    assert re.search(rf"= f32{pool}", hlo), "the pool's shape is not in the program"
    return [line.strip() for line in hlo.splitlines()
            if re.search(rf"= \w+{pool}\S* copy\(", line)]


@pytest.mark.parametrize("mesh", [None, "tp=2"])
def test_decode_step_copies_no_layer_pool(mesh):
    kwargs = {"mesh": mesh, "rules": "tp"} if mesh else {}
    llm = LLM(embedded_model(), compilation="on_use", **kwargs)
    copies = _pool_copies(llm)
    assert not copies, copies[:3]
