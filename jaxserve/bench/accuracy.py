"""Accuracy of each precision format against the float32 model (scripts/precision_accuracy.py).

    python scripts/precision_accuracy.py --json acc.json                # both models, all formats
    python scripts/precision_accuracy.py --models embedded --formats int8,bf16

The oracle is the float32 engine, `LLM(model_dir, dtype="float32", quantization="none")`; each
format is a set of settings overrides on top of it (jaxserve/bench/formats.py), loaded as its own
engine. Three measures, each against the float32 engine's own numbers:

  logit error   teacher-forced logits (`LLM.logits`, one prefill pass) over --windows windows of
                --window-len tokens of the held text: max |logit - logit_fp32| and its mean over
                every position and vocabulary entry, and the max relative to max |logit_fp32|
                (the scale-free number the tests bound).
  greedy        --prompts prompts of --prompt-len tokens (also from the held text), --new-tokens
                greedy tokens each (`generate`, temperature 0, ignore_eos): agreement = the mean
                over prompts of (tokens before the first difference) / new tokens, and how many
                prompts agree on every token. Greedy decoding runs through the KV cache, so a KV
                format shows here even where a prefill pass hides it.
  perplexity    exp(mean next-token loss) over the same windows as the logit error.

The held text is the embedded model's held-out split: the standard-library files of this Python
that its training recipe (jaxserve/bench/training.py: every 16th of the sorted top-level files)
kept out of both tokenizer and model training, one BOS + file + EOS after another. On the
embedded model (trained on the rest of those sources) its perplexity means something; the 55M
benchmark model is random, so its perplexity is near its vocabulary size and only the
difference from float32 says anything. A model without a tokenizer reads the held text through
the embedded model's tokenizer (its ids are below every benchmark vocabulary).

A format whose setting does not exist in this engine yet, or that the engine refuses here (a
platform without fp8, say), is reported as skipped with the reason. Prints one table per model;
with --json writes every number plus the date, machine and the held text's files.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import time
from pathlib import Path

import numpy as np

from jaxserve.bench.formats import FORMATS, REFERENCE, overrides_of, parse_formats, skip_reason
from jaxserve.bench.peers import common_prefix
from jaxserve.bench.report import comma_choices, fmt, local_time, settings, write_json

MODELS = ("embedded", "55m")
DEFAULT_FORMATS = ("bf16", "int8", "int8-g32", "int8-g128", "kv-bf16", "kv-int8", "kv-fp8",
                   "int8+kv-int8")


# ---- the held text ----

def held_text(tokenizer) -> tuple[np.ndarray, list[str]]:
    """The embedded model's held-out stdlib files as one id stream, and their names."""
    from jaxserve.bench.training import split_files, stdlib_files, token_stream

    _, held = split_files(stdlib_files())
    return token_stream(tokenizer, held), [f.name for f in held]


def embedded_tokenizer():
    from jaxserve.package_data import embedded_model
    from jaxserve.text.sentencepiece_tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(embedded_model() / "tokenizer.model", bos_token_id=1,
                                  eos_token_ids=[2])


def spaced_slices(stream: np.ndarray, count: int, length: int, offset: float = 0.0
                  ) -> list[list[int]]:
    """`count` slices of `length` ids, evenly spaced through `stream` (`offset`: the fraction of
    a spacing the first one starts at)."""
    if len(stream) < length + count:
        raise ValueError(f"the held text has {len(stream)} tokens: too short for {count} slices "
                         f"of {length}")
    spacing = (len(stream) - length) / count
    starts = [int((i + offset) * spacing) for i in range(count)]
    return [stream[s:s + length].tolist() for s in starts]


# ---- one engine's numbers, and a comparison with the reference's ----

def run_engine(llm, windows: list[list[int]], prompts: list[list[int]], new_tokens: int) -> dict:
    """Teacher-forced logits of `windows` and greedy continuations of `prompts`."""
    from jaxserve.bench.runs import greedy

    t0 = time.perf_counter()
    logits = llm.logits(windows)
    outs = llm.generate(prompts, greedy(new_tokens), use_tqdm=False)
    return {"logits": logits, "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "seconds": time.perf_counter() - t0}


def perplexity(logits: list[np.ndarray], windows: list[list[int]]) -> float:
    """exp(mean loss of each window's next token given the tokens before it)."""
    total, count = 0.0, 0
    for lg, ids in zip(logits, windows):
        lg = lg[:-1].astype(np.float64)
        top = lg.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(lg - top).sum(axis=-1)) + top[:, 0]
        total += float(np.sum(logz - lg[np.arange(len(ids) - 1), ids[1:]]))
        count += len(ids) - 1
    return math.exp(total / count)


def compare(ref: dict, got: dict, windows: list[list[int]], new_tokens: int) -> dict:
    """A format's errors against the reference engine's numbers."""
    max_abs, sum_abs, count = 0.0, 0.0, 0
    for a, b in zip(ref["logits"], got["logits"]):
        d = np.abs(b.astype(np.float64) - a)
        max_abs, sum_abs, count = max(max_abs, float(d.max())), sum_abs + float(d.sum()), \
            count + d.size
    scale = max(float(np.abs(a).max()) for a in ref["logits"])
    prefix = [common_prefix(a, b) for a, b in zip(ref["tokens"], got["tokens"])]
    return {"max_abs_logit_error": max_abs, "mean_abs_logit_error": sum_abs / count,
            "max_rel_logit_error": max_abs / scale,
            "greedy_agreement": float(np.mean(prefix)) / new_tokens,
            "prompts_equal": sum(p == new_tokens for p in prefix),
            "common_prefix_per_prompt": prefix,
            "perplexity": perplexity(got["logits"], windows), "seconds": got["seconds"]}


