"""Offline benchmark: jaxserve with default settings, side by side with HF transformers and with
what the machine itself allows.

    python scripts/bench_offline.py --json bench.json                 # everything (long)
    python scripts/bench_offline.py --parts machine,decode --json d.json
    python scripts/bench_offline.py --repeats 1 --mixed-requests 16 --batches 1,8 --force

Everything on jaxserve's side runs as a user gets it: `LLM(model_dir)` (plus `dtype=` in the
bf16 part, `max_model_len=` for the second engine of the long part), no engine settings. The
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

The default engine's `llm.warmup()` (programs compiled, seconds; target <= 30 s) is reported by
whichever part loads it first (--no-warmup skips every warmup, for quick checks: programs then
compile during the untimed warm-up calls). Prints a table per part and which parts ran; with
--json writes every number plus the date, machine and versions.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = Path("/tmp/jaxserve-bench-55m")
PARTS = ("machine", "decode", "equal", "mixed", "long", "bf16")
EQUAL_TARGETS = {1: 3.0, 8: 2.5, 32: 1.5}  # jaxserve / HF output tokens/s, by batch
FLOOR_TARGET = 1.5  # decode step ms / floor ms
MIXED_TARGET = 3.0
WARMUP_TARGET_S = 30.0
OTHERS_FLAG_CORES = 0.2  # other processes' average CPU use that flags a part as LOADED
P, N = 128, 128  # the equal workload; the decode part's context is P + N // 2


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
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        p.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
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


# ---- machine facts and load ----

def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return names[0] if names else None
    except OSError:
        return None


def machine_info() -> dict:
    import jax
    import jaxlib
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "XLA_FLAGS": os.environ.get("XLA_FLAGS")}
    for mod in ("flax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True,  # noqa
                                        text=True, timeout=10).stdout.strip()
        info["git_commit"] = run("rev-parse", "HEAD") or None
        info["jaxserve_dirty"] = bool(run("status", "--porcelain", "--", "jaxserve"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


class CpuWatch:
    """CPU time used by OTHER processes while a part runs: the usable CPUs' busy time in
    /proc/stat minus this process's own CPU time, in cores (0 = nothing else ran)."""

    def __init__(self):
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.clk = os.sysconf("SC_CLK_TCK")

    def _sample(self):
        busy = steal = 0
        try:
            with open("/proc/stat") as f:
                for line in f:
                    name, *vals = line.split()
                    if not name.startswith("cpu") or name == "cpu":
                        continue
                    if self.cpus is not None and int(name[3:]) not in self.cpus:
                        continue
                    v = [int(x) for x in vals]  # user nice system idle iowait irq softirq steal
                    busy += v[0] + v[1] + v[2] + v[5] + v[6]
                    steal += v[7] if len(v) > 7 else 0
        except (OSError, ValueError):
            return None
        t = os.times()  # this process and the children it waited for (a launched server)
        return (time.perf_counter(), busy / self.clk, steal / self.clk,
                t.user + t.system + t.children_user + t.children_system)

    def __enter__(self):
        self.start, self.result = self._sample(), None
        return self

    def __exit__(self, *exc):
        end = self._sample()
        if self.start is not None and end is not None and end[0] > self.start[0]:
            dt = end[0] - self.start[0]
            others = ((end[1] - self.start[1]) - (end[3] - self.start[3])) / dt
            self.result = {"others_cores": max(others, 0.0),
                           "steal_cores": (end[2] - self.start[2]) / dt,
                           "self_cores": (end[3] - self.start[3]) / dt, "seconds": dt,
                           "loadavg_end": os.getloadavg()}


