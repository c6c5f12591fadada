"""Scoring over shared prefixes (the MoE-Prefill workload), with and without the prefix cache.

Workload (seeded): `prefixes` system prompts of `prefix_len` random token ids; `requests` score
requests, request i = system prompt i % prefixes + a suffix of suffix_min..suffix_max random ids,
each scored against `candidates` candidates of 1..candidate_max random ids of its own. All
requests go in one `llm.score` call (a burst, as an offline job sends them).

For each setting (`LLM(model, enable_prefix_caching=True)` and `=False`, otherwise the defaults a
user gets): one untimed call compiles the step shapes, then `repeats` timed calls, each on an
emptied prefix cache (so a run's hits are its own); the best wall time is kept. Reported per
setting from the engine's counters over the kept call: true FLOPs (jaxserve/flops.py), tokens
computed by scoring steps, prefix cache hit rate (hit / looked-up prompt tokens), wall time,
requests/s; and the wall time ratio (uncached / cached). The two settings' scores are compared
(largest per-token log-prob difference): the cache must not change a number.

This module measures; it never changes an engine's settings beyond the one it compares.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

COUNTERS = ("true_flops", "executed_flops", "score_prefill_tokens", "score_prefix_cache_queries",
            "score_prefix_cache_hits")
SETTINGS = (("prefix caching", True), ("no prefix caching", False))


def make_workload(vocab: int, requests: int = 64, prefixes: int = 4, prefix_len: int = 384,
                  suffix_min: int = 8, suffix_max: int = 32, candidates: int = 2,
                  candidate_max: int = 8, seed: int = 0) -> tuple[list, list]:
    """(prompts, per-prompt candidate lists) of token ids."""
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(3, vocab, size=n).tolist()

    systems = [ids(prefix_len) for _ in range(prefixes)]
    prompts = [systems[i % prefixes] + ids(int(rng.integers(suffix_min, suffix_max + 1)))
               for i in range(requests)]
    lists = [[ids(int(rng.integers(1, candidate_max + 1))) for _ in range(candidates)]
             for _ in prompts]
    return prompts, lists


def timed_score(llm, prompts, candidates) -> dict:
    """One `llm.score` call on an emptied prefix cache: wall time, counters moved, log-probs."""
    llm.engine.clear_prefix_cache()
    before = llm.stats()
    t0 = time.perf_counter()
    outputs = llm.score(prompts, candidates)
    wall = time.perf_counter() - t0
    after = llm.stats()
    run = {k: after[k] - before[k] for k in COUNTERS}
    queries = run["score_prefix_cache_queries"]
    run.update(wall_s=wall, requests_per_s=len(prompts) / wall,
               hit_rate=run["score_prefix_cache_hits"] / queries if queries else 0.0)
    run["logprobs"] = [lp for out in outputs for c in out.candidates for lp in c.token_logprobs]
    return run


def run_setting(model_dir: Path, caching: bool, prompts, candidates, repeats: int) -> dict:
    from jaxserve import LLM

    t0 = time.perf_counter()
    # The first call compiles what the timed calls use; no background compiles beside them.
    llm = LLM(model_dir, enable_prefix_caching=caching, compilation="on_use")
    llm.score(prompts, candidates)  # compiles the shapes the timed calls use
    setup = time.perf_counter() - t0
    runs = [timed_score(llm, prompts, candidates) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["wall_s"])
    return {**best, "setup_s": setup, "wall_s_all": [r["wall_s"] for r in runs]}


def benchmark(model_dir: Path, repeats: int = 3, **workload) -> dict:
    """Both settings on the same workload; the results as one JSON-ready dict."""
    model_dir = Path(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts, candidates = make_workload(vocab, **workload)
    runs = {name: run_setting(model_dir, caching, prompts, candidates, repeats)
            for name, caching in SETTINGS}
    on, off = (runs[name] for name, _ in SETTINGS)
    diff = float(np.max(np.abs(np.subtract(on.pop("logprobs"), off.pop("logprobs")))))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "loadavg": os.getloadavg()},
            "model": str(model_dir), "repeats": repeats,
            "workload": {"requests": len(prompts), **workload,
                         "prompt_tokens": sum(map(len, prompts)),
                         "candidate_tokens": sum(len(c) for cs in candidates for c in cs)},
            "runs": runs, "wall_ratio_uncached_over_cached": off["wall_s"] / on["wall_s"],
            "max_logprob_difference": diff}


def table(result: dict) -> str:
    """The results as a markdown table."""
    rows = [("true FLOPs (GFLOP)", "true_flops", ".3f", 1e-9),
            ("executed FLOPs (GFLOP)", "executed_flops", ".3f", 1e-9),
            ("tokens computed", "score_prefill_tokens", ",", 1),
            ("prefix cache hit rate", "hit_rate", ".1%", 1),
            ("wall time (s)", "wall_s", ".3f", 1),
            ("requests/s", "requests_per_s", ".1f", 1)]
    on, off = (result["runs"][name] for name, _ in SETTINGS)
    w = result["workload"]
    lines = [f"{w['requests']} score requests over {w.get('prefixes', 4)} shared prefixes, "
             f"best of {result['repeats']}",
             "| metric | prefix caching | no prefix caching | cached / uncached |",
             "|---|---:|---:|---:|"]
    for label, key, spec, scale in rows:
        a, b = on[key] * scale, off[key] * scale
        lines.append(f"| {label} | {a:{spec}} | {b:{spec}} | "
                     f"{f'{a / b:.3f}' if b else '-'} |")
    lines.append(f"wall time uncached / cached: {result['wall_ratio_uncached_over_cached']:.2f}x; "
                 f"largest log-prob difference: {result['max_logprob_difference']:.2e}")
    return "\n".join(lines)
