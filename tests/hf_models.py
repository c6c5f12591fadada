"""Tiny random HF reference models (float32): built by `jaxserve.bench.hf_models`; their logits."""

from __future__ import annotations

from pathlib import Path

from jaxserve.bench.hf_models import COMMON, HF_CONFIGS, MOE_FAMILIES, make_hf_model  # noqa: F401


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
