"""TPLA against exact MLA on simulated CPU devices: how far splitting the latent moves the model.

    python scripts/bench_tpla.py --json benchmarks/tpla.json      # 256 greedy tokens, tp 2 and 4
    python scripts/bench_tpla.py --quick                           # 16 tokens, tp 2 (a smoke run)

A random DeepSeek-V3-shaped test model (the HF test configuration, `bench/hf_models.py`,
converted, its positions raised to the longest context timed) with a one-id-per-character
tokenizer (`with_char_tokenizer`), so that PCA has a calibration text to read (the shipped
`jaxserve/text/latent_calibration.txt`) and perplexity a held text (`HELD_TEXT`, not in the
calibration text). The reference is `attention="mla"` on one device; each row is
`attention="tpla"` at tp = 2 or 4 with latent_transform none, hadamard or pca. Per row: the
logit error against the reference over the held text (max and mean |difference|, over the
reference's largest |logit|), the held text's perplexity, greedy agreement (tokens generated
before the first departure from the reference's greedy continuation of a random prompt, over
all), KV cache bytes per token per device, and the decode step time (ms, the mean over
`DECODE_STEPS` steps of one sequence) at each context length. On simulated devices the tp
devices run one after another on the same cores, so a split cache cannot show a speed-up there:
the step times say what CPU does, the bytes per device are the mechanism.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from jaxserve.bench.report import write_json


PARTS = ("accuracy", "contexts")
DEFAULTS = {"accuracy": {"tp": "2,4", "contexts": "1024,4096"},
            "contexts": {"tp": "1,2,4", "contexts": "1024,4096,16384"}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=PARTS, default="accuracy",
                   help="accuracy: TPLA against MLA (this module); contexts: the bare decode "
                        "step and KV bytes per device against context, GQA vs MLA vs TPLA "
                        "(jaxserve.bench.tpla_contexts)")
    p.add_argument("--tokens", type=int, default=256, help="greedy tokens compared")
    p.add_argument("--tp", default=None, help="tensor-parallel degrees (comma-separated; "
                   "default " + "; ".join(f"{k}: {v['tp']}" for k, v in DEFAULTS.items()) + ")")
    p.add_argument("--contexts", default=None,
                   help="context lengths the decode step is timed at (comma-separated; default "
                        + "; ".join(f"{k}: {v['contexts']}" for k, v in DEFAULTS.items()) + ")")
    p.add_argument("--batch", type=int, default=8, help="contexts: sequences per decode step")
    p.add_argument("--iters", type=int, default=8, help="contexts: steps per timed loop")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: accuracy 16 tokens, tp=2, one context of 256; contexts "
                        "tp=2, batch 2, contexts 64 and 256, one layer")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    defaults = DEFAULTS[args.part]
    args.tp = [int(t) for t in (args.tp or defaults["tp"]).split(",")]
    args.contexts = [int(c) for c in (args.contexts or defaults["contexts"]).split(",")]
    if args.quick and args.part == "accuracy":
        args.tokens, args.tp, args.contexts = 16, [2], [256]
    elif args.quick:
        args.tp, args.batch, args.contexts, args.iters = [2], 2, [64, 256], 2
    return args


HELD_TEXT = ("The lighthouse keeper wrote every evening in a thick green notebook: the wind, the "
             "ships that passed, the price of oil in town. In forty years he never missed a day, "
             "and when the notebooks were found they filled two shelves of the harbour office.")
DECODE_STEPS = 8


def with_char_tokenizer(model_dir: Path, out: Path, texts: list[str]) -> Path:
    """A copy of a model directory with a one-id-per-character tokenizer covering `texts`
    (id 0 for any other character): a random test model's ids are just below its vocabulary."""
    import shutil

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    shutil.copytree(model_dir, out)
    chars = sorted(set("".join(texts)))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def decode_ms(llm, context: int) -> float:
    """One sequence's decode step at `context` tokens: the faster of two runs after a first
    that compiles (their prompt comes from the prefix cache; the machine is shared)."""
    prompt = np.random.default_rng(context).integers(3, 100, size=context).tolist()
    params = greedy(DECODE_STEPS + 1)
    times = []
    for _ in range(3):
        m = llm.generate([prompt], params, use_tqdm=False)[0].metrics
        times.append((m.finished_time - m.first_token_time) / DECODE_STEPS * 1e3)
    return min(times[1:])


def greedy(tokens: int):
    from jaxserve import SamplingParams

    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)


def log_likelihoods(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p(ids[i + 1] | ids[:i + 1]) from full-sequence logits [len, vocab]."""
    z = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def agreement(got: list[int], want: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    return same / len(want)


def row(llm, ref_logits, held, prompt, want, params, contexts) -> dict:
    from jaxserve.engine import sizing

    logits = llm.logits([held])[0]
    diff = np.abs(logits - ref_logits) / np.abs(ref_logits).max()
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    per_token = sizing.bytes_per_block_per_device(llm.cache_spec, llm.runner.block_size,
                                                  llm.layout) / llm.runner.block_size
    return {"logit_error_max": float(diff.max()), "logit_error_mean": float(diff.mean()),
            "perplexity": float(np.exp(-log_likelihoods(logits, held).mean())),
            "greedy_agreement": agreement(list(got), want),
            "kv_bytes_per_token_per_device": per_token,
            **{f"decode_ms_at_{c}": decode_ms(llm, c) for c in contexts}}


def main(args: argparse.Namespace) -> dict:
    from jaxserve import LLM
    from jaxserve.bench.hf_models import make_hf_model
    from jaxserve.checkpoint import convert_hf
    from jaxserve.package_data import latent_calibration_text

    root = Path(tempfile.mkdtemp(prefix="jaxserve-tpla-"))
    longest = max(args.contexts) + DECODE_STEPS + 16
    convert_hf(make_hf_model("deepseek_v3", root / "hf", max_position_embeddings=longest),
               root / "converted", dtype="float32")
    model_dir = with_char_tokenizer(root / "converted", root / "jaxserve",
                                    [latent_calibration_text().read_text(), HELD_TEXT])
    block_size = 16
    engine = dict(kv_blocks=2 * (longest // block_size + 2), max_num_seqs=1,
                  max_model_len=longest, block_size=block_size)
    params = greedy(args.tokens)
    prompt = np.random.default_rng(0).integers(3, 100, size=16).tolist()
    reference = LLM(model_dir, **engine)
    want = list(reference.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
    held = reference.tokenizer.encode(HELD_TEXT)
    ref_logits = reference.logits([held])[0]
    rows = [{"attention": "mla", "tp": 1, "latent_transform": "none",
             **row(reference, ref_logits, held, prompt, want, params, args.contexts)}]
    del reference
    for tp in args.tp:
        for transform in ("none", "hadamard", "pca"):
            llm = LLM(model_dir, mesh=f"tp={tp}", attention="tpla", latent_transform=transform,
                      **engine)
            rows.append({"attention": "tpla", "tp": tp, "latent_transform": transform,
                         **row(llm, ref_logits, held, prompt, want, params, args.contexts)})
            del llm
    header = ("attention", "tp", "latent_transform", "logit_error_max", "logit_error_mean",
              "perplexity", "greedy_agreement", "kv_bytes_per_token_per_device",
              *(f"decode_ms_at_{c}" for c in args.contexts))
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(f"{r[h]:.6g}" if isinstance(r[h], float) else str(r[h])
                         for h in header))
    out = {"tokens": args.tokens, "contexts": args.contexts, "held_tokens": len(held),
           "rows": rows}
    if args.json:
        write_json(args.json, out)
    return out
