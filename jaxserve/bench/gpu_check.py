"""The first-GPU check: one command that, in a few minutes on one H100/H200, records what the
CPU-only test suite cannot: HF parity of a dense and a MoE model on the GPU (the `ragged_dot`
grouped matmuls and the `ragged_all_to_all` exchange), a decode step against the HBM roofline,
a prefill against peak FLOPs, `calibrate`'s measured profile, and the performance model's
predictions for that profile beside the measurements.

Design: a device lease is short and may end at any moment, so the check is a list of parts,
each run in its own thread with a time budget (`run_part`). A part that raises, or outlasts its
budget, is recorded ("failed" / "timed out", with the error) and the next part runs; a part
that finds the check's total budget spent is "skipped"; a part whose inputs failed uses what
there is (the prediction without the calibrated profile, say). The JSON is rewritten after
every part, so whatever was measured survives a lease that ends early. `--dry-run` runs the
same parts on one CPU device with the tiniest sizes, every result labelled dry-run;
tests/test_gpu_check.py runs it end to end so the command cannot rot before a GPU is lent.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxserve.bench.report import comma_choices, fmt, json_default

PARTS = ("environment", "parity_dense", "parity_moe", "ragged_all_to_all", "decode_roofline",
         "prefill_peak", "calibrate", "prediction")
PROMPTS = [[1, 5, 9, 200, 3, 77, 400, 12, 8, 8, 8, 31], [7, 3], list(range(2, 47))]
MOE_EXECUTIONS = ("dense", "alltoall-fixed", "alltoall-ragged", "allgather")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the check runs at: the random model timed for decode and prefill (ModelConfig
    fields), its dtype, the decode step and the prefill, and each part's budget in seconds."""

    bench_model: dict
    dtype: str
    decode_batch: int
    decode_context: int
    decode_iters: int
    prefill_tokens: int
    bandwidth_mib: int
    repeats: int
    calibrate_quick: bool
    budgets: dict
    parity_tolerance: float  # max |ours - HF| over max |HF|


GPU = Sizes(
    # ~1.1B parameters (2.2 GB in bfloat16): a decode step streams enough bytes to be timed
    bench_model=dict(family="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                     num_layers=16, num_heads=16, num_kv_heads=4, head_dim=128,
                     max_position_embeddings=4096, eos_token_ids=(2,)),
    dtype="bfloat16", decode_batch=8, decode_context=1024, decode_iters=50, prefill_tokens=2048,
    bandwidth_mib=2048, repeats=5, calibrate_quick=False,
    budgets=dict(environment=20, parity_dense=50, parity_moe=70, ragged_all_to_all=20,
                 decode_roofline=100, prefill_peak=40, calibrate=140, prediction=10),
    # float32 products run as TF32 on the GPU by default: ~1e-3 relative per product
    parity_tolerance=1e-2)
DRY_RUN = dataclasses.replace(
    GPU, bench_model=dict(GPU.bench_model, vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          max_position_embeddings=256),
    dtype="float32", decode_batch=2, decode_context=32, decode_iters=5, prefill_tokens=64,
    bandwidth_mib=8, repeats=2, calibrate_quick=True, parity_tolerance=1e-4,
    # generous: the dry run checks the code path, on whatever machine runs the tests
    budgets={name: max(120, 4 * s) for name, s in GPU.budgets.items()})
TOTAL_BUDGET_S = 480  # 8 minutes: a 15-minute lease leaves time for its start and a rerun


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the same parts on one CPU device at the tiniest sizes (results "
                        "labelled dry-run)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/gpu_check.json"),
                   help="the JSON result file (rewritten after every part)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="append the markdown section to this file (e.g. BENCHMARKS.md)")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S,
                   help="seconds for the whole check; a part gets the smaller of its own "
                        "budget and what is left")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run (of {', '.join(PARTS)})")
    args = p.parse_args(argv)
    parts = comma_choices(p, "--parts", args.parts, PARTS)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    args.parts = parts
    return args


