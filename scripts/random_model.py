"""Build a random-weight HF Llama of a given size and convert it to a jaxserve checkpoint.

    python scripts/random_model.py --preset tiny --out /tmp/tiny
    python scripts/random_model.py --preset 55m --out /tmp/llama55m   # the benchmark model

Writes OUT/hf (HF transformers format: the reference implementation's copy of the same weights)
and OUT/jaxserve (our format). Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRESETS = {
    # ../shared/PLATFORM.md's reference model: 8 layers, hidden 512, 8 q / 2 kv heads
    "55m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512),
}


def make(preset: str, out: Path, seed: int = 0, dtype: str = "float32") -> tuple[Path, Path]:
    import torch
    import transformers

    from jaxserve.checkpoint import convert_hf

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**PRESETS[preset], bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out / "hf")
    convert_hf(out / "hf", out / "jaxserve", dtype=dtype)
    return out / "hf", out / "jaxserve"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    hf_dir, ours = make(args.preset, args.out, args.seed, args.dtype)
    print(f"HF model: {hf_dir}\njaxserve checkpoint: {ours}")


if __name__ == "__main__":
    main()