def load_gate(args) -> dict:
    """Wait for a quiet machine; refuse a loaded one unless --force (then flag the results)."""
    waited = 0.0
    load = os.getloadavg()[0]
    while load > args.max_load and waited < args.load_wait:
        print(f"load average {load:.2f} > --max-load {args.max_load}: waiting "
              f"({waited:.0f}/{args.load_wait:.0f} s)", flush=True)
        time.sleep(10)
        waited += 10
        load = os.getloadavg()[0]
    loaded = load > args.max_load
    if loaded and not args.force:
        sys.exit(f"refusing to run: 1-minute load average {load:.2f} > {args.max_load} (other "
                 "work would distort HF's numbers; wait for a quiet machine or pass --force to "
                 "run with the results flagged LOADED)")
    if loaded:
        print(f"WARNING: load average {load:.2f} > {args.max_load}; running anyway (--force), "
              "results flagged LOADED", file=sys.stderr, flush=True)
    return {"loadavg_start": os.getloadavg(), "max_load": args.max_load, "waited_s": waited,
            "loaded_at_start": loaded}


# ---- small helpers ----

def best(xs):
    return min(xs) if xs else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".1f", suffix=""):
    return "n/a" if x is None else format(x, spec) + suffix


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def print_table(title: str, rows: list, flag: str = "") -> None:
    """rows: (metric, value[, target[, verdict]]) tuples, or None for a separator."""
    rows = [tuple(r) + ("",) * (4 - len(r)) if r else None for r in rows]
    w = [max([len(h)] + [len(str(r[i])) for r in rows if r]) for i, h in
         enumerate(("metric", "value", "target", "verdict"))]
    print(f"\n## {title}{'  [' + flag + ']' if flag else ''}")
    print(f"| {'metric':<{w[0]}} | {'value':>{w[1]}} | {'target':<{w[2]}} | "
          f"{'verdict':<{w[3]}} |")
    print(f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 1)}:|{'-' * (w[2] + 2)}|{'-' * (w[3] + 2)}|")
    for r in rows:
        if r is None:
            print(f"| {'':<{w[0]}} | {'':>{w[1]}} | {'':<{w[2]}} | {'':<{w[3]}} |")
        else:
            print(f"| {r[0]:<{w[0]}} | {str(r[1]):>{w[1]}} | {str(r[2]):<{w[2]}} | "
                  f"{str(r[3]):<{w[3]}} |")
    sys.stdout.flush()


def random_prompts(rng, vocab: int, lengths) -> list[list[int]]:
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]  # no bos/eos/pad ids


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if diff.size else n


# ---- model directories ----

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


def ensure_current_checkpoint(hf: Path, ours: Path) -> bool:
    """Reconvert OUT/jaxserve from OUT/hf when it was written in an older format (e.g. before
    the LM head was stored [vocab, embed]). Returns True when it reconverted."""
    from jaxserve.checkpoint import CheckpointError, convert_hf, restore_model
    from jaxserve.sharding import Layout
    try:
        restore_model(ours, Layout.create(None, "tp"), None)
        return False
    except CheckpointError as e:
        print(f"{ours} does not load ({str(e).splitlines()[0]}); reconverting from {hf}",
              flush=True)
    shutil.rmtree(ours)
    convert_hf(hf, ours, dtype="float32")
    return True


# ---- shared state of a run ----

class Context:
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
            self._hf = HFSide(self.hf_dir)
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


def load_llm(model_dir: Path, warmup: bool = True, **kwargs):
    """LLM(model_dir, **kwargs) + warmup; returns (llm, load/warmup facts)."""
    from jaxserve import LLM
    t0 = time.perf_counter()
    llm = LLM(model_dir, **kwargs)
    load_s = time.perf_counter() - t0
    programs = warmup_s = None
    if warmup:
        t0 = time.perf_counter()
        programs = llm.warmup()
        warmup_s = time.perf_counter() - t0
    return llm, {"kwargs": {k: str(v) for k, v in kwargs.items()}, "load_s": load_s,
                 "warmup_programs": programs, "warmup_s": warmup_s,
                 "max_model_len": llm.max_model_len,
                 "kv_blocks_total": llm.stats()["kv_blocks_total"],
                 "block_size": llm.runner.block_size,
                 "param_dtype": str(llm.runner.param_leaves[0].dtype)}


