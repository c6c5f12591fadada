"""Scoring over shared prefixes, with and without the prefix cache (jaxserve/bench/score_prefix.py
says what is measured and how).

    python scripts/bench_score.py --json benchmarks/bench_score-DATE-cpu.json   # ~2 minutes
    python scripts/bench_score.py --requests 16 --prefix-len 128 --repeats 1    # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxserve.bench import score_prefix
from jaxserve.package_data import embedded_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=embedded_model(),
                   help="a jaxserve checkpoint directory (default: the embedded model)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefixes", type=int, default=4, help="shared system prompts")
    p.add_argument("--prefix-len", type=int, default=384, help="tokens of each system prompt")
    p.add_argument("--suffix-min", type=int, default=8)
    p.add_argument("--suffix-max", type=int, default=32)
    p.add_argument("--candidates", type=int, default=2, help="candidates per request")
    p.add_argument("--candidate-max", type=int, default=8, help="longest candidate (tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per setting (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    for name in ("requests", "prefixes", "prefix_len", "suffix_min", "candidates",
                 "candidate_max", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.suffix_max < args.suffix_min:
        p.error(f"--suffix-max ({args.suffix_max}) is below --suffix-min ({args.suffix_min})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = score_prefix.benchmark(
        args.model, args.repeats, requests=args.requests, prefixes=args.prefixes,
        prefix_len=args.prefix_len, suffix_min=args.suffix_min, suffix_max=args.suffix_max,
        candidates=args.candidates, candidate_max=args.candidate_max, seed=args.seed)
    print(score_prefix.table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
