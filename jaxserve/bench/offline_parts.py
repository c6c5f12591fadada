"""The parts of the offline benchmark (`jaxserve.bench.offline` says what each measures): each
takes the run's `Context` and returns its results, printing its table on the way."""

from __future__ import annotations

import collections
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxserve.bench.floors import (jax_dot, matmul_params, numpy_sgemm, read_bandwidth,
                                   step_cost, time_matmul_stack)
from jaxserve.bench.peers import HFPeer, common_prefix, hf_static_batches
from jaxserve.bench.report import fmt, print_table, verdict
from jaxserve.bench.runs import greedy, load_llm, print_warmup, timed_generate
from jaxserve.bench.steps import decode_step_inputs, warm_dispatch
from jaxserve.bench.timing import best, median, readback_loop
from jaxserve.bench.workloads import mixed_workload, random_prompts

EQUAL_TARGETS = {1: 3.0, 8: 2.5, 32: 1.5}  # jaxserve / HF output tokens/s, by batch
FLOOR_TARGET = 1.5  # decode step ms / floor ms
MIXED_TARGET = 3.0
P, N = 128, 128  # the equal workload; the decode part's context is P + N // 2


# ---- shared state of a run ----

class Context:
    """What the parts of one run share: the arguments, the model directories, the results so
    far, and what is loaded or measured once (the default engine, HF, the machine's floors)."""

    def __init__(self, args, hf_dir: Path, ours_dir: Path):
        self.args, self.hf_dir, self.ours_dir = args, hf_dir, ours_dir
        self.results: dict = {}
        self._llm = None
        self._hf = None
        self._machine: dict | None = None
        self._stack: dict[int, dict] = {}
        self.flag = ""  # "LOADED" when the run started on a loaded machine
        with open(ours_dir / "config.json") as f:
            self.vocab = json.load(f)["vocab_size"]

    def llm(self):
        """The float32 default engine `LLM(ours)`, loaded once; its warmup is recorded."""
        if self._llm is None:
            self._llm, info = load_llm(self.ours_dir, not self.args.no_warmup)
            self.results["default_engine"] = info
            print_warmup("default engine LLM(model_dir)", info, self.flag)
        return self._llm

    def hf(self):
        if self._hf is None:
            t0 = time.perf_counter()
            self._hf = HFPeer(self.hf_dir)
            self.results.setdefault("hf_load_s", time.perf_counter() - t0)
        return self._hf

    def machine(self) -> dict:
        """Read bandwidth and matmul peaks, measured once per run (the floor needs them)."""
        if self._machine is None:
            r = self.args.repeats
            nbytes = self.args.bandwidth_mib * 2**20
            self._machine = {
                "read_GBps_2_threads": read_bandwidth(nbytes, 2, r) / 1e9,
                "read_GBps_1_thread": read_bandwidth(nbytes, 1, r) / 1e9,
                "numpy_sgemm_2048_GFLOPs": numpy_sgemm(2048, r) / 1e9,
                "jax_dot_2048_GFLOPs": jax_dot(2048, r) / 1e9,
                "bandwidth_bytes": nbytes}
            gc.collect()
        return self._machine

    def stack(self, batch: int) -> dict:
        """The XLA bare matmul stack at one batch (ms/step: median over repeats)."""
        if batch not in self._stack:
            self._stack[batch] = time_matmul_stack(self.model_shape(), batch,
                                                   self.args.decode_iters, self.args.repeats)
        return self._stack[batch]

    def model_shape(self) -> dict:
        with open(self.ours_dir / "config.json") as f:
            c = json.load(f)
        return {k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                  "num_layers", "num_heads", "num_kv_heads", "head_dim")}


# ---- part: machine ----

def part_machine(ctx: Context) -> dict:
    mach = ctx.machine()
    stacks = {b: ctx.stack(b) for b in ctx.args.batches}
    shape = ctx.model_shape()
    wbytes = matmul_params(shape) * 4
    rows = [("read bandwidth, 2 threads (GB/s)", fmt(mach["read_GBps_2_threads"])),
            ("read bandwidth, 1 thread (GB/s)", fmt(mach["read_GBps_1_thread"])),
            ("numpy sgemm 2048^2 (GFLOP/s)", fmt(mach["numpy_sgemm_2048_GFLOPs"])),
            ("jax.jit(jnp.dot) 2048^2 (GFLOP/s)", fmt(mach["jax_dot_2048_GFLOPs"])), None]
    for b, s in stacks.items():
        ms = s["ms_per_step"]
        rows.append((f"XLA bare matmul stack, batch {b} (ms/step; weight GB/s)",
                     f"{fmt(ms, '.2f')}; {fmt(wbytes / (ms * 1e-3) / 1e9)}"))
    print_table("machine", rows, ctx.flag)
    return {**mach, "matmul_weight_bytes": wbytes,
            "xla_bare_matmul_stack": {str(b): s for b, s in stacks.items()}}


