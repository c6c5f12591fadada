"""Tiny random HF reference models (float32), saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=512, rms_norm_eps=1e-5)

HF_CONFIGS = {
    # GQA (8 q / 2 kv heads), Llama-3 rope scaling, untied embeddings
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        COMMON, num_key_value_heads=4, sliding_window=None, tie_word_embeddings=False)),
    # q/k norm, explicit head_dim != hidden/heads, tied embeddings
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
}


def make_hf_model(name: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    config_cls, model_cls, kwargs = HF_CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    with torch.no_grad():  # HF's init leaves norms at 1: randomise them so they are tested
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def hf_logits(hf_dir: Path, token_ids: list[int]):
    import torch
    import transformers

    model = _load(hf_dir)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


_LOADED: dict = {}


def _load(hf_dir: Path):
    import transformers

    if hf_dir not in _LOADED:
        _LOADED[hf_dir] = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype="float32").eval()
    return _LOADED[hf_dir]
