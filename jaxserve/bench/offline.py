"""Offline benchmark: jaxserve with default settings, side by side with HF transformers and with
what the machine itself allows.

    python scripts/bench_offline.py --json bench.json                 # everything (long)
    python scripts/bench_offline.py --parts machine,decode --json d.json
    python scripts/bench_offline.py --repeats 1 --mixed-requests 16 --batches 1,8 --force
    python scripts/bench_offline.py --parts machine,precision --peer llama.cpp --llama-cpp-dir DIR

Everything on jaxserve's side runs as a user gets it: `LLM(model_dir)` (plus `dtype=` in the
bf16 part, `max_model_len=` for the second engine of the long part, a format's settings in the
precision part), no engine settings. The
model is the 55M random Llama of `scripts/random_model.py --preset 55m` (8 layers, hidden 512,
8 q / 2 kv heads, head_dim 64, intermediate 1408, vocab 32000), float32, built into
/tmp/jaxserve-bench-55m when --model-dir is not given (OUT/hf: HF transformers' copy, OUT/jaxserve:
ours; a jaxserve copy in an older checkpoint format is reconverted from OUT/hf). jaxserve runs on
ONE CPU device (no simulated host devices). Model loading, XLA compilation (`LLM.warmup()`,
reported on its own) and one warm-up call per workload are excluded from every timing.

Statistics. Every measurement is repeated --repeats times; within a repeat each measurement of a
part runs once, back to back, so noise (other jobs on the 2 cores) hits all of them alike.
Tokens/s and bandwidth / GFLOP/s use the BEST repeat (interference only ever adds time); ms per
step are MEDIANS over repeats (each repeat's ms/step = the wall time of a loop of steps / steps);
a host overhead % is computed per repeat from that repeat's paired numbers and the median is
reported. The JSON keeps every run. HF transformers runs with `torch.set_num_threads(2)`, the
headline reference (--torch-threads adds other counts beside it). HF with 2 threads collapses
when anything else loads the cores, so the run refuses to start while the 1-minute load average
is above --max-load (it waits up to --load-wait s first; --force runs anyway and flags every
table and the JSON as LOADED). During each part the CPU time that OTHER processes used is
measured from /proc/stat minus this process's own CPU time; a part where others used more than
0.2 cores on average is flagged LOADED as well. The CPU model (/proc/cpuinfo) and load averages
are printed with the results: machines of this kind differ, only ratios from one run compare.

Parts (--parts, comma-separated; default all):

  machine  What the hardware gives, measured in this run. Read bandwidth: `np.sum` over a
           --bandwidth-mib float32 array, with 1 thread and with 2 Python threads each summing
           one half (numpy releases the GIL): bytes / best time. float32 matmul peak: numpy
           sgemm 2048x2048 and `jax.jit(jnp.dot)` 2048x2048 on the JAX CPU device: 2*n^3 / best
           time. "XLA bare matmul stack": one jitted function doing exactly the decode step's
           weight products of this model in float32 at each --batches size: per layer x@Wq,
           x@Wk, x@Wv, a@Wo, x@Wgate, x@Wup, h@Wdown (weights as separate arrays of the model's
           shapes, layers unrolled like the model), then the LM head x.W^T with W [vocab, embed]
           and an argmax; each call's output hidden state feeds the next call (a serial chain,
           like the engine's steps), timed with the engine's readback pattern. That is how fast
           XLA:CPU's dot kernels stream these weights: the practical floor of our step.
  decode   The engine's compiled step, decode only, at each --batches size: inputs built by the
           real step builder (`llm.engine.builder.build(StepPlan([], seqs))` with stand-in sequence
           objects, context P+N/2 = 192 tokens each, own blocks and slots), run with
           `llm.runner.step(inputs)` in a loop of --decode-iters steps with the engine's readback
           pattern (2 steps in flight; `np.asarray(out.tokens)` of the oldest). Floor =
           max(bytes / 2-thread read bandwidth, FLOPs / matmul peak) with bytes = decoder-layer
           weights + final norm + LM head + the KV context read (layers x context x 2 x kv_heads
           x head_dim x itemsize x batch) and FLOPs = 2 x matmul params x batch + attention
           4 x layers x heads x head_dim x context x batch; the peak is the better of numpy's and
           XLA's sgemm. Reported: ms/step, floor, floor / measured (fraction of the floor
           reached), measured / floor (target <= 1.5), and measured / XLA bare matmul stack.
  equal    Prompts of 128 random ids, 128 greedy new tokens each (`SamplingParams(temperature=0,
           max_tokens=128, ignore_eos=True)`; HF: `generate(do_sample=False, max_new_tokens=128,
           min_new_tokens=128)`), batch 1, 8, 32: output tokens/s (B*N / best wall time) of
           both, ratio jaxserve / HF (targets 3x / 2.5x / 1.5x). Greedy float32 tokens are
           compared (a mismatch is a warning). Engine decode ms/step inside generate: a wrapper
           on `Engine.step` records time and counters after each call; the window starts at the
           first call after which every prefill step has been read back (from there the device
           runs decode steps only) and ends at the last call; ms/step = window time / steps read
           back in it. Beside it the bare decode step at the same batch and context P+N/2
           (measured in the same repeat), and the host overhead % = (engine - bare) / engine.
  mixed    --mixed-requests requests (seeded): prompt lengths uniform in 16..1024, output
           lengths n_i uniform in 16..512, ignore_eos, greedy. jaxserve: all requests in one
           `llm.generate(prompts, [SamplingParams(max_tokens=n_i, ...)])`. HF as a user would
           run it: static batches of 8 in arrival order, left-padded by hand (pad id 0,
           attention mask), `generate(max_new_tokens=max n_i of the batch, min_new_tokens=same,
           do_sample=False)`. Useful tokens = sum of n_i on both sides (HF's extra tokens in a
           batch are waste). Useful tokens/s from the best of --mixed-repeats, ratio (target
           >= 3x). Token agreement per request is reported for information.
  long     A copy of the model whose config.json says max_position_embeddings 32768 (RoPE is
           unaffected for short prompts): 8 prompts of 64 tokens + 32 new tokens, `LLM(copy)`
           vs `LLM(copy, max_model_len=2048)`: load time, warmup, the max_model_len and KV pool
           (`kv_blocks_total`) the default chose, best wall time of each and the ratio (target:
           equal within noise; noise = the larger relative spread (median - best) / best).
  bf16     `LLM(dir, dtype="bfloat16")` vs the float32 default: decode step ms at --bf16-batches
           and output tokens/s of the equal workload at the largest of them. Just reported.
  precision  jaxserve in each of --precision-formats (fp32, bf16, int8 weights, int8 KV) beside
           HF float32 and, with --peer llama.cpp, llama.cpp's llama-batched-bench on f32 / f16 /
           q8_0 GGUF copies of the same weights (--llama-cpp-dir, else $LLAMA_CPP_DIR, else
           PATH; skipped with a message when not found): P=128 + N=128 at --batches, 2 threads
           each, every row with its byte floor, FLOP floor and the fraction of the floor reached
           (jaxserve/bench/offline_precision.py says how). On its own:
           `--parts precision --peer llama.cpp`.

The default engine's `llm.warmup()` (programs compiled, seconds; target <= 30 s) is reported by
whichever part loads it first (--no-warmup skips every warmup, for quick checks: programs then
compile during the untimed warm-up calls). Prints a table per part and which parts ran; with
--json writes every number plus the date, machine and versions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from jaxserve.bench.machine import CpuWatch, cpu_line, load_gate, machine_info
from jaxserve.bench.models import DEFAULT_MODEL_DIR, ensure_current_checkpoint, model_dirs
from jaxserve.bench import offline_precision
from jaxserve.bench.offline_parts import PART_FUNCS as MAIN_PARTS, Context
from jaxserve.bench.report import comma_choices, json_default, local_time, settings, write_json

PARTS = ("machine", "decode", "equal", "mixed", "long", "bf16", "precision")
PART_FUNCS = {**MAIN_PARTS, "precision": offline_precision.part_precision}
OTHERS_FLAG_CORES = 0.2  # other processes' average CPU use that flags a part as LOADED


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a directory written by scripts/random_model.py (hf/ and jaxserve/); "
                        f"default {DEFAULT_MODEL_DIR}, built with --preset if absent")
    p.add_argument("--preset", default="55m", help="random_model.py preset for the default dir")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions (throughput: best; ms: median; overhead: median of "
                        "the paired per-repeat values)")
    p.add_argument("--batches", default="1,8,32",
                   help="batch sizes of the machine stack, decode and equal parts")
    p.add_argument("--bf16-batches", default="1,8",
                   help="decode batches of the bf16 part; its generate runs at the largest")
    p.add_argument("--decode-iters", type=int, default=64, help="steps per timed decode loop")
    p.add_argument("--mixed-requests", type=int, default=256)
    p.add_argument("--mixed-repeats", type=int, default=1,
                   help="repeats of the mixed part (both sides; HF takes ~10 min per repeat "
                        "at 256 requests)")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="size of the array the read-bandwidth test sums")
    p.add_argument("--torch-threads", default="2",
                   help="torch thread counts for HF; the first is the headline reference")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts/workloads")
    p.add_argument("--max-load", type=float, default=0.5,
                   help="refuse to start while the 1-minute load average is above this")
    p.add_argument("--load-wait", type=float, default=60.0,
                   help="seconds to wait for the load average to drop before refusing")
    p.add_argument("--force", action="store_true",
                   help="run on a loaded machine anyway; results are flagged LOADED")
    p.add_argument("--profile-out", type=Path, default=None, metavar="FILE.json",
                   help="write the default engine's step timeline (the parts that ran on it) "
                        "as a Chrome trace")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip llm.warmup() (quick checks: programs then compile on first use, "
                        "still outside every timing; no warmup figures)")
    offline_precision.add_arguments(p)
    args = p.parse_args(argv)
    offline_precision.check_arguments(p, args)
    args.parts = comma_choices(p, "--parts", args.parts, PARTS)
    args.parts = [x for x in PARTS if x in args.parts]  # run in the documented order
    for name in ("batches", "bf16_batches", "torch_threads"):
        try:
            values = [int(x) for x in str(getattr(args, name)).split(",") if x.strip()]
        except ValueError:
            p.error(f"--{name.replace('_', '-')} must be comma-separated integers")
        if not values or min(values) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive integers")
        setattr(args, name, values)
    for name in ("repeats", "decode_iters", "mixed_requests", "mixed_repeats", "bandwidth_mib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    """Run the parts `argv` asks for; the results (exits 1 when a part failed)."""
    args = parse_args(argv)
    gate = load_gate(args.max_load, args.load_wait, args.force)
    hf_dir, ours_dir = model_dirs(args.model_dir, args.preset)
    import jax  # noqa: F401  (after the load check: importing is work too)
    reconverted = ensure_current_checkpoint(hf_dir, ours_dir) if \
        set(args.parts) - {"machine"} else False
    ctx = Context(args, hf_dir, ours_dir)
    ctx.flag = "LOADED" if gate["loaded_at_start"] else ""
    info = machine_info()
    print(f"{cpu_line(info)} ({info['jax_backend']}), torch {info.get('torch')}, "
          f"transformers {info.get('transformers')}; load average {gate['loadavg_start'][0]:.2f}; "
          f"model {ours_dir.parent}; parts: {','.join(args.parts)}", flush=True)
    results = {"date": local_time(),
               "machine": {**info, **gate},
               "model_dir": str(ours_dir.parent), "reconverted_checkpoint": reconverted,
               "settings": settings(args),
               "statistic": "throughput: best (min wall time) of the repeats; ms per step: "
                            "median of the repeats; host overhead: median over repeats of "
                            "each repeat's paired (engine - bare) / engine",
               "parts": {}, "cpu_others": {}, "errors": {}}
    ctx.results = results
    ran, failed = [], []
    for part in args.parts:
        print(f"\n=== part {part} ===", flush=True)
        t0 = time.perf_counter()
        watch = CpuWatch()
        try:
            with watch:
                results["parts"][part] = PART_FUNCS[part](ctx)
            ran.append(part)
        except Exception as e:  # noqa: BLE001  one part failing must not lose the others
            traceback.print_exc()
            results["errors"][part] = f"{type(e).__name__}: {e}"
            failed.append(part)
        cpu = watch.result
        results["cpu_others"][part] = cpu
        if cpu:
            loaded = cpu["others_cores"] > OTHERS_FLAG_CORES
            print(f"part {part}: {time.perf_counter() - t0:.0f}s; other processes used "
                  f"{cpu['others_cores']:.2f} cores on average (steal {cpu['steal_cores']:.2f})"
                  f"{'  [LOADED: numbers of this part are not trustworthy]' if loaded else ''}",
                  flush=True)
            cpu["loaded"] = loaded
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["loaded"] = gate["loaded_at_start"] or any(
        c and c.get("loaded") for c in results["cpu_others"].values())
    results["parts_ran"], results["parts_failed"] = ran, failed
    warm = results.get("default_engine")
    print(f"\nparts ran: {','.join(ran) or 'none'}"
          + (f"; FAILED: {','.join(failed)}" if failed else "")
          + (f"; default engine warmup {warm['warmup_programs']} programs in "
             f"{warm['warmup_s']:.1f}s" if warm and warm["warmup_s"] is not None else "")
          + ("; results flagged LOADED" if results["loaded"] else "")
          + f"; load average {gate['loadavg_start'][0]:.2f} at start, "
            f"{results['machine']['loadavg_end'][0]:.2f} at the end (this run's own work "
            "included)")
    if args.profile_out and ctx._llm is not None:
        from jaxserve.engine.timeline import format_amdahl

        results["timeline"] = ctx._llm.engine.timeline.summary()
        print(format_amdahl(results["timeline"]))
        print(f"wrote {ctx._llm.engine.timeline.write_chrome_trace(args.profile_out)}")
    if args.json:
        write_json(args.json, results, indent=2, default=json_default)
    if failed:
        sys.exit(1)
    return results

