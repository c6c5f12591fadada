"""MoE strategies side by side: dense vs alltoall vs allgather prefill throughput across tokens
per step, on simulated devices (ep=D) and on one device; the crossover; decode at small batch.

    python scripts/bench_moe.py --json benchmarks/moe.json          # defaults (a few minutes)
    python scripts/bench_moe.py --quick                              # tiny sizes (seconds)

Simulated CPU devices share this machine's cores and memory: a collective is a memory copy
and D devices compute one after another on 2 cores. So these numbers show each strategy's
mechanism and the cost of its communication and compute, not a speed-up from more devices.

Every row runs the engine's own prefill-only program (`LLM.logits`' pass: every token's logits)
with defaults except the strategy, over random token ids (real routing, not padding). Per row:
ms per step (best of --repeats), tokens/s, true FLOPs (jaxserve.flops: top-k experts, causal
attention) and the FLOPs XLA counts in the compiled program (padding, all experts for `dense`,
capacity slack for `alltoall`, grouped matmuls that XLA:CPU lowers densely), bytes each device
sends per MoE layer (activations for alltoall, weights for allgather), and the floor
max(true FLOPs / matmul peak, weight bytes / read bandwidth), both measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import numpy as np

from jaxserve.bench.floors import jax_dot, read_bandwidth
from jaxserve.bench.machine import CpuWatch, machine_info
from jaxserve.bench.models import save_random_model
from jaxserve.bench.report import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="simulated devices for the ep mesh")
    p.add_argument("--tokens", default="16,64,256",
                   help="prefill tokens per device per step (comma-separated)")
    p.add_argument("--decode-batch", default="1,4", help="sequences per device when decoding")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=16,
                   help="decode steps timed per row (the difference of two runs)")
    p.add_argument("--quick", action="store_true", help="a tiny model and sizes (smoke run)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.decode_batch = [int(b) for b in args.decode_batch.split(",")]
    if args.quick:
        args.tokens, args.decode_batch, args.repeats, args.decode_steps = [16], [1], 1, 4
    return args


STRATEGIES = ("dense", "alltoall", "allgather")
# A Qwen3-MoE-shaped model: every layer MoE, 16 experts, top-2 (hidden 256, expert width 512).
MODEL = dict(family="qwen3_moe", vocab_size=2048, hidden_size=256, intermediate_size=512,
             num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
             max_position_embeddings=2048, qk_norm=True, num_experts=16, num_experts_per_tok=2,
             moe_intermediate_size=512, norm_topk_prob=True)
QUICK_MODEL = dict(MODEL, hidden_size=64, intermediate_size=128, num_layers=2, head_dim=16,
                   num_experts=8, moe_intermediate_size=64, vocab_size=512)


def exchange_bytes(config, strategy: str, tokens: int, devices: int, itemsize: int) -> float:
    """Bytes one device sends per MoE layer: alltoall's fixed-capacity buffers there and back
    (every slot, used or not), or allgather's share of the other devices' experts it receives
    (counted as what the gather moves per device)."""
    if devices == 1 or strategy == "dense":
        return 0.0
    e = config.hidden_size
    if strategy == "alltoall":
        pairs = tokens * config.num_experts_per_tok
        return 2 * (devices - 1) * pairs * e * itemsize  # [devices, pairs, embed], off-device
    weights = config.num_experts * 3 * e * config.moe_intermediate_size * itemsize
    return weights * (devices - 1) / devices


def prefill_rows(llm, config, tokens_per_device: int, repeats: int, rng) -> dict:
    from jaxserve import flops
    from jaxserve.kv_cache import NULL_BLOCK
    from jaxserve.perf.calibrate import best_time

    runner, builder = llm.runner, llm.engine.builder
    n, bs = runner.num_replicas, runner.block_size
    table = list(range(NULL_BLOCK + 1, NULL_BLOCK + 1 + -(-tokens_per_device // bs)))
    seqs = [rng.integers(3, config.vocab_size, tokens_per_device).tolist() for _ in range(n)]
    tokens, md, _ = builder.prefill_only([[(s, table)] for s in seqs])
    executed = runner.program_flops((tokens, md), "forward")
    seconds = best_time(lambda: runner.forward(tokens, md).block_until_ready(), repeats)
    true = n * flops.chunk_flops(config, 0, tokens_per_device, tokens_per_device)
    return {"seconds": seconds, "tokens": n * tokens_per_device,
            "true_flops": true, "executed_flops": executed}


def decode_row(llm, config, batch_per_device: int, repeats: int, rng, steps: int = 16) -> dict:
    """ms per decode step: generate 1 token vs 1 + steps (same prompts), the difference over
    steps."""
    from jaxserve import SamplingParams
    from jaxserve.perf.calibrate import best_time

    n = llm.runner.num_replicas
    prompts = [rng.integers(3, config.vocab_size, 24).tolist() for _ in range(n * batch_per_device)]

    def run(k):
        return lambda: llm.generate(prompts, SamplingParams(temperature=0, max_tokens=k,
                                                            ignore_eos=True), use_tqdm=False)

    long, short = best_time(run(1 + steps), repeats), best_time(run(1), repeats)
    return {"seconds": max(long - short, 0.0) / steps, "batch": n * batch_per_device}


def main(argv=None) -> dict:
    args = parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    import jax

    from jaxserve import LLM
    from jaxserve.ops.moe import MoEExecution

    shape = QUICK_MODEL if args.quick else MODEL
    machine = {"bandwidth_Bps": read_bandwidth(256 << 20 if not args.quick else 32 << 20, 2,
                                                args.repeats),
               "matmul_flops": jax_dot(1024 if not args.quick else 256, args.repeats)}
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": machine_info(), "measured": machine, "model": shape,
               "devices": args.devices, "prefill": [], "decode": []}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, CpuWatch() as watch:
        config = save_random_model(shape, Path(tmp) / "moe")
        itemsize = 4
        weight_bytes = config.num_params() * itemsize
        meshes = [(None, "tp", 1), (f"ep={args.devices}", "ep", args.devices)]
        for mesh, rules, devices in meshes:
            llm = LLM(Path(tmp) / "moe", mesh=mesh, rules=rules, compilation="on_use")
            for strategy in STRATEGIES:
                llm.runner.set_moe(MoEExecution(strategy))
                for t in args.tokens:
                    row = prefill_rows(llm, config, t, args.repeats, rng)
                    floor = max(row["true_flops"] / machine["matmul_flops"],
                                weight_bytes / machine["bandwidth_Bps"])
                    row.update(mesh=mesh or "one device", devices=devices, strategy=strategy,
                               tokens_per_device=t, floor_s=floor,
                               bytes_per_layer=exchange_bytes(config, strategy, t, devices,
                                                              itemsize))
                    results["prefill"].append(row)
                    print_row(row)
                if devices > 1 and strategy != "dense":
                    for b in args.decode_batch:
                        row = decode_row(llm, config, b, args.repeats, rng, args.decode_steps)
                        row.update(mesh=mesh, strategy=strategy, batch_per_device=b,
                                   floor_s=weight_bytes / machine["bandwidth_Bps"])
                        results["decode"].append(row)
                        print(f"decode {mesh} {strategy:9s} batch {row['batch']:3d}: "
                              f"{row['seconds'] * 1e3:8.2f} ms/step "
                              f"(floor {row['floor_s'] * 1e3:.2f} ms)", flush=True)
            del llm
            jax.clear_caches()
    results["cpu"] = watch.result  # other processes' CPU use during the run, in cores
    results["crossover"] = crossover(results["prefill"], args.devices)
    summarise(results)
    if args.json:
        write_json(args.json, results, default=None)
    return results


def print_row(r: dict) -> None:
    print(f"prefill {r['mesh']:>11s} {r['strategy']:9s} {r['tokens']:5d} tok: "
          f"{r['seconds'] * 1e3:9.2f} ms  {r['tokens'] / r['seconds']:9.0f} tok/s  "
          f"floor {r['floor_s'] * 1e3:7.2f} ms ({r['floor_s'] / r['seconds']:.0%})  "
          f"executed/true FLOPs {r['executed_flops'] / r['true_flops']:5.2f}  "
          f"sent/layer {r['bytes_per_layer'] / 2**20:7.2f} MiB", flush=True)


def crossover(rows: list[dict], devices: int) -> dict:
    """Smallest step (tokens, all devices) at which allgather is at least as fast as
    alltoall on the ep mesh, and the threshold `auto` would take from it."""
    mesh = [r for r in rows if r["devices"] == devices]
    by = {(r["strategy"], r["tokens"]): r["seconds"] for r in mesh}
    sizes = sorted({r["tokens"] for r in mesh})
    wins = [t for t in sizes if by.get(("allgather", t), 1e9) <= by.get(("alltoall", t), 0)]
    first = wins[0] if wins else None
    below = [t for t in sizes if first is not None and t < first]
    return {"allgather_wins_from_tokens": first,
            "auto_threshold": (below[-1] if below else 0) if first is not None else None,
            "sizes": sizes}


def summarise(results: dict) -> None:
    c = results["crossover"]
    print(f"\ncrossover on {results['devices']} simulated devices: allgather at least as fast "
          f"as alltoall from {c['allgather_wins_from_tokens']} tokens per step "
          f"(auto threshold {c['auto_threshold']}) over sizes {c['sizes']}")
    if results.get("cpu"):
        print(f"other processes used {results['cpu']['others_cores']:.2f} cores during the run")
    m = results["measured"]
    print(f"measured: read bandwidth {m['bandwidth_Bps'] / 1e9:.1f} GB/s, matmul "
          f"{m['matmul_flops'] / 1e9:.0f} GFLOP/s")

