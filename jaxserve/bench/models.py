"""Random-weight models for benchmarks: an HF transformers Llama converted to our format (the
peer and jaxserve then run the same weights), or a jaxserve-only model of a given shape.

The benchmark model is the 55M random Llama (`HF_PRESETS["55m"]`), kept in
DEFAULT_MODEL_DIR (OUT/hf: HF transformers' copy, OUT/jaxserve: ours) once built."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DEFAULT_MODEL_DIR = Path("/tmp/jaxserve-bench-55m")
HF_PRESETS = {
    # the platform's reference model: 8 layers, hidden 512, 8 q / 2 kv heads
    "55m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512),
}


def make_hf_random(preset: str, out: Path, seed: int = 0,
                   dtype: str = "float32") -> tuple[Path, Path]:
    """OUT/hf (a random HF Llama of `preset`) and OUT/jaxserve (converted); needs torch and
    transformers (the `test` extra)."""
    import torch
    import transformers

    from jaxserve.checkpoint import convert_hf

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**HF_PRESETS[preset], bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out / "hf")
    convert_hf(out / "hf", out / "jaxserve", dtype=dtype)
    return out / "hf", out / "jaxserve"


def model_dirs(model_dir: Path | None, preset: str) -> tuple[Path, Path]:
    """(HF dir, jaxserve dir) of a `make_hf_random` output: `model_dir`, or the default one,
    built with `preset` when absent."""
    root = model_dir or DEFAULT_MODEL_DIR
    hf, ours = root / "hf", root / "jaxserve"
    if not (ours / "config.json").is_file() or not (hf / "config.json").is_file():
        if model_dir is not None:
            sys.exit(f"{root} is not a random_model.py output (needs hf/ and jaxserve/)")
        print(f"building the {preset} random model into {root} ...", flush=True)
        make_hf_random(preset, root)
    return hf, ours


def ensure_current_checkpoint(hf: Path, ours: Path) -> bool:
    """Reconvert OUT/jaxserve from OUT/hf when it was written in an older format (e.g. before
    the LM head was stored [vocab, embed]). Returns True when it reconverted."""
    from jaxserve.checkpoint import CheckpointError, convert_hf, restore_model
    from jaxserve.sharding import Layout
    try:
        restore_model(ours, Layout.create(None, "tp"), None)
        return False
    except CheckpointError as e:
        print(f"{ours} does not load ({str(e).splitlines()[0]}); reconverting from {hf}",
              flush=True)
    shutil.rmtree(ours)
    convert_hf(hf, ours, dtype="float32")
    return True


def save_random_model(shape: dict, out: Path, seed: int = 0):
    """A jaxserve checkpoint of a random model with ModelConfig fields `shape`; its config."""
    from flax import nnx

    from jaxserve.checkpoint import save_model
    from jaxserve.config import ModelConfig
    from jaxserve.models import build_model

    config = ModelConfig(**shape)
    save_model(out, config, nnx.state(build_model(config, seed=seed), nnx.Param))
    return config
