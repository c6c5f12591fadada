"""Replicated vs sequence-parallel sampling, side by side: the decode step's time and the bytes
its collectives move, at each TP degree, for greedy and for top-p sampling with logprobs.

    python scripts/bench_sampling.py --json benchmarks/sampling.json     # tp = 1, 2, 4, 8
    python scripts/bench_sampling.py --degrees 1,2 --batch 8 --repeats 1  # quick

The model is tp_sweep's default preset (a random Llama with a 32k vocabulary: 4 layers, hidden
256, 8 heads) unless --model is given. Each degree loads it once on `tp=t` (rules tp); both
sampling modes then run the engine's own decode step (inputs built by its step builder, --batch
sequences of 96 tokens of context, each its own slot and blocks), dispatched with the engine's
readback pattern (2 steps in flight) for --iters steps; ms per step is the median over
--repeats. Beside it, from the compiled step's HLO: the bytes every all-gather and all-to-all
produces (the whole-vocabulary gather of replicated sampling, the logits exchange and result
gathers of sequence-parallel sampling). Both modes give the same tokens; the script checks it.

On simulated CPU devices all "devices" share the same cores: a step's time is the sum of every
device's work, so the figures show how much sampling work and data movement each mode adds per
step, not what t real devices would take.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from jaxserve.bench.hlo import collectives
from jaxserve.bench.machine import CpuWatch, machine_info
from jaxserve.bench.models import save_random_model
from jaxserve.bench.report import local_time, write_json
from jaxserve.bench.steps import decode_step_inputs
from jaxserve.bench.timing import readback_loop
from jaxserve.bench.tp_sweep import PRESETS

MODES = ("replicated", "sequence_parallel")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="simulated devices to create")
    p.add_argument("--degrees", default="1,2,4,8", help="TP degrees (comma-separated)")
    p.add_argument("--model", type=Path, default=None, help="a jaxserve checkpoint")
    p.add_argument("--batch", type=int, default=32, help="sequences decoding per step")
    p.add_argument("--iters", type=int, default=32, help="steps per timed loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        args.degrees = [int(d) for d in args.degrees.split(",")]
    except ValueError:
        p.error(f"--degrees must be comma-separated integers, got {args.degrees!r}")
    if min(args.degrees) < 1 or args.batch < 1 or args.iters < 1 or args.repeats < 1:
        p.error("--degrees, --batch, --iters and --repeats must be >= 1")
    return args


def step_inputs(llm, batch: int, params_kind: str):
    """A decode step of `batch` sequences (context 96, 32 generated) from the step builder."""
    from jaxserve import SamplingParams

    def params(i):
        return SamplingParams(temperature=0, max_tokens=64) if params_kind == "greedy" else \
            SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=64, logprobs=5)
    return decode_step_inputs(llm, batch, 96, 32, params)


def gathered_bytes(hlo: str) -> dict[str, int]:
    """Bytes produced per device by the step's all-gathers and all-to-alls."""
    found = collectives(hlo)
    return {op: found.get(op, (0, 0))[1] for op in ("all-gather", "all-to-all")}


def main(argv=None) -> dict:
    args = parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    import jax
    import numpy as np

    from jaxserve import LLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp, CpuWatch() as load:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            save_random_model(PRESETS["default"], model_dir)
        for t in args.degrees:
            if t > len(jax.devices()):
                print(f"tp={t}: only {len(jax.devices())} devices, skipped")
                continue
            llm = LLM(model_dir, mesh=f"tp={t}" if t > 1 else None, rules="tp",
                      max_model_len=128, max_num_seqs=args.batch, kv_blocks=8 * args.batch + 1,
                      compilation="on_use")  # compiled by each timing's first call
            for kind in ("greedy", "top_p"):
                inputs = step_inputs(llm, args.batch, kind)
                tokens = {}
                for mode in MODES:
                    llm.runner.set_sampling(mode)
                    runner = llm.runner
                    runner.init_slots(llm.engine.trash_slot)  # the same state for both modes
                    tokens[mode] = np.asarray(runner.step(inputs).tokens)
                    for _ in range(2):
                        np.asarray(runner.step(inputs).tokens)
                    times = [readback_loop(lambda: runner.step(inputs).tokens, args.iters)
                             ["ms_per_step"] for _ in range(args.repeats)]
                    moved = gathered_bytes(runner.compiled_step(inputs).as_text())
                    rows.append({"tp": t, "params": kind, "sampling": mode, "batch": args.batch,
                                 "ms_per_step": float(np.median(times)), "runs_ms": times,
                                 "all_gather_bytes": moved["all-gather"],
                                 "all_to_all_bytes": moved["all-to-all"]})
                    print(f"tp={t} {kind:6s} {mode:17s}: {rows[-1]['ms_per_step']:8.2f} ms/step, "
                          f"all-gather {moved['all-gather'] / 1024:8.1f} KiB, all-to-all "
                          f"{moved['all-to-all'] / 1024:8.1f} KiB", flush=True)
                if t > 1 and not np.array_equal(tokens["replicated"],
                                                tokens["sequence_parallel"]):
                    raise SystemExit(f"tp={t} {kind}: the modes sampled different tokens")
            del llm
            jax.clear_caches()
    results = {"date": local_time(),
               "machine": machine_info(), "load": load.result, "rows": rows,
               "simulated": jax.default_backend() == "cpu", "batch": args.batch}
    print_table(results)
    if args.json:
        write_json(args.json, results)
    return results


def print_table(results: dict) -> None:
    by = {(r["tp"], r["params"], r["sampling"]): r for r in results["rows"]}
    print(f"\n## decode step, batch {results['batch']}: replicated vs sequence-parallel sampling"
          + (" (simulated CPU devices: work per step, not a speed-up)" if results["simulated"]
             else ""))
    print("| tp | params | replicated ms | sequence-parallel ms | ratio | gathered KiB "
          "(repl.) | gathered + exchanged KiB (seq.-par.) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (t, kind, mode), r in sorted(by.items()):
        if mode != "replicated" or (t, kind, "sequence_parallel") not in by:
            continue
        s = by[t, kind, "sequence_parallel"]
        print(f"| {t} | {kind} | {r['ms_per_step']:.2f} | {s['ms_per_step']:.2f} | "
              f"{s['ms_per_step'] / r['ms_per_step']:.2f} | "
              f"{r['all_gather_bytes'] / 1024:.1f} | "
              f"{(s['all_gather_bytes'] + s['all_to_all_bytes']) / 1024:.1f} |")
    load = results.get("load") or {}
    if load:
        print(f"other processes used {load['others_cores']:.2f} cores on average")

