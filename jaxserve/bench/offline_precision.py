"""The offline benchmark's `precision` part: jaxserve in each precision format beside HF
transformers (float32) and, with `--peer llama.cpp`, llama.cpp on GGUF copies of the same
weights, on one workload, each row with what the machine allows.

Workload: batch 1, 8, 32 (--batches) of random 128-token prompts, 128 new tokens each, 2
threads each engine (XLA:CPU on the 2 cores; `torch.set_num_threads`; llama.cpp `-t/-tb`).
jaxserve: `LLM(model_dir, **format overrides, compilation="on_use")` for each of
--precision-formats (jaxserve/bench/formats.py; a format whose setting this engine lacks is
skipped with a message), greedy `generate` with ignore_eos; "on_use" and one untimed run of the
workload per batch, so exactly the shapes the timed calls run compile before them (compiles
during timed calls are counted and warned about). HF: `generate(do_sample=False,
min_new_tokens=max_new_tokens)`. llama.cpp: `llama-batched-bench` (jaxserve/bench/peers.py says
what it runs); its wall time is prompt processing + token generation, its step time T_TG / N.
Output tokens/s = B * N / wall (best of --repeats).

Floors. Each row's generate floor sums, over its prefill step and its N - 1 decode steps, the
time to read what the step must read (weights once per step, the KV context of every sequence)
at this run's 2-thread read bandwidth (byte floor), the time of its FLOPs at the float32 matmul
peak measured in the same run (FLOP floor), and max(bytes, FLOPs) per step (the floor).
Reported: both sums, the floor, floor / wall (the fraction reached) and wall / floor (target
<= 2). Weight bytes: jaxserve's loaded arrays as they are stored (int8 values and their scales
included; an untied embedding table is not read by a decode step), HF's float32 parameters,
llama.cpp's GGUF type (f32 4, f16 2, q8_0 34/32 bytes per weight); KV bytes per token from the
engine's pool (jaxserve), float32 (HF) or f16 (llama.cpp). The FLOP peak is float32's for every
row (8-bit and 16-bit dots are not measured here: a bf16 or int8 row's FLOP floor is an upper
bound). The decode step's ms beside its own per-step floor at the middle context P + N/2 is
shown where the engine reports it (jaxserve's decode window, llama.cpp's T_TG / N).
"""

from __future__ import annotations

import collections
import gc
from types import SimpleNamespace

import numpy as np

from jaxserve.bench.floors import step_cost
from jaxserve.bench.formats import overrides_of, parse_formats, skip_reason
from jaxserve.bench.peers import (GGUF_TYPES, LLAMA_CPP_KV_ITEMSIZE, LlamaCppPeer,
                                  PeerUnavailable, find_llama_cpp)
from jaxserve.bench.report import comma_choices, fmt, print_table, verdict
from jaxserve.bench.runs import greedy, load_llm, timed_generate
from jaxserve.bench.timing import best, median
from jaxserve.bench.workloads import random_prompts

P, N = 128, 128
FLOOR_TARGET = 2.0  # wall / floor, every row
# (jaxserve format, batch, (engine, format), least tokens/s ratio): the jaxserve row's tokens/s
# over the other row's, at the same batch. llama.cpp's q8_0 file quantizes the LM head as well,
# so "int8+head" is the like-for-like row against it; "int8" (a float32 head) is kept beside it.
TARGETS = (("int8+head", 1, ("llama.cpp", "q8_0"), 1.0), ("int8", 1, ("llama.cpp", "q8_0"), 1.0),
           ("int8", 1, ("HF", "fp32"), 2.5), ("fp32", 32, ("HF", "fp32"), 1.5))
PEERS = ("llama.cpp",)


