"""The TP-degree sweep: for every split of G devices into r replicas x t-way tensor parallelism,
the same workload; throughput, step time split into host and device, KV capacity and
preemptions; Amdahl's p fitted from step time vs t; the best degree t_e.

    python scripts/tp_sweep.py --devices 8 --csv sweep.csv --png sweep.png
    python scripts/tp_sweep.py --devices 8 --sampling sequence_parallel,replicated --json s.json
    python scripts/tp_sweep.py --devices 4 --model checkpoints/my-model --device-memory-mib 40000
    python scripts/tp_sweep.py --devices 8 --quick          # tiny model and workload (seconds)

Splits. t runs over the divisors of G that the model's heads allow (jaxserve.placement); r = G/t.
Dense models: `dp=G` (rules dp) for t = 1, `tp=G` (tp) for r = 1, `dp=r,tp=t` (dp_tp) between.
Models with experts put them on the replica axis: `ep=G` (ep), `tp=t,ep=r` (tp_ep), `tp=G` (tp,
experts replicated). A split the model cannot take (heads, experts, memory) is listed as skipped
with the reason.

Memory. Each device has --device-memory-mib (default: 1.2 x the whole model's weights, so one
device is tight). A split's KV pool is what is left after its weights per device; blocks per
replica = that / the bytes a block takes per device. A larger t holds fewer weights and a
thinner slice of every block, so its replicas hold more sequences: "KV capacity" is the number
of concurrent full-length sequences (prompt + output) the whole cluster holds. A workload that
does not fit is preempted: the preemptions column.

Workload. --requests prompts of --prompt-len random ids, --output-len greedy tokens each
(ignore_eos), all submitted at once to one `LLM.generate`. The same shapes run once first on
other random prompts (to compile, and so that nothing the measured run computes is cached), then
the run is measured: throughput = output tokens / wall time; the engine's step timeline (jaxserve/engine/
timeline.py) gives ms per step, device ms per step and host-only ms per step (the device had
nothing queued). Each split runs under every --sampling mode given.

Amdahl. Per sampling mode, step time T(t) = a + b / t is fitted by least squares over the
splits; p = b / (a + b) is the parallel fraction, S(t) = 1 / ((1 - p) + p / t). t_e is the t of
the split with the best cluster throughput. (The DP splits' steps no longer all-reduce the
penalty state, which is split per replica, so neither the fit nor the model has such a term.)

Predictions. --predict HARDWARE runs the performance model (jaxserve.perf: a hardware profile
name such as cpu-local or h100, or a YAML path) on every split for the same workload (every
request in flight at once) and adds `predicted_throughput_tok_s`, `predicted_step_ms` and
`predicted_kv_capacity_seqs` (on that hardware's memory) beside the measured columns.
--predictions FILE (JSON list of rows or CSV, with `mesh` and `rules` columns and any numeric
columns) adds each numeric column as `predicted_<name>` instead. The plot draws predicted
throughput dashed.

On simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count) every device shares
the same cores and a collective is a memory copy: the figures show the mechanism (host vs
device time, KV capacity, preemptions, the collectives' cost), not a speed-up, and the plot
and table say so.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

from jaxserve.bench.machine import CpuWatch, machine_info
from jaxserve.bench.models import save_random_model
from jaxserve.bench.report import write_json

PRESETS = {
    # a 32k vocabulary, as real models have: sampling over it is real work
    "default": dict(family="llama", vocab_size=32000, hidden_size=256, intermediate_size=688,
                    num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32,
                    max_position_embeddings=1024, eos_token_ids=(2,)),
    "quick": dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8,
                  max_position_embeddings=256, eos_token_ids=(2,)),
}
SIMULATED_NOTE = "simulated CPU devices: the mechanism, not a speed-up"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="G: the devices every split uses")
    p.add_argument("--model", type=Path, default=None,
                   help="a jaxserve checkpoint (default: a random model of --preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the random model's shape (default: default)")
    p.add_argument("--quick", action="store_true",
                   help="defaults for a smoke run: the quick preset, 8 requests of 16 + 8 "
                   "tokens")
    p.add_argument("--requests", type=int, default=None, help="default 64")
    p.add_argument("--prompt-len", type=int, default=None, help="default 64")
    p.add_argument("--output-len", type=int, default=None, help="default 32")
    p.add_argument("--device-memory-mib", type=float, default=None,
                   help="memory per device (default: 1.2 x the model's weights)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32, help="per replica")
    p.add_argument("--sampling", default="sequence_parallel",
                   help="comma-separated sampling modes to run each split under")
    p.add_argument("--output-processing", default="inline", choices=["inline", "thread"])
    p.add_argument("--predict", default=None, metavar="HARDWARE",
                   help="add the performance model's predictions for this hardware profile "
                   "(jaxserve/perf/hardware/NAME.yaml or a path)")
    p.add_argument("--predictions", type=Path, default=None,
                   help="predicted columns per (mesh, rules): JSON list of rows or CSV")
    p.add_argument("--profile-out", type=Path, default=None, metavar="FILE.json",
                   help="write each measured run's step timeline as a Chrome trace, "
                   "FILE-<mesh>-<sampling>.json")
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    defaults = dict(preset="quick", requests=8, prompt_len=16, output_len=8) if args.quick \
        else dict(preset="default", requests=64, prompt_len=64, output_len=32)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.sampling = [s.strip() for s in args.sampling.split(",") if s.strip()]
    from_modes = ("sequence_parallel", "replicated")
    bad = [s for s in args.sampling if s not in from_modes]
    if bad or not args.sampling:
        p.error(f"--sampling: modes are {', '.join(from_modes)}; got {bad or args.sampling}")
    for name in ("devices", "requests", "prompt_len", "output_len", "block_size",
                 "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.predict is not None and args.predictions is not None:
        p.error("give --predict or --predictions, not both")
    if args.device_memory_mib is not None and not args.device_memory_mib > 0:
        p.error(f"--device-memory-mib must be > 0, got {args.device_memory_mib}")
    return args


# ---- splits and memory ----

def splits(devices: int, config) -> list[dict]:
    """Every r x t split of the devices: its mesh and rules, or why the model cannot take it."""
    from jaxserve.placement import fit_to_layout
    from jaxserve.sharding import Layout

    out = []
    for t in [d for d in range(1, devices + 1) if devices % d == 0]:
        r = devices // t
        if config.num_experts:
            mesh, rules = ((f"ep={r}", "ep") if t == 1 else (f"tp={t}", "tp") if r == 1
                           else (f"tp={t},ep={r}", "tp_ep"))
        else:
            mesh, rules = ((f"dp={r}", "dp") if t == 1 else (f"tp={t}", "tp") if r == 1
                           else (f"dp={r},tp={t}", "dp_tp"))
        row = {"devices": devices, "replicas": r, "tp": t, "mesh": mesh, "rules": rules}
        try:
            fit_to_layout(config, Layout.create(mesh, rules, abstract=True))
        except ValueError as e:
            row["skipped"] = str(e)
        out.append(row)
    return out


def weight_bytes_per_device(config, layout, itemsize: int) -> int:
    """The parameters' bytes on one device (as `jaxserve shard-info` counts them)."""
    import jax.numpy as jnp

    from jaxserve.checkpoint import param_specs
    from jaxserve.placement import fit_to_layout

    fitted = fit_to_layout(config, layout)
    total = 0
    for name, (shape, axes) in param_specs(fitted, jnp.float32).items():
        spec = layout.spec(axes, shape, f"parameter {name!r}")
        total += math.prod(shape) * itemsize // layout.split_factor(spec)
    return total