def use_one_cpu_device() -> None:
    """Before jax is imported: the CPU platform with one device (the dry run)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in flags if not f.startswith("--xla_force_host_platform_device_count"))


# ---- running parts under budgets ----

def run_part(fn: Callable[[], dict], budget_s: float) -> dict:
    """fn() in a thread, waited on for `budget_s`: {status, seconds, result | error}. A part
    that outlasts its budget is left running (a daemon thread) and recorded as timed out."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001  recorded, never raised
            box["error"] = f"{type(e).__name__}: {e}"
            box["traceback"] = traceback.format_exc(limit=8)

    t0 = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(budget_s)
    out = {"seconds": round(time.perf_counter() - t0, 3), "budget_s": budget_s}
    if thread.is_alive():
        return {**out, "status": "timed out", "error": f"still running after {budget_s:.0f}s"}
    if "error" in box:
        return {**out, "status": "failed", "error": box["error"],
                "traceback": box["traceback"]}
    return {**out, "status": "ok", "result": box["result"]}


class Check:
    """The parts, the state they share (models built, measurements), and the result file."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.dry_run = args, args.dry_run
        self.sizes = DRY_RUN if args.dry_run else GPU
        self.workdir = workdir
        self.state: dict[str, Any] = {}
        self._building = threading.Lock()
        self.results: dict[str, Any] = {
            "kind": "gpu_check", "dry_run": self.dry_run,
            "label": "dry-run (one CPU device, tiniest sizes: not a measurement of anything)"
            if self.dry_run else "measured",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sizes": dataclasses.asdict(self.sizes), "budget_s": args.budget_s, "parts": {}}

    def run(self) -> dict:
        start = time.perf_counter()
        for name in self.args.parts:
            left = self.args.budget_s - (time.perf_counter() - start)
            if left <= 1:
                record = {"status": "skipped", "seconds": 0.0,
                          "error": f"the check's {self.args.budget_s:.0f}s were spent"}
            else:
                record = run_part(getattr(self, name), min(self.sizes.budgets[name], left))
            self.results["parts"][name] = record
            print(f"[gpu_check] {name}: {record['status']} ({record['seconds']:.1f}s)"
                  + (f" {record['error']}" if "error" in record else ""), flush=True)
            self.save()
        self.results["total_s"] = round(time.perf_counter() - start, 3)
        self.save()
        return self.results

    def save(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=1, default=json_default) + "\n")

    # ---- the parts ----
    def environment(self) -> dict:
        import jax

        from jaxserve.bench.machine import machine_info
        from jaxserve.perf.moe_auto import profile_for_device

        device = jax.devices()[0]
        self.state["device"] = device
        self.state["profile"] = profile_for_device(device.platform, device.device_kind)
        return {"machine": machine_info(), "platform": device.platform,
                "device_kind": device.device_kind, "devices": len(jax.devices()),
                "builtin_profile": self.state["profile"]}

    def _parity_model(self, family: str):
        from jaxserve import LLM
        from jaxserve.bench.hf_models import make_hf_model
        from jaxserve.bench.peers import HFPeer
        from jaxserve.checkpoint import convert_hf

        root = self.workdir / family
        hf_dir = make_hf_model(family, root / "hf")
        convert_hf(hf_dir, root / "jaxserve", dtype="float32")
        peer = HFPeer(hf_dir)
        torch = peer.torch
        with torch.no_grad():
            ref = [peer.model(torch.tensor([p])).logits[0].numpy() for p in PROMPTS]
        llm = LLM(root / "jaxserve", dtype="float32", compilation="on_use", kv_blocks=48,
                  max_num_seqs=4, max_model_len=128)
        return llm, ref

    def _compare(self, ours, ref) -> dict:
        scale = max(float(np.max(np.abs(r))) for r in ref)
        err = max(float(np.max(np.abs(o - r))) for o, r in zip(ours, ref))
        top1 = np.mean(np.concatenate([o.argmax(-1) == r.argmax(-1) for o, r in zip(ours, ref)]))
        return {"max_abs_error": err, "relative_error": err / scale,
                "top1_agreement": float(top1),
                "ok": err <= self.sizes.parity_tolerance * scale}

    def parity_dense(self) -> dict:
        llm, ref = self._parity_model("qwen3")
        out = self._compare(llm.logits(PROMPTS), ref)
        return {"family": "qwen3", "tolerance": self.sizes.parity_tolerance, **out}

    def parity_moe(self) -> dict:
        import jax

        from jaxserve.ops.moe import MoEExecution

        llm, ref = self._parity_model("qwen3_moe")
        threshold = {"tokens": llm.runner.moe.auto_threshold,
                     "source": llm.moe_threshold_source}  # MoE auto's, on this device
        by = {}
        for name in MOE_EXECUTIONS:
            strategy, _, exchange = name.partition("-")
            llm.runner.set_moe(MoEExecution(strategy, exchange=exchange or "platform"))
            by[name] = self._compare(llm.logits(PROMPTS), ref)
        cpu = jax.default_backend() == "cpu"
        return {"family": "qwen3_moe", "tolerance": self.sizes.parity_tolerance,
                "by_strategy": by, "ok": all(r["ok"] for r in by.values()),
                "auto_threshold": threshold,
                "grouped_matmul": "expert tiles or ragged_dot by size (XLA:CPU)" if cpu
                else "jax.lax.ragged_dot",
                "note": "one device: the engine's alltoall exchanges nothing; the "
                        "ragged_all_to_all op itself is checked in its own part"}

    def ragged_all_to_all(self) -> dict:
        """`jax.lax.ragged_all_to_all` on a one-device mesh axis against its definition, and
        the engine's fixed-capacity emulation (`sharding.ragged_all_to_all_logical` on XLA:CPU)
        on the same inputs."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, PartitionSpec

        rows, width = 6, 4
        operand = jnp.arange(rows * width, dtype=jnp.float32).reshape(rows, width) + 1
        output = jnp.zeros((rows + 2, width), jnp.float32)
        args = [jnp.asarray(a, jnp.int32) for a in ([1], [4], [3], [4])]  # offsets, sizes
        expected = np.zeros((rows + 2, width), np.float32)
        expected[3:7] = np.asarray(operand)[1:5]
        mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
        shard_map = getattr(jax, "shard_map", None)
        if shard_map is None:  # older jax
            from jax.experimental.shard_map import shard_map
        spec = PartitionSpec()
        out: dict[str, Any] = {"platform": jax.default_backend()}
        try:
            f = shard_map(lambda o, x, *a: jax.lax.ragged_all_to_all(o, x, *a, axis_name="ep"),
                          mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)
            got = np.asarray(jax.jit(f)(operand, output, *args))
            out["op"] = {"ran": True, "ok": bool(np.array_equal(got, expected))}
        except Exception as e:  # noqa: BLE001  XLA:CPU has no such op
            out["op"] = {"ran": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        out["ok"] = out["op"].get("ok", jax.default_backend() == "cpu")
        return out

    def _bench_llm(self):
        with self._building:  # a part that overran may still be building it
            return self._build_bench_llm()

    def _build_bench_llm(self):
        if "bench_llm" not in self.state:
            from jaxserve import LLM
            from jaxserve.bench.models import save_random_model

            s = self.sizes
            config = save_random_model(s.bench_model, self.workdir / "bench")
            nblk = -(-max(s.decode_context + 1, s.prefill_tokens) // 16)
            llm = LLM(self.workdir / "bench", dtype=s.dtype, compilation="on_use",
                      max_num_seqs=s.decode_batch, kv_blocks=2 + s.decode_batch * nblk,
                      max_model_len=nblk * 16, block_size=16)
            self.state["bench_llm"] = (llm, config)
        return self.state["bench_llm"]

    def decode_roofline(self) -> dict:
        import jax.numpy as jnp

        from jaxserve import SamplingParams
        from jaxserve.bench.floors import step_cost
        from jaxserve.bench.steps import decode_step_inputs, warm_dispatch
        from jaxserve.bench.timing import median, readback_loop
        from jaxserve.perf.calibrate import read_bandwidth

        s = self.sizes
        llm, config = self._bench_llm()
        bandwidth = read_bandwidth(s.bandwidth_mib, s.repeats)
        inputs = decode_step_inputs(llm, s.decode_batch, s.decode_context, 1,
                                    SamplingParams(temperature=0))
        dispatch = warm_dispatch(llm, inputs)
        runs = [readback_loop(dispatch, s.decode_iters) for _ in range(s.repeats)]
        step_s = median([r["ms_per_step"] for r in runs]) / 1e3
        itemsize = jnp.dtype(s.dtype).itemsize  # weights and KV in the engine's dtype
        cost = step_cost(config, s.decode_batch, s.decode_context, itemsize, itemsize)
        roofline_s = cost["bytes"] / bandwidth
        self.state["decode"] = {"step_s": step_s, "bandwidth": bandwidth}
        return {"batch": s.decode_batch, "context": s.decode_context, "step_ms": step_s * 1e3,
                "bytes_per_step": cost["bytes"], "measured_bandwidth_Bps": bandwidth,
                "roofline_ms": roofline_s * 1e3, "step_over_roofline": step_s / roofline_s,
                "effective_bandwidth_Bps": cost["bytes"] / step_s, "runs": runs}

    def prefill_peak(self) -> dict:
        from jaxserve.bench.moe import prefill_rows
        from jaxserve.perf.calibrate import square_matmul_rate

        s = self.sizes
        llm, config = self._bench_llm()
        row = prefill_rows(llm, config, s.prefill_tokens, s.repeats, np.random.default_rng(0))
        peak = square_matmul_rate(s.dtype, 256 if self.dry_run else 8192, s.repeats)
        achieved = row["true_flops"] / row["seconds"]
        self.state["prefill"] = {"step_s": row["seconds"]}
        out = {"tokens": s.prefill_tokens, "step_ms": row["seconds"] * 1e3,
               "true_flops": row["true_flops"], "executed_flops": row["executed_flops"],
               "achieved_flops_per_s": achieved, "measured_matmul_peak_flops_per_s": peak,
               "fraction_of_measured_peak": achieved / peak}
        if self.state.get("profile"):
            from jaxserve.perf.profiles import load_hardware

            published = load_hardware(self.state["profile"]).peak_flops.get(s.dtype)
            if published:
                out.update(published_peak_flops_per_s=published,
                           fraction_of_published_peak=achieved / published)
        return out

    def calibrate(self) -> dict:
        from jaxserve.perf.calibrate import calibrate
        from jaxserve.perf.profiles import save_hardware

        name = "dry-run-cpu" if self.dry_run else "measured-gpu"
        hw = calibrate(name, quick=self.sizes.calibrate_quick, progress=lambda m: None)
        path = self.args.out.with_suffix(".profile.yaml")
        save_hardware(hw, path, header="# Written by jaxserve.bench.gpu_check (calibrate)"
                      + (": a dry run, not a measurement" if self.dry_run else ""))
        self.state["hardware"] = hw
        return {"profile_path": str(path), "name": hw.name,
                "peak_flops": hw.peak_flops, "memory_bandwidth_Bps": hw.memory_bandwidth,
                "layer_overhead_s": hw.layer_overhead_s,
                "host_per_step_s": hw.host.per_step_s,
                "host_per_sequence_s": hw.host.per_sequence_s}

    def prediction(self) -> dict:
        """The model's step times for the measured profile (and the built-in one for this
        device, where there is one) beside the measured decode and prefill steps."""
        from jaxserve.perf.precision import Precision
        from jaxserve.perf.profiles import load_hardware
        from jaxserve.perf.step import Chunk, Deployment, decode_chunk

        s = self.sizes
        _, config = self._bench_llm()
        profiles = {"measured": self.state["hardware"]} if "hardware" in self.state else {}
        if self.state.get("profile"):
            profiles[self.state["profile"]] = load_hardware(self.state["profile"])
        if not profiles:
            raise RuntimeError("no profile to predict with: calibrate failed and this device "
                               "has no built-in profile")
        measured = {"decode": self.state.get("decode", {}).get("step_s"),
                    "prefill": self.state.get("prefill", {}).get("step_s")}
        steps = {"decode": [decode_chunk(s.decode_context, s.decode_batch)],
                 "prefill": [Chunk(0, s.prefill_tokens, 1)]}
        out: dict[str, Any] = {"measured_s": measured, "by_profile": {}}
        for name, hw in profiles.items():
            d = Deployment(config, None, "tp", hw, Precision(s.dtype))
            rows = {}
            for kind, chunks in steps.items():
                t = d.step(chunks)
                m = measured[kind]
                # the timed loops run the device step alone, without the engine's host work
                rows[kind] = {"predicted_device_s": t.device_s, "bottleneck": t.bottleneck,
                              "error": None if m is None else t.device_s / m - 1}
            out["by_profile"][name] = rows
        return out


# ---- the report ----

def _summary(name: str, rec: dict) -> str:
    r = rec.get("result")
    if rec["status"] != "ok" or r is None:
        return rec.get("error", "").splitlines()[0][:120] if rec.get("error") else ""
    if name == "environment":
        return f"{r['devices']} x {r['device_kind']} ({r['platform']}), jax " \
               f"{r['machine'].get('jax')}, profile {r['builtin_profile']}"
    if name == "parity_dense":
        return f"max rel. error {r['relative_error']:.2g} (tol {r['tolerance']:g}), " \
               f"top-1 {r['top1_agreement']:.3f}, {'PASS' if r['ok'] else 'FAIL'}"
    if name == "parity_moe":
        errs = ", ".join(f"{k} {v['relative_error']:.2g}" for k, v in r["by_strategy"].items())
        return f"{errs}; grouped matmul: {r['grouped_matmul']}; {'PASS' if r['ok'] else 'FAIL'}"
    if name == "ragged_all_to_all":
        op = r["op"]
        return ("ran, " + ("matches" if op["ok"] else "DIFFERS")) if op["ran"] else \
            f"not on {r['platform']}: {op['error'][:80]}"
    if name == "decode_roofline":
        gbps = r["measured_bandwidth_Bps"] / 1e9
        return f"{fmt(r['step_ms'], '.3f')} ms/step vs roofline {fmt(r['roofline_ms'], '.3f')} " \
               f"ms ({r['step_over_roofline']:.2f}x; {gbps:.0f} GB/s measured)"
    if name == "prefill_peak":
        pub = r.get("fraction_of_published_peak")
        return f"{r['tokens']} tokens in {r['step_ms']:.2f} ms: " \
               f"{r['achieved_flops_per_s'] / 1e12:.3g} TFLOP/s, " \
               f"{r['fraction_of_measured_peak']:.0%} of measured peak" + \
               (f", {pub:.0%} of published" if pub else "")
    if name == "calibrate":
        return f"wrote {r['profile_path']}: {r['memory_bandwidth_Bps'] / 1e9:.0f} GB/s, " \
               f"layer {r['layer_overhead_s'] * 1e6:.1f} us"
    if name == "prediction":
        parts = []
        for prof, rows in r["by_profile"].items():
            parts.append(f"{prof}: " + ", ".join(
                f"{k} {v['predicted_device_s'] * 1e3:.3g} ms"
                + (f" ({v['error']:+.0%})" if v["error"] is not None else "")
                for k, v in rows.items()))
        return "; ".join(parts)
    return ""


def markdown(results: dict) -> str:
    env = results["parts"].get("environment", {}).get("result") or {}
    where = env.get("device_kind", "unknown device")
    head = f"## GPU check, {results['date'][:10]}, {where}"
    if results["dry_run"]:
        head += " [dry-run]"
    lines = [head, "",
             f"`scripts/gpu_check.py{' --dry-run' if results['dry_run'] else ''}` "
             f"({results['label']}); {results.get('total_s', 0):.0f}s of a "
             f"{results['budget_s']:.0f}s budget.", "",
             "| part | status | seconds | result |", "|---|---|---:|---|"]
    for name, rec in results["parts"].items():
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']:.1f} | "
                     f"{_summary(name, rec).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        use_one_cpu_device()
    with tempfile.TemporaryDirectory(prefix="jaxserve-gpu-check-") as tmp:
        results = Check(args, Path(tmp)).run()
    text = markdown(results)
    print("\n" + text, flush=True)
    if args.markdown is not None:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
        print(f"appended to {args.markdown}")
    print(f"wrote {args.out}")
    return results