def generate_floor(shape, batch: int, weight_bytes: float, kv_token_bytes: float,
                   bandwidth: float, peak: float, prompt: int = P, new: int = N) -> dict:
    """Floors of one generate call: its prefill step (every prompt token, logits of the last)
    and new - 1 decode steps at contexts prompt + 1 .. prompt + new - 1."""
    per_token = step_cost(shape, 1, 0, 1, 1)["flops"]  # 2 x matmul params, LM head included
    head = 2 * shape.vocab_size * shape.hidden_size
    attn = 4 * shape.num_layers * shape.num_heads * shape.head_dim  # per token, per context
    steps = [(weight_bytes + kv_token_bytes * prompt * batch,
              batch * ((per_token - head) * prompt + head + attn * prompt * (prompt + 1) / 2))]
    steps += [(weight_bytes + kv_token_bytes * c * batch, batch * (per_token + attn * c))
              for c in range(prompt + 1, prompt + new)]
    byte_s = sum(b for b, _ in steps) / bandwidth
    flop_s = sum(f for _, f in steps) / peak
    floor_s = sum(max(b / bandwidth, f / peak) for b, f in steps)
    mid = prompt + new // 2
    step_s = max((weight_bytes + kv_token_bytes * mid * batch) / bandwidth,
                 batch * (per_token + attn * mid) / peak)
    return {"byte_floor_s": byte_s, "flop_floor_s": flop_s, "floor_s": floor_s,
            "decode_step_floor_ms": step_s * 1e3}


def engine_read_bytes(llm) -> tuple[int, float]:
    """(weight bytes a decode step reads, KV bytes per token over all layers) of a loaded LLM."""
    import jax

    leaves = jax.tree.leaves(llm.runner.param_leaves)
    weights = sum(x.size * x.dtype.itemsize for x in leaves)
    config = llm.config
    if not config.tie_word_embeddings:  # the embedding table: a decode step reads B rows of it
        table = next(x for x in leaves if x.shape == (config.vocab_rows, config.hidden_size))
        weights -= table.size * table.dtype.itemsize
    kv = llm.runner.kv
    return weights, kv.nbytes() / (kv.num_blocks * kv.block_size)


def shape_of(ctx) -> SimpleNamespace:
    """The benchmark model's shape with the attribute names `step_cost` reads."""
    return SimpleNamespace(**ctx.model_shape())


def float_read_bytes(shape, itemsize: float, kv_itemsize: float) -> tuple[float, float]:
    cost = step_cost(shape, 1, 1, itemsize, kv_itemsize)
    return cost["weight_bytes"], cost["kv_bytes"]


