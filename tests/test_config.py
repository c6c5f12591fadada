"""HF config.json parsing: both dialects, and every unimplemented value rejected by name."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxserve.config import ConfigError, ModelConfig, from_hf_config, rope_inv_freq

LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=512)


def test_old_dialect_top_level_rope_theta_and_rope_scaling_type():
    cfg = from_hf_config({**LLAMA, "rope_theta": 500000.0, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0


def test_llama3_inv_freq_matches_transformers():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"},
                     rope_parameters=rope)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_inv_freq(from_hf_config({**LLAMA, "rope_parameters": rope}))
    assert max(abs(a - b) / b for a, b in zip(ours, ref.tolist())) < 1e-6


@pytest.mark.parametrize("field,value,named", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("mlp_bias", True, "mlp_bias=True"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn'"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 4.0}, "low_freq_factor"),
    ("rope_parameters", {"rope_type": "default", "factor": 2.0}, "factor"),
    ("layer_types", ["sliding_attention", "full_attention"], "layer_types"),
    ("quantization_config", {"bits": 4}, "quantization_config"),
    ("model_type", "gpt2", "model_type 'gpt2'"),
])
def test_unimplemented_values_are_rejected_by_name(field, value, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("(", r"\(")):
        from_hf_config({**LLAMA, field: value})


def test_sliding_window_is_rejected_unless_it_never_binds():
    mistral = {**LLAMA, "model_type": "mistral"}
    with pytest.raises(ConfigError, match="sliding_window=256"):
        from_hf_config({**mistral, "sliding_window": 256})
    assert from_hf_config({**mistral, "sliding_window": 512}).family == "llama"
    with pytest.raises(ConfigError, match="use_sliding_window=True"):
        from_hf_config({**LLAMA, "model_type": "qwen3", "use_sliding_window": True})


def test_our_config_round_trips_and_rejects_unknown_fields(tmp_path):
    cfg = from_hf_config({**LLAMA, "eos_token_id": [2, 7], "tie_word_embeddings": True})
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    assert cfg.eos_token_ids == (2, 7)
    d = cfg.to_json_dict()
    d["sliding"] = 3
    with pytest.raises(ConfigError, match="sliding"):
        ModelConfig.from_json_dict(d)


def test_param_count_formula_counts_the_model():
    cfg = from_hf_config(LLAMA)
    e, i, v, d = 64, 128, 512, 8
    per_layer = e * d * (8 + 8 + 2 + 2) + 3 * e * i + 2 * e
    assert cfg.num_params() == 2 * v * e + 2 * per_layer + e
    assert math.isclose(cfg.head_dim, 8)