# ---- one model, every format ----

def load_format(model_dir: Path, overrides: dict, max_model_len: int):
    from jaxserve import LLM

    return LLM(model_dir, max_model_len=max_model_len, compilation="on_use", **overrides)


def measure_model(model_dir: Path, names, formats: dict[str, dict] | None = None, *,
                  prompts: int = 16, prompt_len: int = 32, new_tokens: int = 256,
                  windows: int = 16, window_len: int = 256) -> dict:
    """The float32 reference and every format of `names` (`formats`: name -> settings
    overrides, default FORMATS) on one model; a format that cannot run is {"skipped": why}."""
    formats = FORMATS if formats is None else formats
    max_len = max(window_len, prompt_len + new_tokens)
    ref_overrides = overrides_of(REFERENCE)
    llm = load_format(model_dir, ref_overrides, max_len)
    own_tokenizer = llm.tokenizer is not None
    tokenizer = llm.tokenizer if own_tokenizer else embedded_tokenizer()
    stream, files = held_text(tokenizer)
    texts = spaced_slices(stream, windows, window_len)
    starts = spaced_slices(stream, prompts, prompt_len, offset=0.5)
    ref = run_engine(llm, texts, starts, new_tokens)
    del llm
    gc.collect()
    out = {"model_dir": str(model_dir),
           "held_text": {"files": files, "python": platform.python_version(),
                         "tokens": int(len(stream)),
                         "tokenizer": "the model's own" if own_tokenizer else
                         "the embedded model's"},
           "workload": {"prompts": prompts, "prompt_len": prompt_len,
                        "new_tokens": new_tokens, "windows": windows,
                        "window_len": window_len},
           "reference": {"format": REFERENCE, "overrides": ref_overrides,
                         "perplexity": perplexity(ref["logits"], texts),
                         "max_abs_logit": max(float(np.abs(a).max()) for a in ref["logits"]),
                         "seconds": ref["seconds"]},
           "formats": {}}
    for name in names:
        overrides = overrides_of(name, formats)
        reason = skip_reason(name, overrides)
        if reason is None:
            try:
                llm = load_format(model_dir, overrides, max_len)
            except (ValueError, TypeError) as e:  # refused here: a clear error names the value
                reason = f"format {name!r}: {e}"
        if reason is not None:
            print(f"skipped: {reason}", flush=True)
            out["formats"][name] = {"overrides": overrides, "skipped": reason}
            continue
        got = run_engine(llm, texts, starts, new_tokens)
        del llm
        gc.collect()
        out["formats"][name] = {"overrides": overrides,
                                **compare(ref, got, texts, new_tokens)}
        print(f"  {name}: {out['formats'][name]['max_abs_logit_error']:.4g} max |dlogit|, "
              f"agreement {out['formats'][name]['greedy_agreement']:.3f}", flush=True)
    return out


def table(title: str, result: dict) -> str:
    """A markdown table of one model's formats."""
    ref = result["reference"]
    w = result["workload"]
    lines = [f"\n## {title}: against {ref['format']} (perplexity {ref['perplexity']:.2f}, "
             f"max |logit| {ref['max_abs_logit']:.2f}; {w['windows']} x {w['window_len']} held "
             f"tokens, {w['prompts']} prompts x {w['new_tokens']} greedy tokens)",
             "| format | max abs logit err | mean abs logit err | max err / max abs logit | "
             "greedy agreement | prompts equal | perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name, r in result["formats"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped | | | | | |")
            notes.append(f"- {name} skipped: {r['skipped']}")
            continue
        lines.append(f"| {name} | {fmt(r['max_abs_logit_error'], '.4f')} | "
                     f"{fmt(r['mean_abs_logit_error'], '.5f')} | "
                     f"{fmt(r['max_rel_logit_error'] * 100, '.2f', ' %')} | "
                     f"{fmt(r['greedy_agreement'], '.3f')} | "
                     f"{r['prompts_equal']}/{w['prompts']} | {fmt(r['perplexity'], '.2f')} |")
    return "\n".join(lines + notes)


# ---- the command ----

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help="embedded (jaxserve/checkpoints/tiny), 55m (the benchmark's random "
                        "Llama) or both, comma-separated")
    p.add_argument("--random-model-dir", type=Path, default=None,
                   help="a scripts/random_model.py output for 55m (default: the offline "
                        "benchmark's, built if absent)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"comma-separated, from {', '.join(FORMATS)}")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    args.models = comma_choices(p, "--models", args.models, MODELS)
    try:
        args.formats = parse_formats(args.formats)
    except ValueError as e:
        p.error(f"--formats: {e}")
    for name in ("prompts", "prompt_len", "new_tokens", "windows", "window_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def model_dir_of(name: str, random_dir: Path | None) -> Path:
    from jaxserve.bench.models import model_dirs
    from jaxserve.package_data import embedded_model

    return embedded_model() if name == "embedded" else model_dirs(random_dir, name)[1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxserve.bench.machine import cpu_line, machine_info

    info = machine_info()
    print(cpu_line(info), flush=True)
    results = {"date": local_time(), "machine": info, "settings": settings(args), "models": {}}
    for name in args.models:
        print(f"\n=== model {name} ===", flush=True)
        results["models"][name] = measure_model(
            model_dir_of(name, args.random_model_dir), args.formats, prompts=args.prompts,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, windows=args.windows,
            window_len=args.window_len)
        print(table(f"{name} model", results["models"][name]), flush=True)
    if args.json:
        write_json(args.json, results, indent=2)
    return results