def run_jaxserve(ctx, name: str, prompts: dict) -> dict:
    """Every batch of one jaxserve format: {batch: row} or {"skipped": why}."""
    args = ctx.args
    overrides = overrides_of(name)
    reason = skip_reason(name, overrides)
    if reason is None:
        try:
            llm, info = load_llm(ctx.ours_dir, False, compilation="on_use", **overrides)
        except (ValueError, TypeError) as e:
            reason = f"format {name!r}: {e}"
    if reason is not None:
        print(f"skipped: {reason}", flush=True)
        return {"skipped": reason}
    # Warm-up calls, the timed workload twice: its shapes compile here. The second call is the
    # one the timed runs repeat: its prompts hit the prefix cache, so its prefill shapes differ.
    for _ in range(2):
        for b in args.batches:
            timed_generate(llm, prompts[b], greedy(N))
    runs = collections.defaultdict(list)
    for r in range(args.repeats):
        for b in args.batches:
            runs[b].append(timed_generate(llm, prompts[b], greedy(N))[0])
        print(f"jaxserve {name} repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"B={b} {runs[b][-1]['wall_s']:.2f}s" for b in args.batches), flush=True)
    weights, kv_token = engine_read_bytes(llm)
    del llm
    gc.collect()
    out = {}
    for b in args.batches:
        compiled = sum(x["stats_delta"].get("compilations", 0) for x in runs[b])
        if compiled:
            print(f"WARNING: jaxserve {name} B={b}: {compiled} programs compiled during timed "
                  "runs", flush=True)
        out[b] = {"wall_s": best([x["wall_s"] for x in runs[b]]),
                  "decode_ms_per_step": median([x["decode"]["ms_per_step"] for x in runs[b]
                                                if x["decode"]]),
                  "weight_bytes": weights, "kv_bytes_per_token": kv_token,
                  "compilations_during_timed_runs": compiled, "runs": runs[b]}
    return {"overrides": overrides, "param_dtype": info["param_dtype"], "batches": out}


def run_hf(ctx, prompts: dict) -> dict:
    args, hf = ctx.args, ctx.hf()
    threads = args.torch_threads[0]
    for b in args.batches:
        hf.generate(prompts[b], None, 4, threads)
    walls = collections.defaultdict(list)
    for r in range(args.repeats):
        for b in args.batches:
            walls[b].append(hf.generate(prompts[b], None, N, threads)[0])
        print(f"HF repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"B={b} {walls[b][-1]:.2f}s" for b in args.batches), flush=True)
    weights, kv_token = float_read_bytes(shape_of(ctx), 4, 4)
    return {"torch_threads": threads, "batches": {
        b: {"wall_s": best(walls[b]), "decode_ms_per_step": None, "weight_bytes": weights,
            "kv_bytes_per_token": kv_token, "walls_s": walls[b]} for b in args.batches}}


def run_llama_cpp(ctx) -> dict:
    """Every GGUF type of --gguf-types: {type: {"batches": ...}}, or {"skipped": why}."""
    from jaxserve.package_data import embedded_model

    args = ctx.args
    try:
        peer = LlamaCppPeer(*find_llama_cpp(args.llama_cpp_dir))
    except PeerUnavailable as e:
        print(str(e), flush=True)
        return {"skipped": str(e)}
    out = {"binary": str(peer.binary)}
    gguf_dir = ctx.ours_dir.parent / "gguf"
    for outtype in args.gguf_types:
        gguf = peer.gguf(ctx.hf_dir, gguf_dir, outtype, embedded_model() / "tokenizer.model")
        runs = [peer.batched_bench(gguf, args.batches, P, N, 2) for _ in range(args.repeats)]
        weights, kv_token = float_read_bytes(shape_of(ctx), GGUF_TYPES[outtype],
                                             LLAMA_CPP_KV_ITEMSIZE)
        out[outtype] = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "batches": {
            b: {"wall_s": best([r[b]["t"] for r in runs]),
                "decode_ms_per_step": median([r[b]["t_tg"] / N * 1e3 for r in runs]),
                "weight_bytes": weights, "kv_bytes_per_token": kv_token,
                "runs": [r[b] for r in runs]} for b in args.batches}}
        print(f"llama.cpp {outtype}: " + ", ".join(
            f"B={b} {out[outtype]['batches'][b]['wall_s']:.2f}s" for b in args.batches),
            flush=True)
    return out


def part_precision(ctx) -> dict:
    args = ctx.args
    mach = ctx.machine()
    bw = mach["read_GBps_2_threads"] * 1e9
    peak = max(mach["numpy_sgemm_2048_GFLOPs"], mach["jax_dot_2048_GFLOPs"]) * 1e9
    rng = np.random.default_rng(args.seed + 4)
    prompts = {b: random_prompts(rng, ctx.vocab, [P] * b) for b in args.batches}
    engines = {("jaxserve", name): run_jaxserve(ctx, name, prompts)
               for name in args.precision_formats}
    engines[("HF", "fp32")] = run_hf(ctx, prompts)
    if "llama.cpp" in args.peer:
        cpp = run_llama_cpp(ctx)
        if "skipped" in cpp:
            engines[("llama.cpp", "all")] = cpp
        else:
            engines.update({("llama.cpp", t): cpp[t] for t in args.gguf_types})
    shape = shape_of(ctx)
    rows, table = [], []
    for (engine, name), res in engines.items():
        if "skipped" in res:
            table.append((f"{engine} {name}", "skipped: " + res["skipped"]))
            continue
        for b, row in res["batches"].items():
            row.update(generate_floor(shape, b, row["weight_bytes"], row["kv_bytes_per_token"],
                                      bw, peak))
            row["tokens_per_s"] = b * N / row["wall_s"]
            row["fraction_of_floor"] = row["floor_s"] / row["wall_s"]
            rows.append({"engine": engine, "format": name, "batch": b, **row})
    by = {(r["engine"], r["format"], r["batch"]): r for r in rows}
    print_rows(f"precision: P={P} + N={N} greedy, 2 threads each (best of {args.repeats}); "
               f"floors from {bw / 1e9:.1f} GB/s and {peak / 1e9:.0f} GFLOP/s", rows, ctx.flag)
    targets = []
    for name, b, other, want in TARGETS:
        a, o = by.get(("jaxserve", name, b)), by.get((*other, b))
        ratio = a["tokens_per_s"] / o["tokens_per_s"] if a and o else None
        targets.append({"jaxserve": name, "batch": b, "versus": " ".join(other),
                        "ratio": ratio, "target": want})
        table.append((f"jaxserve {name} / {' '.join(other)} tok/s at B={b}",
                       fmt(ratio, ".2f", "x"), f">= {want}x",
                       verdict(None if ratio is None else ratio >= want)))
    table.append((f"rows within {FLOOR_TARGET:.0f}x of their floor",
                  f"{sum(r['wall_s'] <= FLOOR_TARGET * r['floor_s'] for r in rows)}/{len(rows)}"))
    print_table("precision: targets and skipped rows", table, ctx.flag)
    return {"prompt_len": P, "new_tokens": N, "bandwidth_GBps": bw / 1e9,
            "peak_GFLOPs": peak / 1e9, "rows": rows, "targets": targets,
            "skipped": {f"{e} {n}": r["skipped"] for (e, n), r in engines.items()
                        if "skipped" in r},
            "engines": {f"{e} {n}": {k: v for k, v in r.items() if k != "batches"}
                        for (e, n), r in engines.items()}}


def print_rows(title: str, rows: list[dict], flag: str = "") -> None:
    """One line per engine, format and batch: speed, floors, fraction of the floor reached."""
    print(f"\n## {title}{'  [' + flag + ']' if flag else ''}")
    print("| engine | format | B | tok/s | wall s | byte floor s | FLOP floor s | floor s | "
          "floor / wall | decode ms/step | its floor ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        compiled = r.get("compilations_during_timed_runs")
        mark = f" (+{compiled} compiles)" if compiled else ""
        print(f"| {r['engine']} | {r['format']}{mark} | {r['batch']} | {fmt(r['tokens_per_s'])} | "
              f"{fmt(r['wall_s'], '.2f')} | {fmt(r['byte_floor_s'], '.3f')} | "
              f"{fmt(r['flop_floor_s'], '.3f')} | {fmt(r['floor_s'], '.3f')} | "
              f"{fmt(r['fraction_of_floor'], '.2f')} | {fmt(r['decode_ms_per_step'], '.2f')} | "
              f"{fmt(r['decode_step_floor_ms'], '.2f')} |")


def add_arguments(p) -> None:
    """The precision part's flags (jaxserve.bench.offline's parser)."""
    p.add_argument("--precision-formats", default="fp32,bf16,int8,kv-int8",
                   help="jaxserve formats of the precision part (jaxserve/bench/formats.py)")
    p.add_argument("--peer", default="",
                   help=f"peers of the precision part beside HF, comma-separated: "
                        f"{', '.join(PEERS)}")
    p.add_argument("--llama-cpp-dir", default=None,
                   help="llama.cpp source tree (with build/bin/llama-batched-bench) or a folder "
                        "holding the binary (default: $LLAMA_CPP_DIR, else PATH)")
    p.add_argument("--gguf-types", default=",".join(GGUF_TYPES),
                   help="llama.cpp weight types, converted next to the model (OUT/gguf/)")


def check_arguments(p, args) -> None:
    try:
        args.precision_formats = parse_formats(args.precision_formats)
    except ValueError as e:
        p.error(f"--precision-formats: {e}")
    args.peer = comma_choices(p, "--peer", args.peer, PEERS, empty_ok=True)
    args.gguf_types = comma_choices(p, "--gguf-types", args.gguf_types, GGUF_TYPES)
