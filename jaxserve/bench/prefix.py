"""Prefix caching benchmark: a shared-prefix workload with and without the prefix cache, side by
side, and prefix-aware against round-robin routing over two DP replicas.

    python scripts/bench_prefix.py --json benchmarks/bench_prefix-DATE-cpu.json   # ~6 minutes
    python scripts/bench_prefix.py --requests 256                 # twice the requests (~11 min)
    python scripts/bench_prefix.py --quick                        # a small workload (~1.5 min)

Workload (seeded by --seed): --prefixes system prompts of --prefix-len random token ids, and
--requests requests, each one of the system prompts (uniformly drawn) followed by a suffix of
--suffix-min..--suffix-max random ids; --max-tokens greedy output tokens each, ignore_eos. All
requests are submitted at once, in one `llm.generate` call (a burst: TTFT includes queueing).

Part "caching", on ONE device: `LLM(model)` and `LLM(model, enable_prefix_caching=False)`, each
warmed up (`llm.warmup()`) and run --repeats times on an emptied cache; the best wall time is
kept. Reported: output tokens/s, mean / median / p90 TTFT (RequestMetrics: arrival in the engine
to first token), prefill tokens computed, hit rate (prefix cache hits / queries, in tokens), the
true FLOPs run (jaxserve/flops.py, engine stats) and the FLOP rate they imply, the FLOPs the
compiled programs executed (padding included), and whether both engines generated the same
tokens. The physical limit next to the rates: the FLOP rate of
`jax.jit(jnp.dot)` on 2048x2048 float32 matrices, measured in the same run.

Part "routing", on two simulated CPU devices (`mesh="dp=2"`, `rules="dp"`, one KV pool shard
and one prefix cache per replica): the same workload once per --policies entry (default
prefix-aware and round-robin), without warm-up. Reported: hit rate, prefill tokens, true FLOPs
run, and the prefill tokens each replica ran (balance). Wall times on simulated devices are not
speeds (two "devices" share the cores, programs compile during the run) and are printed for
information only.

The model is the 55M random Llama of `scripts/random_model.py --preset 55m` (float32), built into
/tmp/jaxserve-bench-55m when --model-dir is not given, as scripts/bench_offline.py does. With
--json the results, date, machine and versions are written there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


from jaxserve.bench.floors import jax_dot
from jaxserve.bench.machine import cpu_line, machine_info
from jaxserve.bench.models import DEFAULT_MODEL_DIR, model_dirs
from jaxserve.bench.report import json_default, local_time, settings, write_json
from jaxserve.bench.steps import track_placements
from jaxserve.bench.workloads import shared_prefix_prompts

PARTS = ("caching", "routing")
POLICIES = ("prefix", "round_robin", "least_loaded")
QUICK = dict(prefixes=4, prefix_len=256, requests=32, suffix_min=16, suffix_max=64,
             max_tokens=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a random_model.py output (hf/ and jaxserve/); default: build the 55M "
                   "model into /tmp/jaxserve-bench-55m")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: caching,routing")
    p.add_argument("--policies", default="prefix,round_robin",
                   help=f"routing policies of the routing part, from {','.join(POLICIES)}")
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--suffix-min", type=int, default=32)
    p.add_argument("--suffix-max", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a small workload: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--no-warmup", action="store_true", help="compile during the runs (checks)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.parts = [x for x in args.parts.split(",") if x]
    args.policies = [x for x in args.policies.split(",") if x]
    for name, given, known in (("--parts", args.parts, PARTS),
                               ("--policies", args.policies, POLICIES)):
        bad = [x for x in given if x not in known]
        if bad or not given:
            p.error(f"{name}: {bad or 'none given'}; choose from {','.join(known)}")
    for name in ("prefixes", "prefix_len", "requests", "suffix_min", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.suffix_max < args.suffix_min:
        p.error(f"--suffix-max ({args.suffix_max}) is below --suffix-min ({args.suffix_min})")
    return args


def workload(args, vocab: int) -> list[list[int]]:
    """The requests' prompts: a system prompt and a suffix each (seeded)."""
    return shared_prefix_prompts(args.seed, vocab, args.prefixes, args.prefix_len, args.requests,
                                 args.suffix_min, args.suffix_max)


def run_workload(llm, prompts, max_tokens: int) -> dict:
    """Run every prompt at once on an emptied prefix cache; what it took."""
    from jaxserve import SamplingParams

    llm.engine.clear_prefix_cache()
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    after = llm.stats()
    grew = {k: after.get(k, 0) - before.get(k, 0)
            for k in ("prefill_tokens", "prefix_cache_queries", "prefix_cache_hits", "true_flops",
                      "executed_flops", "generated_tokens", "preemptions")}
    ttft = sorted(o.metrics.ttft for o in outs)
    return {"wall_s": wall, **grew,
            "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
            "ttft_mean_s": statistics.fmean(ttft), "ttft_median_s": statistics.median(ttft),
            "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
            "hit_rate": grew["prefix_cache_hits"] / max(1, grew["prefix_cache_queries"]),
            "flop_rate": grew["true_flops"] / wall,
            "tokens": [o.outputs[0].token_ids for o in outs]}


