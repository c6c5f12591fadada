"""Tiny random HF reference models (float32): built by `jaxserve.bench.hf_models`; their logits."""

from __future__ import annotations

from pathlib import Path

from jaxserve.bench.hf_models import COMMON, HF_CONFIGS, MOE_FAMILIES, make_hf_model  # noqa: F401


def small_vocab_llama(root: Path, vocab_size: int = 12) -> Path:
    """A random llama with a tiny vocabulary (PAD 0, BOS 1, EOS 2) under `root`, converted in
    float32; returns the jaxserve checkpoint directory."""
    from jaxserve.checkpoint import convert_hf

    hf_dir = make_hf_model("llama", root / "hf", vocab_size=vocab_size, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0)
    convert_hf(hf_dir, root / "jaxserve", dtype="float32")
    return root / "jaxserve"


def hf_logits(hf_dir: Path, token_ids: list[int]):
    import torch

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
