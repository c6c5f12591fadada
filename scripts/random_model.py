"""Build a random-weight HF Llama of a given size and convert it to a jaxserve checkpoint.

    python scripts/random_model.py --preset tiny --out /tmp/tiny
    python scripts/random_model.py --preset 55m --out /tmp/llama55m   # the benchmark model

Writes OUT/hf (HF transformers format: the reference implementation's copy of the same weights)
and OUT/jaxserve (our format) with `jaxserve.bench.models.make_hf_random`. Needs the `test`
extra (torch, transformers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxserve.bench.models import HF_PRESETS, make_hf_random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(HF_PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    hf_dir, ours = make_hf_random(args.preset, args.out, args.seed, args.dtype)
    print(f"HF model: {hf_dir}\njaxserve checkpoint: {ours}")


if __name__ == "__main__":
    main()