def load(model_dir: Path, warmup: bool, **kwargs):
    from jaxserve import LLM

    t0 = time.perf_counter()
    llm = LLM(model_dir, **kwargs)  # default settings: a user's engine
    programs = llm.warmup() if warmup else 0
    return llm, {"load_and_warmup_s": time.perf_counter() - t0, "programs": programs}


def part_caching(args, model_dir: Path, prompts) -> dict:
    runs = {}
    for name, caching in (("prefix caching", True), ("no prefix caching", False)):
        llm, info = load(model_dir, not args.no_warmup, enable_prefix_caching=caching)
        best = None
        for _ in range(args.repeats):
            run = run_workload(llm, prompts, args.max_tokens)
            if best is None or run["wall_s"] < best["wall_s"]:
                best = run
        runs[name] = {**best, **info}
        del llm
    on, off = runs["prefix caching"], runs["no prefix caching"]
    same = sum(a == b for a, b in zip(on.pop("tokens"), off.pop("tokens")))
    peak = jax_dot(2048, repeats=3)
    rows = [("output tokens/s", "output_tok_s", ".1f", 1),
            ("TTFT mean (s)", "ttft_mean_s", ".2f", 1),
            ("TTFT median (s)", "ttft_median_s", ".2f", 1),
            ("TTFT p90 (s)", "ttft_p90_s", ".2f", 1),
            ("wall time (s)", "wall_s", ".1f", 1),
            ("prefill tokens", "prefill_tokens", ",", 1),
            ("prefix cache hit rate", "hit_rate", ".1%", 1),
            ("true FLOPs run (TFLOP)", "true_flops", ".2f", 1e-12),
            ("executed FLOPs (TFLOP)", "executed_flops", ".2f", 1e-12),
            ("FLOP rate (GFLOP/s)", "flop_rate", ".1f", 1e-9)]
    print(f"\n## caching: one device, {len(prompts)} requests, best of {args.repeats}")
    print("| metric | prefix caching | no prefix caching | ratio |\n|---|---:|---:|---:|")
    for label, key, spec, scale in rows:
        a, b = on[key] * scale, off[key] * scale
        print(f"| {label} | {a:{spec}} | {b:{spec}} | {a / b if b else float('nan'):.2f}x |")
    print(f"greedy tokens equal in {same} of {len(prompts)} requests; float32 matmul peak "
          f"(jax.jit(jnp.dot) 2048^2) {peak / 1e9:.0f} GFLOP/s")
    return {"runs": runs, "same_tokens": same, "jax_dot_2048_flops": peak}


def part_routing(args, model_dir: Path, prompts) -> dict:
    runs = {}
    for policy in args.policies:
        # no warm-up: times on simulated devices are not measured, programs compile on use
        llm, info = load(model_dir, False, mesh="dp=2", rules="dp", routing=policy,
                         max_steps_in_flight=1)
        placed = track_placements(llm)
        run = run_workload(llm, prompts, args.max_tokens)
        run.pop("tokens")
        run["replica_prefill_tokens"] = placed
        run["largest_replica_share"] = max(placed) / max(1, sum(placed))
        runs[policy] = {**run, **info}
        del llm
    print(f"\n## routing: dp=2 on simulated devices, {len(prompts)} requests")
    print("| policy | hit rate | prefill tokens | true FLOPs (TFLOP) | prefill tokens per replica"
          " | wall (s, simulated) |\n|---|---:|---:|---:|---|---:|")
    for policy, r in runs.items():
        per_replica = " / ".join(f"{t:,}" for t in r["replica_prefill_tokens"])
        print(f"| {policy} | {r['hit_rate']:.1%} | {r['prefill_tokens']:,} | "
              f"{r['true_flops'] / 1e12:.2f} | {per_replica} | {r['wall_s']:.1f} |")
    return {"runs": runs}


PART_FUNCS = {"caching": part_caching, "routing": part_routing}


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.model_dir or DEFAULT_MODEL_DIR
    _, model_dir = model_dirs(args.model_dir, "55m")
    config = json.loads((model_dir / "config.json").read_text())
    prompts = workload(args, config["vocab_size"])
    info = machine_info()
    print(f"{cpu_line(info)}; load average {os.getloadavg()[0]:.2f}; model {root}; "
          f"{len(prompts)} requests: {args.prefixes} prefixes of {args.prefix_len}, suffixes "
          f"{args.suffix_min}..{args.suffix_max}, {args.max_tokens} output tokens", flush=True)
    results = {"date": local_time(),
               "machine": {**info, "loadavg_start": os.getloadavg()},
               "settings": settings(args),
               "prompt_tokens": sum(map(len, prompts)), "parts": {}}
    t_start = time.perf_counter()
    for part in args.parts:
        t0 = time.perf_counter()
        results["parts"][part] = PART_FUNCS[part](args, model_dir, prompts)
        results["parts"][part]["part_s"] = time.perf_counter() - t0
    results["total_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\ntotal {results['total_s']:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        write_json(args.json, results, indent=2, default=json_default)
    return results

