"""Logits parity with HF transformers on every mesh, and prefill-then-decode through the cache."""

import numpy as np
import pytest

from jaxserve import LLM
from jaxserve.engine.step_builder import QUERY_TILE
from jaxserve.ops.attention import ChunkRow, build_metadata
from tests.hf_models import hf_logits

MESHES = [(None, "tp"), ("tp=2", "tp"), ("tp=4", "tp"), ("tp=8", "tp"), ("dp=2", "dp"),
          ("dp=2,tp=2", "dp_tp")]
PROMPTS = [[1, 5, 9, 200, 3, 77, 400, 12, 8, 8, 8, 31], [7, 3], list(range(2, 47))]


def assert_close_to_reference(ours, ref):
    err = np.max(np.abs(ours - ref))
    assert err <= 1e-4 * np.max(np.abs(ref)), f"max |ours - HF| = {err:.3g}"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
@pytest.mark.parametrize("mesh,rules", MESHES, ids=[m or "single" for m, _ in MESHES])
def test_logits_match_hf(hf_model_dir, family, mesh, rules):
    hf_dir, model_dir = hf_model_dir(family)
    llm = LLM(model_dir, mesh=mesh, rules=rules, dtype="float32")
    ours = llm.logits(PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        assert logits.shape == (len(prompt), 512)
        assert_close_to_reference(logits, hf_logits(hf_dir, prompt))


@pytest.mark.parametrize("mesh", [None, "tp=4"])
def test_prefill_then_decode_matches_full_prefill(hf_model_dir, mesh):
    """A prefill chunk, then one decode row at a time, through scattered blocks of the cache."""
    _, model_dir = hf_model_dir("llama")
    llm = LLM(model_dir, mesh=mesh, rules="tp", block_size=4)
    prompt = PROMPTS[0] + PROMPTS[2][:9]
    full = llm.logits([prompt])[0]
    runner, builder = llm.runner, llm.engine.builder
    n_prefill = 5
    blocks = [3, 7, 1, 9, 2, 11, 4, 5]  # scattered blocks, in table order
    tokens, md, starts = builder.prefill_only([[(prompt[:n_prefill], blocks)]])
    logits = np.asarray(runner.forward(tokens, md))[starts[0][0]:starts[0][0] + n_prefill]
    np.testing.assert_allclose(logits[:, :512], full[:n_prefill], rtol=0, atol=1e-4)
    for pos in range(n_prefill, len(prompt)):  # one token at a time against the cache
        md, _ = build_metadata([([ChunkRow(pos, 1, blocks)], [])], 1, 0, QUERY_TILE, 4,
                               builder.width)
        step = runner.forward(np.array([prompt[pos]], np.int32), md)
        np.testing.assert_allclose(np.asarray(step)[0, :512], full[pos], rtol=0, atol=1e-4)
