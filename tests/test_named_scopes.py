"""The compiled step's op names carry the model's words (jax.named_scope), so a device profile
of a step reads as layers, attention, MLP / MoE, LM head and sampling."""

import re

from jaxserve import LLM

SMALL = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64)


def _scopes(llm, decode_rows: int, prefill_tokens: int) -> set[str]:
    text = llm.runner.compiled_step(llm.engine.builder.idle(decode_rows, prefill_tokens)).as_text()
    names = re.findall(r'op_name="([^"]+)"', text)
    return {part for name in names for part in name.split("/")}


def test_dense_step_scopes(hf_model_dir):
    _, model_dir = hf_model_dir("llama")
    scopes = _scopes(LLM(model_dir, **SMALL), 4, 0)
    assert {"layer_0", "layer_1", "attention", "mlp", "lm_head", "sampling"} <= scopes
    assert "moe" not in scopes


def test_moe_step_scopes(hf_model_dir):
    _, model_dir = hf_model_dir("qwen3_moe")  # layer 1 keeps a dense MLP
    scopes = _scopes(LLM(model_dir, **SMALL), 0, 16)
    assert {"layer_0", "layer_1", "attention", "moe", "mlp", "lm_head", "sampling"} <= scopes