def kv_plan(config, layout, memory_bytes: float, block_size: int, seq_len: int,
            itemsize: int) -> dict:
    """Blocks per replica from what the weights leave of each device's memory, and how many
    full-length sequences the cluster then holds."""
    import jax.numpy as jnp

    from jaxserve.engine.sizing import bytes_per_block_per_device
    from jaxserve.models import MODEL_CLASSES
    from jaxserve.placement import fit_to_layout
    from jaxserve.sharding import replicas_of

    fitted = fit_to_layout(config, layout)
    weights = weight_bytes_per_device(config, layout, itemsize)
    spec = MODEL_CLASSES[config.family].cache_spec(fitted, jnp.float32)
    per_block = bytes_per_block_per_device(spec, block_size, layout)
    blocks = int(max(0.0, memory_bytes - weights) // per_block)
    per_seq = math.ceil(seq_len / block_size)
    replicas = replicas_of(layout)
    return {"weights_mib_per_device": weights / 2**20, "kv_block_kib_per_device": per_block / 1024,
            "kv_blocks_per_replica": blocks,
            "kv_capacity_seqs": replicas * max(0, blocks - 1) // per_seq}


# ---- one split ----

def run_split(model_dir: Path, config, split: dict, args, memory_bytes: float, sampling: str,
              prompts: list[list[int]], warmup_prompts: list[list[int]]) -> dict:
    import jax

    from jaxserve import LLM, SamplingParams
    from jaxserve.sharding import Layout

    row = dict(split, sampling=sampling, output_processing=args.output_processing,
               platform=jax.default_backend())
    seq_len = args.prompt_len + args.output_len
    layout = Layout.create(split["mesh"], split["rules"], abstract=True)
    row.update(kv_plan(config, layout, memory_bytes, args.block_size, seq_len, 4))
    per_seq = math.ceil(seq_len / args.block_size)
    if row["kv_blocks_per_replica"] < 1 + per_seq:
        row["skipped"] = (f"{memory_bytes / 2**20:.0f} MiB per device leaves KV room for "
                          f"{max(0, row['kv_blocks_per_replica'] - 1)} blocks per replica; one "
                          f"sequence needs {per_seq}")
        return row
    # The warm-up run compiles what the run uses; no background compiles beside the timings.
    llm = LLM(model_dir, mesh=split["mesh"], rules=split["rules"], dtype="float32",
              max_model_len=seq_len, block_size=args.block_size,
              kv_blocks=row["kv_blocks_per_replica"], max_num_seqs=args.max_num_seqs,
              sampling=sampling, output_processing=args.output_processing,
              compilation="on_use")
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(warmup_prompts, params, use_tqdm=False)  # compiles every shape the run uses
    before = llm.stats()
    llm.engine.timeline.reset()
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = llm.stats()
    if args.profile_out is not None:
        name = f"{args.profile_out.stem}-{split['mesh'].replace(',', '_').replace('=', '')}-" \
               f"{sampling}{args.profile_out.suffix}"
        llm.engine.timeline.write_chrome_trace(args.profile_out.with_name(name))
    timeline = after["timeline"]
    steps = max(1, timeline["steps"])
    tokens = after["generated_tokens"] - before["generated_tokens"]
    row.update(wall_s=wall, output_tokens=tokens, throughput_tok_s=tokens / wall,
               steps=timeline["steps"], step_ms=1e3 * timeline["busy_wall_s"] / steps,
               device_ms_per_step=timeline["device_ms_per_step"],
               host_only_ms_per_step=timeline["host_only_ms_per_step"],
               host_only_fraction=timeline["host_only_fraction"],
               preemptions=after["preemptions"] - before["preemptions"],
               compilations=after["compilations"] - before["compilations"])
    del llm
    jax.clear_caches()
    return row


# ---- Amdahl, t_e, predictions ----

def fit_amdahl(rows: list[dict]) -> dict | None:
    """Least squares T(t) = a + b / t over measured rows with a, b >= 0; p = b / (a + b).
    (Step times that grow with t give p = 0; ones that fall faster than 1 / t, p = 1.)"""
    import numpy as np

    points = [(r["tp"], r["step_ms"]) for r in rows if "step_ms" in r]
    if len({t for t, _ in points}) < 2:
        return None
    x = np.array([[1.0, 1.0 / t] for t, _ in points])
    y = np.array([ms for _, ms in points])
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    if a < 0 or b < 0:  # the best fit on the boundary: only one of the two terms
        fits = [(0.0, max(0.0, float(x[:, 1] @ y / (x[:, 1] @ x[:, 1])))),
                (max(0.0, float(y.mean())), 0.0)]
        a, b = min(fits, key=lambda ab: float(np.sum((x @ np.array(ab) - y) ** 2)))
    p = b / (a + b) if a + b else float("nan")
    return {"serial_ms": float(a), "parallel_ms": float(b), "p": float(p),
            "speedup": {str(t): 1.0 / ((1 - p) + p / t) for t, _ in sorted(set(points))}}


def best_degree(rows: list[dict]) -> int | None:
    measured = [r for r in rows if "throughput_tok_s" in r]
    return max(measured, key=lambda r: r["throughput_tok_s"])["tp"] if measured else None


def read_predictions(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(mesh, rules) -> {column: value} of the numeric columns."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = json.loads(path.read_text())
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    out = {}
    for i, row in enumerate(rows):
        if "mesh" not in row or "rules" not in row:
            raise ValueError(f"{path}: row {i} has no 'mesh' and 'rules' (got {sorted(row)})")
        values = {}
        for k, v in row.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError):
                continue
        out[(row["mesh"], row["rules"])] = values
    return out


def model_predictions(config, splits_: list[dict], args) -> dict[tuple[str, str], dict]:
    """The performance model's throughput, step time and KV capacity of each split."""
    from jaxserve.perf import serving
    from jaxserve.perf.profiles import load_hardware
    from jaxserve.perf.step import Deployment
    from jaxserve.perf.workload import Lengths, Workload

    hardware = load_hardware(args.predict)
    workload = Workload(prompt_len=Lengths(((args.prompt_len, 1.0),)),
                        output_len=Lengths(((args.output_len, 1.0),)),
                        concurrency=float(args.requests), max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=512)
    out = {}
    for split in splits_:
        if "skipped" in split:
            continue
        try:
            d = Deployment(config, split["mesh"], split["rules"], hardware)
            op = serving.colocated(d, workload)
        except ValueError as e:  # the split does not fit that hardware
            out[(split["mesh"], split["rules"])] = {"note": str(e)}
            continue
        out[(split["mesh"], split["rules"])] = {
            "throughput_tok_s": op.output_tokens_per_s, "step_ms": 1e3 * op.tpot_s,
            "kv_capacity_seqs": d.replicas * int(d.kv_capacity_tokens
                                                 // (args.prompt_len + args.output_len))}
    return out


def add_predictions(rows: list[dict], predictions) -> None:
    for row in rows:
        for k, v in predictions.get((row["mesh"], row["rules"]), {}).items():
            row[f"predicted_{k}"] = v


# ---- output ----

COLUMNS = ["devices", "replicas", "tp", "mesh", "rules", "sampling", "output_processing",
           "throughput_tok_s", "step_ms", "device_ms_per_step", "host_only_ms_per_step",
           "host_only_fraction", "kv_capacity_seqs", "kv_blocks_per_replica",
           "weights_mib_per_device", "kv_block_kib_per_device", "preemptions", "steps",
           "output_tokens", "wall_s", "compilations", "platform", "skipped"]


def write_csv(path: Path, rows: list[dict]) -> None:
    extra = sorted({k for r in rows for k in r if k not in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS + extra, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in r.items()})


def title(results: dict) -> str:
    note = f" ({SIMULATED_NOTE})" if results["simulated"] else ""
    return f"{results['devices']} {results['platform']} devices, {results['model_name']}{note}"


def print_table(results: dict) -> None:
    print(f"\n## TP sweep: {title(results)}")
    print(f"workload: {results['workload']}; memory per device "
          f"{results['device_memory_mib']:.3g} MiB")
    head = ("split", "mesh", "sampling", "tok/s", "step ms", "device", "host only", "KV seqs",
            "preempt")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" if i > 2 else "---" for i in range(len(head))) + "|")
    for r in results["rows"]:
        split = f"{r['replicas']}x{r['tp']}"
        if "throughput_tok_s" not in r:
            print(f"| {split} | {r['mesh']} | {r.get('sampling', '')} | skipped: "
                  f"{r.get('skipped', '')} |")
            continue
        print(f"| {split} | {r['mesh']} | {r['sampling']} | {r['throughput_tok_s']:.1f} | "
              f"{r['step_ms']:.2f} | {r['device_ms_per_step']:.2f} | "
              f"{r['host_only_ms_per_step']:.2f} ({100 * r['host_only_fraction']:.0f}%) | "
              f"{r['kv_capacity_seqs']} | {r['preemptions']} |")
    for mode, fit in results["amdahl"].items():
        p = f"p = {fit['p']:.3f} (serial {fit['serial_ms']:.2f} ms + parallel " \
            f"{fit['parallel_ms']:.2f} ms / t)" if fit else "p: needs two degrees"
        print(f"{mode}: Amdahl {p}; t_e = {results['t_e'].get(mode)}")


# ---- main ----

def main(argv=None) -> dict:
    args = parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    import jax
    import numpy as np

    from jaxserve.bench.plots import plot_tp_sweep
    from jaxserve.checkpoint import CONFIG_FILE
    from jaxserve.config import ModelConfig

    if len(jax.devices()) < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {len(jax.devices())} "
                         f"{jax.default_backend()} device(s) exist")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model_dir, config = args.model, ModelConfig.load(args.model / CONFIG_FILE)
            name = str(args.model)
        else:
            model_dir = Path(tmp) / args.preset
            config = save_random_model(PRESETS[args.preset], model_dir)
            name = f"random {args.preset} model ({config.num_params() / 1e6:.1f}M parameters)"
        whole = weight_bytes_per_device(config, _one_device_layout(), 4)
        memory = (args.device_memory_mib * 2**20 if args.device_memory_mib is not None
                  else 1.2 * whole)
        rng = np.random.default_rng(0)
        prompts, warmup_prompts = ([rng.integers(3, config.vocab_size, size=args.prompt_len)
                                    .tolist() for _ in range(args.requests)] for _ in range(2))
        rows = []
        with CpuWatch() as watch:
            for split in splits(args.devices, config):
                for mode in args.sampling:
                    if "skipped" in split:
                        rows.append(dict(split, sampling=mode))
                        continue
                    row = run_split(model_dir, config, split, args, memory, mode, prompts,
                                    warmup_prompts)
                    rows.append(row)
                    print(f"{row['replicas']}x{row['tp']} {row['mesh']:>12s} {mode}: " + (
                        f"{row['throughput_tok_s']:.1f} tok/s, {row['step_ms']:.2f} ms/step "
                        f"(host only {row['host_only_ms_per_step']:.2f}), KV "
                        f"{row['kv_capacity_seqs']} seqs, {row['preemptions']} preemptions"
                        if "skipped" not in row else f"skipped: {row['skipped']}"), flush=True)
    if args.predictions is not None:
        add_predictions(rows, read_predictions(args.predictions))
    if args.predict is not None:
        add_predictions(rows, model_predictions(config, splits(args.devices, config), args))
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "load": watch.result, "devices": args.devices,
        "platform": jax.default_backend(), "simulated": jax.default_backend() == "cpu",
        "model_name": name, "model": config.to_json_dict(), "device_memory_mib": memory / 2**20,
        "workload": f"{args.requests} requests x ({args.prompt_len} prompt + "
                    f"{args.output_len} greedy output) tokens",
        "sampling": args.sampling, "rows": rows,
        "amdahl": {m: fit_amdahl([r for r in rows if r.get("sampling") == m])
                   for m in args.sampling},
        "t_e": {m: best_degree([r for r in rows if r.get("sampling") == m])
                for m in args.sampling},
    }
    print_table(results)
    if args.csv:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    if args.png:
        plot_tp_sweep(args.png, results, title(results))
        print(f"wrote {args.png}")
    if args.json:
        write_json(args.json, results)
    return results


def _one_device_layout():
    from jaxserve.sharding import Layout

    return Layout.create(None, "tp", abstract=True)