# ---- part: decode ----

def time_decode(llm, batch: int, iters: int, repeats: int = 1) -> list[dict]:
    """The bare decode step at context P + N / 2 (N / 2 generated), `repeats` timed loops."""
    dispatch = warm_dispatch(llm, decode_step_inputs(llm, batch, P + N // 2, N // 2, greedy(N)))
    return [readback_loop(dispatch, iters) for _ in range(repeats)]


def part_decode(ctx: Context) -> dict:
    mach = ctx.machine()
    llm = ctx.llm()
    bw = mach["read_GBps_2_threads"] * 1e9
    peak = max(mach["numpy_sgemm_2048_GFLOPs"], mach["jax_dot_2048_GFLOPs"]) * 1e9
    itemsize = llm.runner.param_leaves[0].dtype.itemsize
    kv_itemsize = jax_leaf_itemsize(llm.runner.kv)
    out, rows = {}, []
    for b in ctx.args.batches:
        runs = time_decode(llm, b, ctx.args.decode_iters, ctx.args.repeats)
        ms = median([r["ms_per_step"] for r in runs])
        cost = step_cost(llm.config, b, P + N // 2, itemsize, kv_itemsize)
        t_bytes, t_flops = cost["bytes"] / bw * 1e3, cost["flops"] / peak * 1e3
        floor = max(t_bytes, t_flops)
        stack = ctx.stack(b)["ms_per_step"]
        out[str(b)] = {"ms_per_step": ms, "runs": runs, **cost,
                       "floor_ms": floor, "floor_bytes_ms": t_bytes, "floor_flops_ms": t_flops,
                       "floor_bound": "bandwidth" if t_bytes >= t_flops else "compute",
                       "fraction_of_floor": floor / ms, "ratio_to_floor": ms / floor,
                       "xla_stack_ms": stack, "ratio_to_xla_stack": ms / stack,
                       "fraction_of_xla_stack": stack / ms}
        o = out[str(b)]
        rows += [(f"batch {b}: decode step (ms)", fmt(ms, ".2f")),
                 (f"batch {b}: floor (ms; {o['floor_bound']}-bound: bytes {t_bytes:.2f} / "
                  f"FLOPs {t_flops:.2f})", fmt(floor, ".2f")),
                 (f"batch {b}: fraction of floor reached (floor / measured)",
                  fmt(o["fraction_of_floor"], ".2f")),
                 (f"batch {b}: measured / floor", fmt(o["ratio_to_floor"], ".2f", "x"),
                  f"<= {FLOOR_TARGET}x", verdict(o["ratio_to_floor"] <= FLOOR_TARGET)),
                 (f"batch {b}: XLA bare matmul stack (ms); measured / stack",
                  f"{fmt(stack, '.2f')}; {fmt(o['ratio_to_xla_stack'], '.2f', 'x')}"), None]
    print_table(f"decode step (default engine, context {P + N // 2}, float32; floor from "
                f"{mach['read_GBps_2_threads']:.1f} GB/s and {peak / 1e9:.0f} GFLOP/s)",
                rows[:-1], ctx.flag)
    return {"context": P + N // 2, "iters": ctx.args.decode_iters, "batches": out,
            "bandwidth_GBps": bw / 1e9, "peak_GFLOPs": peak / 1e9}


def jax_leaf_itemsize(tree) -> int:
    import jax
    return jax.tree.leaves(tree)[0].dtype.itemsize


# ---- part: equal ----

def part_equal(ctx: Context) -> dict:
    args = ctx.args
    llm, hf = ctx.llm(), ctx.hf()
    rng = np.random.default_rng(args.seed)
    prompts = {b: np.asarray(random_prompts(rng, ctx.vocab, [P] * b)) for b in args.batches}
    for b in args.batches:  # warm-up calls (excluded)
        for t in args.torch_threads:
            hf.generate(prompts[b], None, 4, t)
        timed_generate(llm, prompts[b].tolist(), greedy(4))
    runs = {b: collections.defaultdict(list) for b in args.batches}
    tokens = {b: {} for b in args.batches}
    for r in range(args.repeats):
        msg = []
        for b in args.batches:
            for t in args.torch_threads:
                wall, tokens[b][f"hf{t}"] = hf.generate(prompts[b], None, N, t)
                runs[b][f"hf{t}"].append(wall)
            res, tokens[b]["jax"] = timed_generate(llm, prompts[b].tolist(), greedy(N))
            runs[b]["jax"].append(res)
            runs[b]["bare"].append(time_decode(llm, b, N - 1)[0])
            msg.append(f"B={b}: jaxserve {res['wall_s']:.2f}s HF "
                       f"{runs[b][f'hf{args.torch_threads[0]}'][-1]:.2f}s")
        print(f"equal repeat {r + 1}/{args.repeats}: " + ", ".join(msg), flush=True)
    out, rows = {}, []
    head = args.torch_threads[0]
    for b in args.batches:
        ru = runs[b]
        jax_tps = b * N / best([x["wall_s"] for x in ru["jax"]])
        hf_tps = {t: b * N / best(ru[f"hf{t}"]) for t in args.torch_threads}
        ratio = jax_tps / hf_tps[head]
        target = EQUAL_TARGETS.get(b)
        engine = [x["decode"]["ms_per_step"] if x["decode"] else None for x in ru["jax"]]
        bare = [x["ms_per_step"] for x in ru["bare"]]
        overhead = median([(e - a) / e * 100 for e, a in zip(engine, bare) if e is not None])
        ref = np.asarray(tokens[b][f"hf{head}"])
        prefix = [common_prefix(a, h) for a, h in zip(tokens[b]["jax"], ref)]
        matching = sum(p == N for p in prefix)
        recompiled = sum(x["stats_delta"].get("compilations", 0) for x in ru["jax"])
        out[str(b)] = {"jaxserve_tokens_per_s": jax_tps,
                       "hf_tokens_per_s": {str(t): v for t, v in hf_tps.items()},
                       "ratio_jaxserve_over_hf": ratio, "target": target,
                       "engine_decode_ms_per_step": median(engine),
                       "bare_decode_ms_per_step": median(bare),
                       "host_overhead_pct": overhead,
                       "rows_matching_hf": matching, "common_prefix_per_row": prefix,
                       "compilations_during_timed_runs": recompiled,
                       "runs": {k: v for k, v in ru.items()}}
        rows += [(f"B={b}: HF generate, {head} torch threads (tok/s)", fmt(hf_tps[head])),
                 *[(f"B={b}: HF generate, {t} torch threads (tok/s)", fmt(hf_tps[t]))
                   for t in args.torch_threads[1:]],
                 (f"B={b}: jaxserve generate (tok/s)", fmt(jax_tps)),
                 (f"B={b}: ratio jaxserve / HF", fmt(ratio, ".2f", "x"),
                  f">= {target}x" if target else "", verdict(ratio >= target) if target else ""),
                 (f"B={b}: engine decode step in generate / bare step (ms)",
                  f"{fmt(median(engine), '.2f')} / {fmt(median(bare), '.2f')}"),
                 (f"B={b}: host overhead (%)", fmt(overhead)),
                 (f"B={b}: greedy rows equal to HF's", f"{matching}/{b}"), None]
        if matching != b:
            print(f"WARNING: B={b}: jaxserve's greedy tokens differ from HF's on {b - matching} "
                  f"rows (common prefix per row: {prefix})", file=sys.stderr)
        if recompiled:
            print(f"WARNING: B={b}: {recompiled} programs compiled during timed runs",
                  file=sys.stderr)
    print_table(f"equal workload: P={P} + N={N} greedy, float32 (tok/s: best of {args.repeats};"
                " ms: median)", rows[:-1], ctx.flag)
    return {"prompt_len": P, "new_tokens": N, "torch_threads": args.torch_threads,
            "batches": out}


# ---- part: mixed ----

def part_mixed(ctx: Context) -> dict:
    args = ctx.args
    llm, hf = ctx.llm(), ctx.hf()
    prompts, out_lens = mixed_workload(args.mixed_requests, args.seed, ctx.vocab)
    useful = sum(out_lens)
    params = [greedy(n) for n in out_lens]
    head = args.torch_threads[0]
    timed_generate(llm, prompts[:8], params[:8])  # warm-up (excluded)
    hf_static_batches(hf, prompts[:8], [4] * min(8, len(prompts)), head, progress=False)
    runs = collections.defaultdict(list)
    jax_tokens = hf_tokens = None
    for r in range(args.mixed_repeats):
        res, jax_tokens = timed_generate(llm, prompts, params)
        runs["jax"].append(res)
        print(f"mixed repeat {r + 1}/{args.mixed_repeats}: jaxserve {res['wall_s']:.1f}s; HF "
              f"in {math.ceil(len(prompts) / 8)} batches of 8:", flush=True)
        wall, hf_tokens, walls = hf_static_batches(hf, prompts, out_lens, head)
        runs["hf"].append({"wall_s": wall, "batch_walls_s": walls})
    assert [len(t) for t in jax_tokens] == out_lens
    jax_tps = useful / best([x["wall_s"] for x in runs["jax"]])
    hf_tps = useful / best([x["wall_s"] for x in runs["hf"]])
    ratio = jax_tps / hf_tps
    hf_generated = sum(len(prompts[k:k + 8]) * max(out_lens[k:k + 8])
                       for k in range(0, len(prompts), 8))
    prefix = [common_prefix(a, b) for a, b in zip(jax_tokens, hf_tokens)]
    matching = sum(p == n for p, n in zip(prefix, out_lens))
    rows = [("requests; prompt tokens; useful output tokens",
             f"{len(prompts)}; {sum(map(len, prompts))}; {useful}"),
            ("HF tokens generated (static batches of 8, incl. waste)", hf_generated),
            (f"HF generate, {head} torch threads: wall (s); useful tok/s",
             f"{fmt(best([x['wall_s'] for x in runs['hf']]))}; {fmt(hf_tps)}"),
            ("jaxserve generate: wall (s); useful tok/s",
             f"{fmt(best([x['wall_s'] for x in runs['jax']]))}; {fmt(jax_tps)}"),
            ("ratio jaxserve / HF", fmt(ratio, ".2f", "x"), f">= {MIXED_TARGET}x",
             verdict(ratio >= MIXED_TARGET)),
            ("jaxserve preemptions; compilations during timed runs",
             f"{runs['jax'][-1]['stats_delta'].get('preemptions', 0)}; "
             f"{sum(x['stats_delta'].get('compilations', 0) for x in runs['jax'])}"),
            ("requests whose greedy tokens equal HF's (info)", f"{matching}/{len(prompts)}")]
    print_table(f"mixed workload: prompts 16..1024, outputs 16..512 (best of "
                f"{args.mixed_repeats})", rows, ctx.flag)
    return {"requests": len(prompts), "useful_tokens": useful, "hf_generated_tokens": hf_generated,
            "prompt_lens": [len(p) for p in prompts], "out_lens": out_lens,
            "jaxserve_useful_tokens_per_s": jax_tps, "hf_useful_tokens_per_s": hf_tps,
            "ratio_jaxserve_over_hf": ratio, "target": MIXED_TARGET,
            "requests_matching_hf": matching, "common_prefix_per_request": prefix,
            "runs": dict(runs)}


# ---- part: long ----

def long_context_copy(ours: Path, dest: Path, max_positions: int = 32768) -> Path:
    """A copy of the checkpoint whose config says max_position_embeddings = max_positions
    (weights shared through symlinks)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in ours.iterdir():
        if entry.name != "config.json":
            (dest / entry.name).symlink_to(entry.resolve())
    with open(ours / "config.json") as f:
        config = json.load(f)
    config["max_position_embeddings"] = max_positions
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def part_long(ctx: Context) -> dict:
    args = ctx.args
    batch, prompt_len, new = 8, 64, 32
    prompts = random_prompts(np.random.default_rng(args.seed + 2), ctx.vocab, [prompt_len] * batch)
    with tempfile.TemporaryDirectory(prefix="jaxserve-long-") as tmp:
        copy = long_context_copy(ctx.ours_dir, Path(tmp) / "jaxserve")
        engines = {}
        for name, kwargs in (("default", {}), ("max_model_len=2048", {"max_model_len": 2048})):
            llm, info = load_llm(copy, not args.no_warmup, **kwargs)
            print_warmup(f"long-context copy, LLM(copy{', max_model_len=2048' if kwargs else ''})",
                         info, ctx.flag)
            timed_generate(llm, prompts, greedy(4))  # warm-up (excluded)
            engines[name] = (llm, info)
        runs = collections.defaultdict(list)
        for r in range(args.repeats):
            for name, (llm, _) in engines.items():
                runs[name].append(timed_generate(llm, prompts, greedy(new))[0])
            print(f"long repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]['wall_s']:.2f}s" for k, v in runs.items()), flush=True)
        infos = {k: v[1] for k, v in engines.items()}
        del engines, llm
        gc.collect()
    walls = {k: [x["wall_s"] for x in v] for k, v in runs.items()}
    b_def, b_cap = best(walls["default"]), best(walls["max_model_len=2048"])
    ratio = b_def / b_cap
    noise = max((median(w) - best(w)) / best(w) for w in walls.values())
    ok = abs(ratio - 1) <= max(noise, 0.05)
    rows = [("default: max_model_len; KV blocks", f"{infos['default']['max_model_len']}; "
             f"{infos['default']['kv_blocks_total']}"),
            ("default: load (s); warmup (s, programs)",
             f"{fmt(infos['default']['load_s'])}; {fmt(infos['default']['warmup_s'])}, "
             f"{fmt(infos['default']['warmup_programs'], 'd')}"),
            ("max_model_len=2048: KV blocks", infos["max_model_len=2048"]["kv_blocks_total"]),
            ("max_model_len=2048: load (s); warmup (s, programs)",
             f"{fmt(infos['max_model_len=2048']['load_s'])}; "
             f"{fmt(infos['max_model_len=2048']['warmup_s'])}, "
             f"{fmt(infos['max_model_len=2048']['warmup_programs'], 'd')}"),
            ("generate wall, default / max_model_len=2048 (s, best)",
             f"{fmt(b_def, '.3f')} / {fmt(b_cap, '.3f')}"),
            ("ratio default / max_model_len=2048", fmt(ratio, ".3f", "x"),
             f"1 within noise ({max(noise, 0.05) * 100:.0f}%"
             f"{'; 1 repeat: noise not measured' if args.repeats == 1 else ''})", verdict(ok))]
    print_table(f"long max_position_embeddings (32768): {batch} x ({prompt_len} + {new}) greedy "
                f"(best of {args.repeats})", rows, ctx.flag)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new, "engines": infos,
            "wall_s": walls, "ratio_default_over_capped": ratio, "noise": noise,
            "equal_within_noise": ok, "runs": dict(runs)}


# ---- part: bf16 ----

def part_bf16(ctx: Context) -> dict:
    args = ctx.args
    f32 = ctx.llm()
    bf16, info = load_llm(ctx.ours_dir, not args.no_warmup, dtype="bfloat16")
    print_warmup('LLM(model_dir, dtype="bfloat16")', info, ctx.flag)
    engines = {"float32": f32, "bfloat16": bf16}
    gen_b = max(args.bf16_batches)
    prompts = random_prompts(np.random.default_rng(args.seed + 3), ctx.vocab, [P] * gen_b)
    for llm in engines.values():
        timed_generate(llm, prompts, greedy(4))
    runs = {k: collections.defaultdict(list) for k in engines}
    for r in range(args.repeats):
        for name, llm in engines.items():
            for b in args.bf16_batches:
                runs[name][f"decode{b}"] += time_decode(llm, b, args.decode_iters)
            runs[name]["generate"].append(timed_generate(llm, prompts, greedy(N))[0])
        print(f"bf16 repeat {r + 1}/{args.repeats} done", flush=True)
    del bf16, engines
    gc.collect()
    out, rows = {}, []
    for name, ru in runs.items():
        out[name] = {"decode_ms_per_step": {str(b): median([x["ms_per_step"]
                                                            for x in ru[f"decode{b}"]])
                                            for b in args.bf16_batches},
                     "generate_tokens_per_s": gen_b * N / best([x["wall_s"]
                                                                for x in ru["generate"]]),
                     "runs": dict(ru)}
    for b in args.bf16_batches:
        a, c = out["float32"]["decode_ms_per_step"][str(b)], \
            out["bfloat16"]["decode_ms_per_step"][str(b)]
        rows.append((f"decode step batch {b}, float32 / bfloat16 (ms); f32/bf16",
                     f"{fmt(a, '.2f')} / {fmt(c, '.2f')}; {fmt(a / c, '.2f', 'x')}"))
    a, c = out["float32"]["generate_tokens_per_s"], out["bfloat16"]["generate_tokens_per_s"]
    rows.append((f"generate B={gen_b} P={P} N={N}, float32 / bfloat16 (tok/s); bf16/f32",
                 f"{fmt(a)} / {fmt(c)}; {fmt(c / a, '.2f', 'x')}"))
    print_table("bfloat16 vs float32 (default engines)", rows, ctx.flag)
    return {"bfloat16_engine": info, **out}


PART_FUNCS = {"machine": part_machine, "decode": part_decode, "equal": part_equal,
              "mixed": part_mixed, "long": part_long, "bf16": part_bf16}