def print_warmup(title: str, info: dict, flag: str = "") -> None:
    print_table(f"warmup: {title}", [
        ("load (s)", fmt(info["load_s"], ".1f")),
        ("llm.warmup(): programs compiled", fmt(info["warmup_programs"], "d")),
        ("llm.warmup(): seconds", fmt(info["warmup_s"], ".1f"), f"<= {WARMUP_TARGET_S:.0f}",
         verdict(None if info["warmup_s"] is None else info["warmup_s"] <= WARMUP_TARGET_S)),
        ("max_model_len chosen", info["max_model_len"]),
        ("KV pool blocks (kv_blocks_total) x block_size",
         f"{info['kv_blocks_total']} x {info['block_size']}")], flag)


# ---- part: machine ----

def read_bandwidth(nbytes: int, threads: int, repeats: int) -> float:
    """Bytes/s of np.sum over an nbytes float32 array split over `threads` Python threads."""
    a = np.ones(nbytes // 4, np.float32)  # written once: every page is really there
    parts = np.array_split(a, threads)
    sums = [0.0] * threads
    times = []
    for _ in range(max(repeats, 3)):
        if threads == 1:
            t0 = time.perf_counter()
            sums[0] = float(a.sum())
        else:
            barrier = threading.Barrier(threads + 1)

            def work(i):
                barrier.wait()
                sums[i] = float(parts[i].sum())
            pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for t in pool:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in pool:
                t.join()
        times.append(time.perf_counter() - t0)
    assert abs(sum(sums) - a.size) < 1e-3 * a.size
    return nbytes / min(times)


def numpy_sgemm(n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    a @ b
    times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def jax_dot(n: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
    y = jax.device_put(np.random.default_rng(1).standard_normal((n, n), np.float32))
    f = jax.jit(jnp.dot)
    f(x, y).block_until_ready()
    times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        f(x, y).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def matmul_params(shape: dict) -> int:
    """Parameters that take part in a decode step's matmuls (all but the embedding and norms)."""
    e, d, m = shape["hidden_size"], shape["head_dim"], shape["intermediate_size"]
    attn = e * d * (2 * shape["num_heads"] + 2 * shape["num_kv_heads"])
    return shape["num_layers"] * (attn + 3 * e * m) + shape["vocab_size"] * e


def time_matmul_stack(shape: dict, batch: int, iters: int, repeats: int) -> dict:
    """Exactly the decode step's weight products, float32, layers unrolled, chained calls."""
    import jax
    import jax.numpy as jnp
    e, d, m, v = (shape[k] for k in ("hidden_size", "head_dim", "intermediate_size",
                                     "vocab_size"))
    h, kv = shape["num_heads"], shape["num_kv_heads"]
    rng = np.random.default_rng(0)

    def w(rows, cols):
        return jax.device_put((rng.standard_normal((rows, cols), np.float32)
                               / np.float32(math.sqrt(rows))))
    layers = [(w(e, h * d), w(e, kv * d), w(e, kv * d), w(h * d, e), w(e, m), w(e, m), w(m, e))
              for _ in range(shape["num_layers"])]
    head = w(v, e)  # [vocab, embed], as the model stores it

    @jax.jit
    def stack(layers, head, x):
        b = x.shape[0]
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, vv = x @ wq, x @ wk, x @ wv
            a = (q.reshape(b, kv, h // kv, d) + (k + vv).reshape(b, kv, 1, d)).reshape(b, h * d)
            x = x + a @ wo
            x = x + (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
        logits = jnp.einsum("be,ve->bv", x, head)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return x, jnp.argmax(logits, axis=-1)

    state = {"x": jax.device_put(rng.standard_normal((batch, e), np.float32))}

    def dispatch():
        state["x"], ids = stack(layers, head, state["x"])
        return ids
    for _ in range(3):
        np.asarray(dispatch())
    runs = [readback_loop(dispatch, iters) for _ in range(repeats)]
    return {"batch": batch, "ms_per_step": median([r["ms_per_step"] for r in runs]),
            "runs": runs}


def readback_loop(dispatch, iters: int, in_flight: int = 2) -> dict:
    """The engine's pattern: dispatch a step, read back the oldest once `in_flight` are out."""
    queue, marks = collections.deque(), []
    t0 = time.perf_counter()
    for _ in range(iters):
        queue.append(dispatch())
        if len(queue) >= in_flight:
            np.asarray(queue.popleft())
            marks.append(time.perf_counter())
    while queue:
        np.asarray(queue.popleft())
    wall = time.perf_counter() - t0
    gaps = np.diff(marks)
    return {"ms_per_step": wall / iters * 1e3,
            "median_interval_ms": float(np.median(gaps)) * 1e3 if gaps.size else None}


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

class StandInSequence:
    """The attributes `StepBuilder.build` reads from a decoding sequence."""

    def __init__(self, slot: int, blocks: list[int], total_len: int, params, generated: int):
        self.replica, self.slot, self.blocks, self.total_len = 0, slot, blocks, total_len
        self.params, self.seed, self.num_scheduled_outputs = params, slot, generated


def decode_step_inputs(llm, batch: int, context: int, generated: int):
    """Decode-only step inputs for `batch` sequences of `context` tokens, built by the engine's
    own step builder; each sequence has its own slot and blocks."""
    from jaxserve import SamplingParams
    from jaxserve.engine.scheduler import StepPlan
    from jaxserve.kv_cache import NULL_BLOCK
    bs = llm.runner.block_size
    nblk = math.ceil(context / bs)
    if batch > llm.engine.config.max_num_seqs:
        raise ValueError(f"batch {batch} > the engine's max_num_seqs")
    if NULL_BLOCK + 1 + batch * nblk > llm.runner.blocks_per_replica:
        raise ValueError("the KV pool is too small for the decode loop")
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    first = NULL_BLOCK + 1
    seqs = [StandInSequence(i, list(range(first + i * nblk, first + (i + 1) * nblk)), context,
                            params, generated) for i in range(batch)]
    return llm.engine.builder.build(StepPlan([], seqs)).inputs


def time_decode(llm, batch: int, iters: int, repeats: int = 1) -> list[dict]:
    inputs = decode_step_inputs(llm, batch, P + N // 2, N // 2)
    runner = llm.runner
    dispatch = lambda: runner.step(inputs).tokens  # noqa: E731
    for _ in range(3):
        np.asarray(dispatch())
    return [readback_loop(dispatch, iters) for _ in range(repeats)]


def step_cost(config, batch: int, context: int, itemsize: int, kv_itemsize: int) -> dict:
    e, d, m = config.hidden_size, config.head_dim, config.intermediate_size
    layers, h, kv, v = config.num_layers, config.num_heads, config.num_kv_heads, config.vocab_size
    layer_params = e * d * (2 * h + 2 * kv) + 3 * e * m + 2 * e
    weight_bytes = (layers * layer_params + e + v * e) * itemsize
    kv_bytes = layers * context * 2 * kv * d * kv_itemsize * batch
    mm = layers * (e * d * (2 * h + 2 * kv) + 3 * e * m) + v * e
    flops = 2 * mm * batch + 4 * layers * h * d * context * batch
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "bytes": weight_bytes + kv_bytes, "flops": flops}


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


# ---- HF transformers ----

class HFSide:
    def __init__(self, hf_dir: Path):
        import torch
        import transformers
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32).eval()

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, new_tokens: int,
                 threads: int) -> tuple[float, np.ndarray]:
        """Greedy, exactly new_tokens per row. Returns (wall seconds, new tokens [B, n])."""
        torch = self.torch
        torch.set_num_threads(threads)
        ids = torch.from_numpy(np.asarray(input_ids, np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else \
            torch.from_numpy(np.asarray(attention_mask, np.int64))
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=0)
            wall = time.perf_counter() - t0
        out = out[:, ids.shape[1]:].numpy()
        assert out.shape == (ids.shape[0], new_tokens), out.shape
        return wall, out


# ---- jaxserve generate, with the engine's decode steps timed ----

class StepRecorder:
    """Wraps `engine.step`: after each call, (time, steps, prefill steps, steps in flight,
    process CPU time)."""

    def __init__(self, engine):
        self.engine, self.inner, self.marks = engine, engine.step, []

    def __call__(self):
        finished = self.inner()
        c = self.engine.counters
        self.marks.append((time.perf_counter(), c["steps"], c["prefill_steps"],
                           len(self.engine.inflight), time.process_time()))
        return finished

    def __enter__(self):
        self.marks = []
        self.engine.step = self
        return self

    def __exit__(self, *exc):
        del self.engine.step  # back to the class's method


def decode_window(marks) -> dict | None:
    """Engine ms per decode step: from the first `Engine.step` call after which every prefill
    step has been read back (only decode steps remain on the device) to the last call."""
    if len(marks) < 3:
        return None
    final_prefill = marks[-1][2]
    last_prefill_step = next(m[1] for m in marks if m[2] == final_prefill)
    start = next((i for i, m in enumerate(marks) if m[1] - m[3] >= last_prefill_step), None)
    if start is None:
        return None
    read = lambda m: m[1] - m[3]  # noqa: E731  steps read back by that call
    steps = read(marks[-1]) - read(marks[start])
    if steps < 2:
        return None
    window = marks[-1][0] - marks[start][0]
    gaps = np.diff([m[0] for m in marks[start:]])
    return {"decode_steps": steps, "window_s": window, "ms_per_step": window / steps * 1e3,
            "median_interval_ms": float(np.median(gaps)) * 1e3,
            "cpu_ms_per_step": (marks[-1][4] - marks[start][4]) / steps * 1e3}


def jax_generate(llm, prompts, params) -> tuple[dict, list[list[int]]]:
    before = dict(llm.stats())
    with StepRecorder(llm.engine) as rec:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    after = llm.stats()
    delta = {k: after[k] - before.get(k, 0) for k in
             ("compilations", "steps", "prefill_steps", "decode_steps", "generated_tokens",
              "discarded_tokens", "preemptions", "schedule_s", "dispatch_s", "readback_wait_s",
              "process_s") if k in after}
    return ({"wall_s": wall, "stats_delta": delta, "decode": decode_window(rec.marks)},
            [list(o.outputs[0].token_ids) for o in outs])


def greedy(n: int):
    from jaxserve import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


# ---- part: equal ----

def part_equal(ctx: Context) -> dict:
    args = ctx.args
    llm, hf = ctx.llm(), ctx.hf()
    rng = np.random.default_rng(args.seed)
    prompts = {b: np.asarray(random_prompts(rng, ctx.vocab, [P] * b)) for b in args.batches}
    for b in args.batches:  # warm-up calls (excluded)
        for t in args.torch_threads:
            hf.generate(prompts[b], None, 4, t)
        jax_generate(llm, prompts[b].tolist(), greedy(4))
    runs = {b: collections.defaultdict(list) for b in args.batches}
    tokens = {b: {} for b in args.batches}
    for r in range(args.repeats):
        msg = []
        for b in args.batches:
            for t in args.torch_threads:
                wall, tokens[b][f"hf{t}"] = hf.generate(prompts[b], None, N, t)
                runs[b][f"hf{t}"].append(wall)
            res, tokens[b]["jax"] = jax_generate(llm, prompts[b].tolist(), greedy(N))
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

def mixed_workload(n: int, seed: int, vocab: int):
    rng = np.random.default_rng(seed + 1)
    prompt_lens = rng.integers(16, 1024, size=n, endpoint=True)
    out_lens = rng.integers(16, 512, size=n, endpoint=True)
    return random_prompts(rng, vocab, prompt_lens), [int(x) for x in out_lens]


def hf_mixed(hf, prompts, out_lens, threads: int, batch: int = 8, progress: bool = True):
    """Static batches in arrival order, left-padded with id 0. Returns (wall, per-request
    tokens, per-batch walls)."""
    tokens, walls = [], []
    n_batches = math.ceil(len(prompts) / batch)
    for k in range(0, len(prompts), batch):
        ps, ns = prompts[k:k + batch], out_lens[k:k + batch]
        width = max(len(p) for p in ps)
        ids = np.zeros((len(ps), width), np.int64)
        mask = np.zeros((len(ps), width), np.int64)
        for i, p in enumerate(ps):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        wall, out = hf.generate(ids, mask, max(ns), threads)
        walls.append(wall)
        tokens += [out[i, :n].tolist() for i, n in enumerate(ns)]
        if progress:
            print(f"  HF mixed batch {k // batch + 1}/{n_batches}: {len(ps)} requests, "
                  f"prompts <= {width}, {max(ns)} new tokens, {wall:.1f}s", flush=True)
    return sum(walls), tokens, walls


def part_mixed(ctx: Context) -> dict:
    args = ctx.args
    llm, hf = ctx.llm(), ctx.hf()
    prompts, out_lens = mixed_workload(args.mixed_requests, args.seed, ctx.vocab)
    useful = sum(out_lens)
    params = [greedy(n) for n in out_lens]
    head = args.torch_threads[0]
    jax_generate(llm, prompts[:8], params[:8])  # warm-up (excluded)
    hf_mixed(hf, prompts[:8], [4] * min(8, len(prompts)), head, progress=False)
    runs = collections.defaultdict(list)
    jax_tokens = hf_tokens = None
    for r in range(args.mixed_repeats):
        res, jax_tokens = jax_generate(llm, prompts, params)
        runs["jax"].append(res)
        print(f"mixed repeat {r + 1}/{args.mixed_repeats}: jaxserve {res['wall_s']:.1f}s; HF "
              f"in {math.ceil(len(prompts) / 8)} batches of 8:", flush=True)
        wall, hf_tokens, walls = hf_mixed(hf, prompts, out_lens, head)
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
            jax_generate(llm, prompts, greedy(4))  # warm-up (excluded)
            engines[name] = (llm, info)
        runs = collections.defaultdict(list)
        for r in range(args.repeats):
            for name, (llm, _) in engines.items():
                runs[name].append(jax_generate(llm, prompts, greedy(new))[0])
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
        jax_generate(llm, prompts, greedy(4))
    runs = {k: collections.defaultdict(list) for k in engines}
    for r in range(args.repeats):
        for name, llm in engines.items():
            for b in args.bf16_batches:
                runs[name][f"decode{b}"] += time_decode(llm, b, args.decode_iters)
            runs[name]["generate"].append(jax_generate(llm, prompts, greedy(N))[0])
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


# ---- main ----

PART_FUNCS = {"machine": part_machine, "decode": part_decode, "equal": part_equal,
              "mixed": part_mixed, "long": part_long, "bf16": part_bf16}


def main(argv=None) -> dict:
    args = parse_args(argv)
    gate = load_gate(args)
    hf_dir, ours_dir = model_dirs(args)
    import jax  # noqa: F401  (after the load check: importing is work too)
    reconverted = ensure_current_checkpoint(hf_dir, ours_dir) if \
        set(args.parts) - {"machine"} else False
    ctx = Context(args, hf_dir, ours_dir)
    ctx.flag = "LOADED" if gate["loaded_at_start"] else ""
    info = machine_info()
    print(f"CPU: {info['cpu_model']} ({info['cpus_usable']} usable), jax {info['jax']} "
          f"({info['jax_backend']}), torch {info.get('torch')}, transformers "
          f"{info.get('transformers')}; load average {gate['loadavg_start'][0]:.2f}; "
          f"model {ours_dir.parent}; parts: {','.join(args.parts)}", flush=True)
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": {**info, **gate},
               "model_dir": str(ours_dir.parent), "reconverted_checkpoint": reconverted,
               "settings": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()},
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
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
        print(f"wrote {args.json}")
    if failed:
        sys.exit(1)
    return results


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


if __name__ == "__main__":
    main()
