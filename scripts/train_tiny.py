"""Train the embedded model, `jaxserve/checkpoints/tiny/`: a small Llama that writes Python.

    python scripts/train_tiny.py                      # -> jaxserve/checkpoints/tiny (the committed one)
    python scripts/train_tiny.py --out /tmp/tiny --steps 200
    python scripts/train_tiny.py --draft              # -> jaxserve/checkpoints/tiny-draft

Corpus: this Python's own standard library; tokenizer: a 2048-piece byte-fallback BPE; model:
a 1M-parameter Llama trained through jaxserve's own forward pass. Seeded, on one device: the
same Python and jax versions give the same checkpoint (about 5 minutes on 2 idle CPU cores).
The recipe, and what each step does, is `jaxserve.bench.training`.

`--draft` instead distils a 1-layer draft of the embedded model for speculative decoding (same
tokenizer and corpus; `jaxserve.bench.draft_training`), the default draft of
`speculative_config={"method": "draft"}` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from jaxserve.bench.draft_training import DRAFT_TRAIN, train_draft
from jaxserve.bench.training import TrainConfig, train

# the embedded model in the source tree (shipped as package data: jaxserve/package_data.py)
CHECKPOINTS = Path(__file__).resolve().parent.parent / "jaxserve" / "checkpoints"
DEFAULT_OUT = CHECKPOINTS / "tiny"
DEFAULT_DRAFT_OUT = CHECKPOINTS / "tiny-draft"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {DEFAULT_OUT} ({DEFAULT_DRAFT_OUT} with --draft)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--draft", action="store_true",
                        help="distil a 1-layer draft of --target instead")
    parser.add_argument("--target", type=Path, default=DEFAULT_OUT,
                        help="the model a --draft proposes for")
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall-clock budget of the training loop (shortens the schedule "
                             "to fit; the result then depends on the machine's speed)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--no-samples", action="store_true")
    args = parser.parse_args()
    if args.draft:
        tc = dataclasses.replace(DRAFT_TRAIN, seed=args.seed,
                                 steps=args.steps or DRAFT_TRAIN.steps)
        train_draft(args.out or DEFAULT_DRAFT_OUT, args.target, train_config=tc,
                    seconds=args.seconds)
        return
    tc = TrainConfig(steps=args.steps or TrainConfig.steps, seed=args.seed)
    train(args.out or DEFAULT_OUT, train_config=tc, seconds=args.seconds, samples=not args.no_samples)


if __name__ == "__main__":
    main()
