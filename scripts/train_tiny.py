"""Train the embedded model, `jaxserve/checkpoints/tiny/`: a small Llama that writes Python.

    python scripts/train_tiny.py                      # -> jaxserve/checkpoints/tiny (the committed one)
    python scripts/train_tiny.py --out /tmp/tiny --steps 200

Corpus: this Python's own standard library; tokenizer: a 2048-piece byte-fallback BPE; model:
a 1M-parameter Llama trained through jaxserve's own forward pass. Seeded, on one device: the
same Python and jax versions give the same checkpoint (about 5 minutes on 2 idle CPU cores).
The recipe, and what each step does, is `jaxserve.bench.training`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxserve.bench.training import TrainConfig, train

# the embedded model in the source tree (shipped as package data: jaxserve/package_data.py)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "jaxserve" / "checkpoints" / "tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall-clock budget of the training loop (shortens the schedule "
                             "to fit; the result then depends on the machine's speed)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--no-samples", action="store_true")
    args = parser.parse_args()
    tc = TrainConfig(steps=args.steps, seed=args.seed)
    train(args.out, train_config=tc, seconds=args.seconds, samples=not args.no_samples)


if __name__ == "__main__":
    main()
