"""Offline generation benchmark: jaxserve vs HF transformers, and jaxserve's host overhead.

    python scripts/bench_offline.py --json bench.json      # 55M random Llama, B=8, P=128, N=128
    python scripts/bench_offline.py --batch 4 --prompt-len 64 --new-tokens 32 --skip-hf

One process, one set of weights (`scripts/random_model.py --preset 55m`: OUT/hf for transformers,
OUT/jaxserve for us; built into /tmp/jaxserve-bench-55m when --model-dir is not given), one
workload: B random same-length prompts of P token ids (no padding), N greedy new tokens per
prompt, every row generating exactly N (`min_new_tokens` for HF, `ignore_eos` for us). Float32 on
CPU; jaxserve on ONE device (no simulated host devices). Model loading, XLA compilation
(`LLM.warmup()`) and one small warm-up call of each side are excluded from every timing.

Statistic: each measurement is repeated --repeats times; within a repeat every measurement runs
once, back to back, so machine noise (other jobs on the 2 cores) hits all of them alike.
Output tokens/s use the best (min) wall time of the repeats, since interference only ever adds
time; ms per decode step are medians; a host overhead % is computed per repeat from that
repeat's paired numbers and the median over repeats is reported. The JSON keeps every run.

What is measured
  * HF transformers: `model.generate(..., do_sample=False, max_new_tokens=N, min_new_tokens=N)`
    after `torch.set_num_threads(t)` for each t in --torch-threads (default 2, then 1; the first
    is the headline reference). Output tokens/s = B*N / wall time. The 1-thread run is there
    because torch's OpenMP pool degrades badly when the machine is oversubscribed: each parallel
    region waits for a descheduled worker.
  * jaxserve: `LLM.generate(token_id_lists, SamplingParams(temperature=0, max_tokens=N,
    ignore_eos=True))` with the engine sized to the workload (max_num_seqs=B, one prefill step
    for the whole batch). Output tokens/s = B*N / wall time. Its tokens are compared with HF's
    (greedy float32 should agree; a mismatching row is reported with the position where it
    diverges, as a warning).
  * Bare decode step: the compiled decode program (`llm.runner.step(inputs, decode=True)`) in a
    tight loop of K calls (default N-1, the engine's decode steps) with one fixed StepInputs of
    batch B built like `Engine._dispatch` builds a decode (positions P, block tables covering
    P+N tokens, slots 0..B-1, greedy sampling columns). Attention reads every page of the block
    table, so a fixed position costs what the engine's moving one does. Variants: numpy inputs
    and no readback (dispatch back to back, one `jax.block_until_ready` at the end): the
    reference for host overhead; numpy inputs with the engine's readback pattern
    (`np.asarray(out.tokens)` of the oldest step once 2 are in flight); inputs put on the device
    once (shows what per-step host->device input conversion costs). The no-readback loop's
    dispatches stop being free once XLA's CPU client has its limit of computations queued (32
    per device): from then on each `runner.step` call waits for a slot, which is why its "host
    time in runner.step" is most of a step and is not host work.
  * Engine decode step: `Engine.step` is wrapped (a timestamp and the counters after each call)
    during the timed `generate`. The prefill's sampled tokens are read back by the first
    `Engine.step` after which `generated_tokens` >= B; from then to the end of `generate` the
    device runs only decode steps (one was dispatched just before that readback) and the host
    does all the engine's work for them. Engine ms per decode step = (t_end - t_prefill_read) /
    (decode steps read back in that window). This charges every bit of host work, exposed or
    not, and excludes the prefill without modelling it. Cross-checks in the table and JSON:
    (generate time - prefill-only generate time) / decode steps, the prefill-only run being the
    same generate with max_tokens=1; and the median interval between consecutive `Engine.step`
    returns in that window, beside the median interval between readbacks of the bare readback
    loop (medians shrug off bursts of outside load within a run).
  * Host overhead % = (engine ms/decode step - bare ms/decode step) / engine ms/decode step *
    100; also against the readback loop, from the median intervals, and from process CPU time
    per decode step (engine window vs bare loop; least sensitive to outside load).
    `llm.stats()` timers (schedule_s, dispatch_s, readback_wait_s, process_s) of the fastest
    timed run say where the engine's time goes: readback_wait_s is time blocked on the device,
    the other three are host work, normally overlapped with the device's step (but on 2 CPU
    cores the host thread competes with XLA's compute threads).

Prints the tables and, with --json, writes every number plus the date, machine and versions.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = Path("/tmp/jaxserve-bench-55m")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call (B)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (P)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (N)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a directory written by scripts/random_model.py (holding hf/ and "
                        f"jaxserve/); default {DEFAULT_MODEL_DIR}, built with --preset if absent")
    p.add_argument("--preset", default="55m", help="random_model.py preset for the default dir")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF transformers")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions (tok/s: best; ms: median; overhead: median of the "
                        "paired per-repeat values; the JSON keeps every run)")
    p.add_argument("--bare-iters", type=int, default=None,
                   help="K: calls per bare decode loop (default N-1, the engine's decode steps)")
    p.add_argument("--torch-threads", default="2,1",
                   help="comma-separated torch thread counts to run HF with; the first is the "
                        "headline reference, the others are reported beside it")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine token budget per step (default: B * max_prefill_chunk, so "
                        "the whole batch is prefilled in one step)")
    p.add_argument("--max-prefill-chunk", type=int, default=None,
                   help="engine prefill chunk (default: P, at most 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "repeats", "bare_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.torch_threads = [int(t) for t in str(args.torch_threads).split(",")]
    except ValueError:
        p.error("--torch-threads must be comma-separated integers")
    if not args.torch_threads or min(args.torch_threads) < 1:
        p.error("--torch-threads must be positive integers")
    return args


# ---- setup ----

def model_dirs(args) -> tuple[Path, Path]:
    root = args.model_dir or DEFAULT_MODEL_DIR
    hf, ours = root / "hf", root / "jaxserve"
    if not (ours / "config.json").is_file() or not (hf / "config.json").is_file():
        if args.model_dir is not None:
            sys.exit(f"{root} is not a random_model.py output (needs hf/ and jaxserve/)")
        print(f"building the {args.preset} random model into {root} ...", flush=True)
        sys.path.insert(0, str(REPO / "scripts"))
        import random_model
        random_model.make(args.preset, root)
    return hf, ours


def machine_info() -> dict:
    import jax
    import jaxlib
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "XLA_FLAGS": os.environ.get("XLA_FLAGS")}
    try:
        import flax
        info["flax"] = flax.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch
        import transformers
        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "jaxserve"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["git_commit"] = head or None
        info["jaxserve_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---- HF transformers ----

class HFSide:
    def __init__(self, hf_dir: Path):
        import torch
        import transformers
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32).eval()

    def generate(self, prompts: np.ndarray, new_tokens: int, threads: int
                 ) -> tuple[float, np.ndarray]:
        torch = self.torch
        torch.set_num_threads(threads)
        ids = torch.from_numpy(prompts.astype(np.int64))
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=0)
            wall = time.perf_counter() - t0
        out = out[:, prompts.shape[1]:].numpy()
        assert out.shape == (prompts.shape[0], new_tokens), out.shape
        return wall, out


# ---- jaxserve ----

class StepRecorder:
    """Wraps `engine.step`: after each call, (time, generated_tokens, decode_steps, CPU time)."""

    def __init__(self, engine):
        self.engine, self.inner, self.marks = engine, engine.step, []

    def __call__(self):
        finished = self.inner()
        c = self.engine.counters
        self.marks.append((time.perf_counter(), c["generated_tokens"], c["decode_steps"],
                           time.process_time()))
        return finished

    def __enter__(self):
        self.marks = []
        self.engine.step = self
        return self

    def __exit__(self, *exc):
        del self.engine.step  # back to the class's method


def jax_generate(llm, prompts: list[list[int]], new_tokens: int):
    from jaxserve import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    before = dict(llm.stats())
    with StepRecorder(llm.engine) as rec:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        t_end, cpu_end = time.perf_counter(), time.process_time()
    after = llm.stats()
    tokens = np.array([o.outputs[0].token_ids for o in outs], np.int64)
    assert tokens.shape == (len(prompts), new_tokens), tokens.shape
    delta = {k: after[k] - before.get(k, 0) for k in
             ("steps", "prefill_steps", "decode_steps", "generated_tokens", "discarded_tokens",
              "schedule_s", "dispatch_s", "readback_wait_s", "process_s") if k in after}
    b = len(prompts)
    base_gen = before.get("generated_tokens", 0)
    # the first Engine.step after which every prefill-sampled token has been read back
    first = next((i for i, m in enumerate(rec.marks) if m[1] - base_gen >= b), None)
    decode = None
    if first is not None and delta.get("decode_steps", 0):
        t_first, gen_first, _, cpu_first = rec.marks[first]
        decodes_read = (gen_first - base_gen - b) // b  # rows decode in lockstep here
        window = delta["decode_steps"] - decodes_read
        if window > 0:
            gaps = np.diff([m[0] for m in rec.marks[first:]])
            decode = {"window_s": t_end - t_first, "decode_steps_in_window": window,
                      "ms_per_step": (t_end - t_first) / window * 1e3,
                      "median_interval_ms": float(np.median(gaps)) * 1e3 if gaps.size else None,
                      "cpu_ms_per_step": (cpu_end - cpu_first) / window * 1e3,
                      "prefill_read_s": t_first - t0}
    return {"wall_s": t_end - t0, "engine_steps_calls": len(rec.marks), "stats_delta": delta,
            "decode": decode}, tokens


def decode_inputs(llm, batch: int, prompt_len: int, new_tokens: int):
    """A decode StepInputs for slots 0..B-1 at position P, built like Engine._dispatch."""
    from jaxserve import SamplingParams
    from jaxserve.runtime.runner import MAX_SUPPRESSED, StepInputs, bucket
    from jaxserve.runtime.sampling import SamplingInputs
    engine, runner = llm.engine, llm.runner
    bs = runner.block_size
    rows = engine._rows(batch)
    nblk = math.ceil((prompt_len + new_tokens) / bs)
    nb = bucket(nblk, 4)
    if 1 + batch * nblk > runner.kv.num_blocks:
        raise ValueError("KV pool too small for the bare decode loop")
    positions = np.full((rows, 1), -1, np.int32)
    tables = np.zeros((rows, nb), np.int32)
    slot_ids = np.full((rows,), engine.trash_slot, np.int32)
    samples = np.zeros((rows,), np.bool_)
    for r in range(batch):
        positions[r, 0] = prompt_len
        tables[r, :nblk] = np.arange(1 + r * nblk, 1 + (r + 1) * nblk)
        slot_ids[r] = r
        samples[r] = True
    sampling = SamplingInputs.from_params([SamplingParams(temperature=0)] * batch,
                                          seeds=[0] * batch, counters=[0] * batch,
                                          batch_size=rows)
    suppressed = np.full((rows, MAX_SUPPRESSED), llm.config.vocab_size, np.int32)
    return StepInputs(np.zeros((rows, 1), np.int32), positions, np.zeros((rows, 1), np.bool_),
                      tables, slot_ids, np.zeros((rows,), np.bool_), samples,
                      np.zeros((rows,), np.bool_), suppressed, sampling)


def bare_loop(runner, inputs, iters: int, readback: bool, in_flight: int = 2) -> dict:
    """The compiled decode program called back to back: seconds per step, host seconds per
    dispatch, process CPU seconds per step, and (readback mode) the median interval between
    consecutive readbacks."""
    import jax
    jax.block_until_ready(runner.slot_state)
    dispatch, marks = 0.0, []
    t0, cpu0 = time.perf_counter(), time.process_time()
    if readback:  # the engine's pattern: dispatch, then read back the oldest once 2 are out
        queue = collections.deque()
        for _ in range(iters):
            t = time.perf_counter()
            queue.append(runner.step(inputs, decode=True))
            dispatch += time.perf_counter() - t
            if len(queue) >= in_flight:
                np.asarray(queue.popleft().tokens)
                marks.append(time.perf_counter())
        while queue:
            np.asarray(queue.popleft().tokens)
    else:
        out = None
        for _ in range(iters):
            t = time.perf_counter()
            out = runner.step(inputs, decode=True)
            dispatch += time.perf_counter() - t
        jax.block_until_ready((out, runner.kv, runner.slot_state))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"s_per_step": wall / iters, "dispatch_s_per_step": dispatch / iters,
            "cpu_s_per_step": cpu / iters,
            "median_interval_s": statistics.median(np.diff(marks)) if len(marks) > 2 else None}


# ---- report ----

def summary(xs) -> dict | None:
    """Best (min) and median of repeated timings. The table uses the best: the machine is
    shared, and interference from other jobs only ever adds time."""
    xs = [x for x in xs if x is not None]
    return {"min": min(xs), "median": statistics.median(xs), "runs": xs} if xs else None


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> dict:
    args = parse_args(argv)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    K = args.bare_iters or max(16, N - 1)
    hf_dir, ours_dir = model_dirs(args)
    load_start = os.getloadavg()

    import jax
    from jaxserve import LLM

    with open(hf_dir / "config.json") as f:
        vocab = json.load(f)["vocab_size"]
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(3, vocab, size=(B, P), dtype=np.int64)  # no bos/eos/pad ids
    prompt_lists = prompts.tolist()

    block = 16
    max_model_len = math.ceil((P + N) / block) * block
    chunk = args.max_prefill_chunk or min(P, 512)
    batched = args.max_num_batched_tokens or max(B * chunk, B)
    workload = {"model_dir": str(ours_dir.parent), "batch": B, "prompt_len": P,
                "new_tokens": N, "dtype": "float32", "repeats": args.repeats,
                "bare_iters": K, "torch_threads": args.torch_threads, "prompt_seed": args.seed,
                "engine": {"max_model_len": max_model_len, "max_num_seqs": B,
                           "max_num_batched_tokens": batched, "max_prefill_chunk": chunk,
                           "max_prefill_rows": B, "block_size": block,
                           "kv_blocks": "default", "max_steps_in_flight": 2}}
    print(f"workload: B={B} P={P} N={N} float32, model {ours_dir.parent}", flush=True)

    hf = None
    if not args.skip_hf:
        t0 = time.perf_counter()
        hf = HFSide(hf_dir)
        for threads in args.torch_threads:
            hf.generate(prompts, min(N, 4), threads)  # warm-up
        print(f"HF loaded + warmed up in {time.perf_counter() - t0:.1f}s", flush=True)

    t0 = time.perf_counter()
    llm = LLM(ours_dir, dtype="float32", max_model_len=max_model_len, max_num_seqs=B,
              max_num_batched_tokens=batched, max_prefill_chunk=chunk, max_prefill_rows=B,
              block_size=block)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    programs = llm.warmup()
    warmup_s = time.perf_counter() - t0
    jax_generate(llm, prompt_lists, min(N, 4))  # warm-up call, like HF's
    print(f"jaxserve loaded in {load_s:.1f}s, warmup compiled {programs} programs in "
          f"{warmup_s:.1f}s", flush=True)
    inputs = decode_inputs(llm, B, P, N)
    dev_inputs = jax.device_put(inputs)
    bare_loop(llm.runner, inputs, 3, readback=False)  # warm (the shape is compiled already)
    compiles_before = llm.stats()["compilations"]

    # One repeat = every measurement once, back to back, so each sees the same machine state.
    runs = collections.defaultdict(list)
    hf_tokens, jax_tokens = {}, None
    for r in range(args.repeats):
        for threads in args.torch_threads if hf is not None else []:
            wall, hf_tokens[threads] = hf.generate(prompts, N, threads)
            runs[f"hf{threads}"].append(wall)
        res, jax_tokens = jax_generate(llm, prompt_lists, N)
        runs["jax"].append(res)
        runs["jax_prefill_only"].append(jax_generate(llm, prompt_lists, 1)[0]["wall_s"])
        runs["bare"].append(bare_loop(llm.runner, inputs, K, readback=False))
        runs["bare_readback"].append(bare_loop(llm.runner, inputs, K, readback=True))
        runs["bare_device_inputs"].append(bare_loop(llm.runner, dev_inputs, K, readback=False))
        msg = (f"repeat {r + 1}/{args.repeats}: jaxserve {res['wall_s']:.2f}s, bare step "
               f"{runs['bare'][-1]['s_per_step'] * 1e3:.1f}ms")
        for threads in args.torch_threads if hf is not None else []:
            msg += f", HF ({threads} threads) {runs[f'hf{threads}'][-1]:.2f}s"
        print(msg, flush=True)
    recompiled = llm.stats()["compilations"] - compiles_before

    # ---- numbers (ms per decode step; tokens/s from the best wall time) ----
    tokens = B * N
    jax_wall = summary([x["wall_s"] for x in runs["jax"]])
    jax_tps = tokens / jax_wall["min"]
    hf_res = {}
    for threads in args.torch_threads if hf is not None else []:
        wall = summary(runs[f"hf{threads}"])
        hf_res[threads] = {"torch_threads": threads, "wall_s": wall,
                           "output_tokens_per_s": tokens / wall["min"],
                           "ratio_jaxserve_over_hf": jax_tps / (tokens / wall["min"])}
    head = hf_res.get(args.torch_threads[0])
    hf_tps = head["output_tokens_per_s"] if head else None
    best_hf = max(hf_res.values(), key=lambda x: x["output_tokens_per_s"]) if hf_res else None
    ms = lambda xs: summary([None if x is None else x * 1e3 for x in xs])  # noqa: E731
    engine = summary([x["decode"]["ms_per_step"] if x["decode"] else None for x in runs["jax"]])
    engine_gap = summary([x["decode"]["median_interval_ms"] if x["decode"] else None
                          for x in runs["jax"]])
    xcheck = summary([(x["wall_s"] - p) / x["stats_delta"]["decode_steps"] * 1e3
                      for x, p in zip(runs["jax"], runs["jax_prefill_only"])
                      if x["stats_delta"].get("decode_steps")])
    bare = ms([x["s_per_step"] for x in runs["bare"]])
    bare_rb = ms([x["s_per_step"] for x in runs["bare_readback"]])
    bare_rb_gap = ms([x["median_interval_s"] for x in runs["bare_readback"]])
    bare_dev = ms([x["s_per_step"] for x in runs["bare_device_inputs"]])
    bare_dispatch = ms([x["dispatch_s_per_step"] for x in runs["bare"]])
    bare_dev_dispatch = ms([x["dispatch_s_per_step"] for x in runs["bare_device_inputs"]])
    bare_rb_dispatch = ms([x["dispatch_s_per_step"] for x in runs["bare_readback"]])
    bare_cpu = ms([x["cpu_s_per_step"] for x in runs["bare"]])
    bare_rb_cpu = ms([x["cpu_s_per_step"] for x in runs["bare_readback"]])
    engine_cpu = summary([x["decode"]["cpu_ms_per_step"] if x["decode"] else None
                          for x in runs["jax"]])

    def overhead(eng, ref):
        """Paired: each repeat's engine vs that repeat's reference, then the median over repeats
        (the two ran seconds apart, under the same outside load)."""
        if eng is None or ref is None or len(eng["runs"]) != len(ref["runs"]):
            return None
        return statistics.median((e - r) / e * 100 for e, r in zip(eng["runs"], ref["runs"]))

    # the engine's own timers, per engine step, in the fastest timed generate
    best_run = min(runs["jax"], key=lambda x: x["wall_s"])["stats_delta"]
    n_steps, n_decode = best_run.get("steps", 0), best_run.get("decode_steps", 0)
    timers = {k.replace("_s", "_ms_per_step"): best_run.get(k, 0) / max(n_steps, 1) * 1e3
              for k in ("schedule_s", "dispatch_s", "readback_wait_s", "process_s")}
    host_busy = sum(timers[k] for k in ("schedule_ms_per_step", "dispatch_ms_per_step",
                                        "process_ms_per_step"))

    match = None
    if hf_tokens:
        reference = hf_tokens[args.torch_threads[0]]
        prefix = []
        for a, b in zip(jax_tokens, reference):
            diff = np.nonzero(a != b)[0]
            prefix.append(int(diff[0]) if diff.size else N)
        match = {"rows_compared": B, "rows_matching": sum(p == N for p in prefix),
                 "common_prefix_per_row": prefix,
                 "hf_thread_settings_agree": all(np.array_equal(t, reference)
                                                 for t in hf_tokens.values())}

    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**machine_info(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "workload": workload,
        "statistic": "tokens/s: best (min) wall time of the repeats; ms per step: median of "
                     "the repeats (min kept too); host overhead: median over repeats of each "
                     "repeat's paired (engine - reference) / engine",
        "hf": None if hf is None else [hf_res[t] for t in args.torch_threads],
        "jaxserve": {"load_s": load_s, "warmup_s": warmup_s, "warmup_programs": programs,
                     "compilations_during_timed_runs": recompiled,
                     "wall_s": jax_wall, "output_tokens_per_s": jax_tps,
                     "prefill_only_wall_s": summary(runs["jax_prefill_only"]),
                     "runs": runs["jax"]},
        "ratio_jaxserve_over_hf": jax_tps / hf_tps if hf_tps else None,
        "ratio_jaxserve_over_best_hf": jax_tps / best_hf["output_tokens_per_s"]
        if best_hf else None,
        "decode_ms_per_step": {
            "bare": bare, "bare_readback": bare_rb, "bare_device_inputs": bare_dev,
            "bare_readback_median_interval": bare_rb_gap,
            "bare_host_dispatch": bare_dispatch,
            "bare_device_inputs_host_dispatch": bare_dev_dispatch,
            "bare_readback_host_dispatch": bare_rb_dispatch,
            "bare_cpu": bare_cpu, "bare_readback_cpu": bare_rb_cpu, "engine_cpu": engine_cpu,
            "engine": engine, "engine_median_interval": engine_gap,
            "engine_crosscheck_minus_prefill_run": xcheck,
            "engine_timers_per_engine_step_fastest_run": timers,
            "engine_host_busy_per_engine_step_fastest_run": host_busy,
            "engine_steps": n_steps, "engine_decode_steps": n_decode},
        "host_overhead_pct": overhead(engine, bare),
        "host_overhead_pct_vs_readback_loop": overhead(engine, bare_rb),
        "host_overhead_pct_median_intervals": overhead(engine_gap, bare_rb_gap),
        "host_overhead_pct_cpu_time": overhead(engine_cpu, bare_cpu),
        "token_match": match,
    }

    # ---- table ----
    g = lambda x, spec=".2f": fmt(None if x is None else x["median"], spec)  # noqa: E731
    t0_ = args.torch_threads[0]
    rows = [(f"HF transformers generate, {t0_} torch threads (output tok/s)", fmt(hf_tps)),
            ("jaxserve generate (output tok/s)", fmt(jax_tps)),
            ("ratio jaxserve / HF", fmt(results["ratio_jaxserve_over_hf"], ".2f") + "x"
             if hf_tps else "n/a"),
            ("bare decode step (ms)", g(bare)),
            ("engine decode step (ms)", g(engine)),
            ("host overhead (%)", fmt(results["host_overhead_pct"])),
            None,
            *[(f"HF transformers generate, {t} torch threads (output tok/s); ratio",
               f"{fmt(hf_res[t]['output_tokens_per_s'])}; "
               f"{fmt(hf_res[t]['ratio_jaxserve_over_hf'], '.2f')}x")
              for t in args.torch_threads[1:] if t in hf_res],
            ("bare decode step + readback, 2 in flight (ms)", g(bare_rb)),
            ("bare decode step, inputs already on device (ms)", g(bare_dev)),
            ("host overhead vs the readback loop (%)",
             fmt(results["host_overhead_pct_vs_readback_loop"])),
            ("engine / bare-readback median step interval (ms)",
             f"{g(engine_gap)} / {g(bare_rb_gap)}"),
            ("host overhead from median intervals (%)",
             fmt(results["host_overhead_pct_median_intervals"])),
            ("engine decode step, cross-check: (gen - prefill-only gen) / steps (ms)", g(xcheck)),
            ("process CPU time per decode step, engine / bare / bare-readback (ms)",
             f"{g(engine_cpu)} / {g(bare_cpu)} / {g(bare_rb_cpu)}"),
            ("host overhead from CPU time, engine vs bare (%)",
             fmt(results["host_overhead_pct_cpu_time"])),
            ("no-readback loop: host time in runner.step, numpy / device inputs (ms)*",
             f"{g(bare_dispatch, '.3f')} / {g(bare_dev_dispatch, '.3f')}"),
            ("readback loop: host time in runner.step (ms)", g(bare_rb_dispatch, ".3f"))]
    rows += [(f"engine {k.replace('_ms_per_step', '')} per engine step, fastest run (ms)",
              fmt(v, ".3f")) for k, v in timers.items()]
    rows.append(("engine host busy (schedule+dispatch+process) per step (ms)",
                 fmt(host_busy, ".3f")))
    width = max(len(row[0]) for row in rows if row)
    m = results["machine"]
    print(f"\nB={B} P={P} N={N} float32, {args.repeats} repeats (tok/s: best; ms: median; "
          f"overhead: median of paired repeats), "
          f"{m['cpus_usable']} CPUs, jax {m['jax']} ({m['jax_backend']}), load average "
          f"{load_start[0]:.1f} -> {m['loadavg_end'][0]:.1f}")
    print(f"| {'metric':<{width}} | value |\n|{'-' * (width + 2)}|------:|")
    for row in rows:
        if row is None:
            print(f"|{' ' * (width + 2)}|       |")
        else:
            print(f"| {row[0]:<{width}} | {row[1]} |")
    print("* blocks once XLA's CPU client has 32 computations queued: waiting, not host work")
    if match is not None:
        print(f"\ngreedy tokens equal to HF's: {match['rows_matching']}/{B} rows "
              f"(common prefix per row: {match['common_prefix_per_row']})")
        if match["rows_matching"] != B:
            print("WARNING: jaxserve's greedy tokens differ from HF transformers' on some rows",
                  file=sys.stderr)
    if recompiled:
        print(f"WARNING: {recompiled} programs compiled during the timed runs", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
