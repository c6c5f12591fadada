"""TPLA against exact MLA on simulated CPU devices: how far splitting the latent moves the model.

    python scripts/bench_tpla.py --json benchmarks/tpla.json      # 256 greedy tokens, tp 2 and 4
    python scripts/bench_tpla.py --quick                           # 32 tokens (a smoke run)

A random DeepSeek-V3-shaped test model (the HF test configuration, `bench/hf_models.py`,
converted). The reference is `attention="mla"` on one device; each row is `attention="tpla"` at
tp = 2 or 4 with latent_transform none or hadamard. Per row: the logit error against the
reference over a held sequence (max and mean |difference|, over the reference's largest |logit|),
the perplexity of that sequence under each (the held "text" is the reference's own greedy
continuation of a random prompt: there is no tokenizer), greedy agreement (tokens generated
before the first departure from the reference, over all), and KV cache bytes per token per
device. Not here: PCA (not implemented), and decode step time against context length (on
simulated devices the tp devices run one after another on the same cores, so a split cache
shows no speed-up; the mechanism, bytes per device, is what this measures).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from jaxserve.bench.report import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="greedy tokens compared")
    p.add_argument("--tp", default="2,4", help="tensor-parallel degrees (comma-separated)")
    p.add_argument("--quick", action="store_true", help="32 tokens, tp=2 (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    args.tp = [int(t) for t in args.tp.split(",")]
    if args.quick:
        args.tokens, args.tp = 32, [2]
    return args


def log_likelihoods(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p(ids[i + 1] | ids[:i + 1]) from full-sequence logits [len, vocab]."""
    z = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def agreement(got: list[int], want: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    return same / len(want)


def row(llm, ref_logits, held, prompt, want, params) -> dict:
    from jaxserve.engine import sizing

    logits = llm.logits([held])[0]
    diff = np.abs(logits - ref_logits) / np.abs(ref_logits).max()
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    per_token = sizing.bytes_per_block_per_device(llm.cache_spec, llm.runner.block_size,
                                                  llm.layout) / llm.runner.block_size
    return {"logit_error_max": float(diff.max()), "logit_error_mean": float(diff.mean()),
            "perplexity": float(np.exp(-log_likelihoods(logits, held).mean())),
            "greedy_agreement": agreement(list(got), want),
            "kv_bytes_per_token_per_device": per_token}


def main(args: argparse.Namespace) -> dict:
    from jaxserve import LLM, SamplingParams
    from jaxserve.bench.hf_models import make_hf_model
    from jaxserve.checkpoint import convert_hf

    root = Path(tempfile.mkdtemp(prefix="jaxserve-tpla-"))
    model_dir = root / "jaxserve"
    convert_hf(make_hf_model("deepseek_v3", root / "hf"), model_dir, dtype="float32")
    engine = dict(kv_blocks=64, max_num_seqs=1, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompt = np.random.default_rng(0).integers(3, 128, size=16).tolist()
    reference = LLM(model_dir, **engine)
    want = list(reference.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
    held = prompt + want
    ref_logits = reference.logits([held])[0]
    rows = [{"attention": "mla", "tp": 1, "latent_transform": "none",
             **row(reference, ref_logits, held, prompt, want, params)}]
    for tp in args.tp:
        for transform in ("none", "hadamard"):
            llm = LLM(model_dir, mesh=f"tp={tp}", attention="tpla", latent_transform=transform,
                      **engine)
            rows.append({"attention": "tpla", "tp": tp, "latent_transform": transform,
                         **row(llm, ref_logits, held, prompt, want, params)})
    header = ("attention", "tp", "latent_transform", "logit_error_max", "logit_error_mean",
              "perplexity", "greedy_agreement", "kv_bytes_per_token_per_device")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h])
                         for h in header))
    out = {"tokens": args.tokens, "rows": rows}
    if args.json:
        write_json(args.json, out)
    return out
