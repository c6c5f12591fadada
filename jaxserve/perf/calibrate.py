"""Measure this machine and write its hardware profile (`jaxserve calibrate`).

The one module of `jaxserve.perf` that imports jax: it times, on the local JAX devices,

- matmuls by dtype and shape class: chains of decoder layers' products (q, k, v, o, gate, up,
  down) at hidden width 512, 1024 and 2048, over weights larger than the caches (so each call
  streams them from memory, like a decode step), at 1 .. 512 rows, and a square 2048 x 2048
  product for the peak; each curve is the rates over the peak;
- read bandwidth: a jitted sum over a large array;
- paged KV reads: gathering random blocks of a KV pool, as the reference attention op does;
- the fixed time of a decoder layer: a chain of tiny layers whose FLOPs and bytes are nil;
- the engine's host time per step: the tiny checkpoint generating at two batch sizes, from the
  engine's own host timers (schedule, dispatch, process), fitted to a fixed part plus a part
  per sequence;
- collectives, when there are several devices (simulated CPU devices included): all-reduces
  over two devices between products, as a TP step has them, at two message sizes, fitted to
  latency + bytes / bandwidth.

Every time is the best of several runs (other work on the machine only ever adds time).
Simulated CPU devices share the host's cores, so the profile says `shared_compute: true`.

`timed_shapes` lists every shape the calibration times, from the same constants the timers
use: a validation on shapes it has not seen (`bench/out_of_sample.py`) checks against it.
`tp_layer_programs` / `tp_layer_all_reduces` take a TP=2 step apart (products split, with and
without their all-reduces, and whole): `validate_perf`'s collectives part, not the profile.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxserve.package_data import embedded_model
from jaxserve.perf.profiles import Hardware, HostOverhead, Link

ROWS = (1, 8, 32, 128, 512)
WIDTHS = (512, 1024, 2048)  # hidden widths of the decoder layers measured
SQUARE, SQUARE_QUICK = 2048, 512  # the square product timed for the peak
KV_BLOCK = (16, 2, 64)  # (block_size, kv_heads, head_dim) of the paged KV reads timed
OVERHEAD_WIDTH = 64  # the tiny layers timed for the fixed time per layer
ALL_REDUCE_WIDTH = 512  # the products between the all-reduces timed
TINY_MODEL = embedded_model()


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def layer_products(width: int) -> list[tuple[int, int]]:
    """The (in, out) weight shapes of the decoder layer timed at hidden width `width`: q and
    o [width, width], k and v [width, width / 4], gate and up [width, 3 width], down
    [3 width, width]."""
    return [(width, width), (width, width // 4), (width, width // 4), (width, width),
            (width, 3 * width), (width, 3 * width), (3 * width, width)]


def slow_dtype(dtype: str, platform_name: str) -> bool:
    """Products in `dtype` that are too slow here to time at every size."""
    return dtype == "bfloat16" and platform_name == "cpu"  # no fast bf16 products there


def matmul_widths(dtype: str, platform_name: str, quick: bool) -> tuple[int, ...]:
    """The hidden widths whose decoder-layer products are timed in `dtype`."""
    return (512,) if quick else (1024,) if slow_dtype(dtype, platform_name) else WIDTHS


def timed_shapes(platform_name: str = "cpu", quick: bool = False) -> dict[str, Any]:
    """Every shape `calibrate` times, by what it times: the one place that says what the
    calibration has seen, so a validation can keep to shapes it has not (bench/out_of_sample.py).
    Products are (in, out) weight shapes; KV blocks (block_size, kv_heads, head_dim)."""
    widths = sorted({w for d in ("float32", "bfloat16")
                     for w in matmul_widths(d, platform_name, quick)})
    square = SQUARE_QUICK if quick else SQUARE
    products = {s for w in widths for s in layer_products(w)}
    products |= {(square, square), (OVERHEAD_WIDTH, OVERHEAD_WIDTH),
                 (ALL_REDUCE_WIDTH, ALL_REDUCE_WIDTH)}
    from jaxserve.config import ModelConfig
    host = ModelConfig.load(TINY_MODEL / "config.json")
    return {"hidden_widths": sorted({*widths, OVERHEAD_WIDTH, ALL_REDUCE_WIDTH, host.hidden_size}),
            "products": sorted(products),
            "kv_blocks": [KV_BLOCK],
            "rows": list(ROWS[:3] if quick else ROWS),
            "host_time_model": {"hidden_size": host.hidden_size, "num_layers": host.num_layers,
                                "note": "only its host time is used (engine timers)"}}


def matmul_rates(dtype: str, width: int, rows: tuple[int, ...], weight_mib: int,
                 repeats: int) -> dict[int, float]:
    """FLOP/s of decoder layers' products at hidden width `width` (`layer_products`), as many
    layers as `weight_mib` MiB of weights hold, chained, by rows."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    shapes = layer_products(width)
    per_layer = sum(a * b for a, b in shapes)
    layers = max(1, weight_mib * 2**20 // (per_layer * dt.itemsize))
    rng = np.random.default_rng(0)
    weights = [[jax.device_put((rng.standard_normal(shape, np.float32)
                                / np.float32(np.sqrt(shape[0]))).astype(dt)) for shape in shapes]
               for _ in range(layers)]

    @jax.jit
    def chain(x, weights):
        for q, k, v, o, gate, up, down in weights:
            kv = jnp.tile(x @ k + x @ v, (1, 4))
            x = x + (x @ q + kv) @ o
            x = x + (jax.nn.silu(x @ gate) * (x @ up)) @ down
        return x

    out = {}
    for r in rows:
        x = jax.device_put(rng.standard_normal((r, width), np.float32).astype(dt))
        seconds = best_time(lambda: chain(x, weights).block_until_ready(), repeats)
        out[r] = 2 * r * per_layer * layers / seconds
    return out


def square_matmul_rate(dtype: str, n: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    a = jax.device_put(rng.standard_normal((n, n), np.float32).astype(jnp.dtype(dtype)))
    f = jax.jit(jnp.dot)
    return 2 * n**3 / best_time(lambda: f(a, a).block_until_ready(), repeats)


def read_bandwidth(mib: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.device_put(np.ones(mib * 2**20 // 4, np.float32))
    f = jax.jit(jnp.sum)
    return a.nbytes / best_time(lambda: f(a).block_until_ready(), repeats)


def kv_read_bandwidth(mib: int, repeats: int) -> float:
    """Bytes/s gathering random blocks out of a KV pool of `mib` MiB and reducing them."""
    import jax
    import jax.numpy as jnp

    block_size, kv_heads, head_dim = KV_BLOCK
    per_block = block_size * kv_heads * head_dim * 4
    blocks = mib * 2**20 // per_block
    pool = jax.device_put(np.ones((blocks, block_size, kv_heads, head_dim), np.float32))
    table = jax.device_put(np.random.default_rng(2).permutation(blocks).astype(np.int32))
    f = jax.jit(lambda pool, table: jnp.sum(jnp.take(pool, table, axis=0), axis=(0, 1)))
    return pool.nbytes / best_time(lambda: f(pool, table).block_until_ready(), repeats)


def layer_overhead(repeats: int, layers: int = 32, width: int = OVERHEAD_WIDTH) -> float:
    """Seconds per decoder layer that do not depend on its size: a chain of `layers` tiny
    layers with a decoder layer's kinds of ops (norm, projections, activation, residual) on
    one row, where FLOPs and bytes are negligible."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    w = jax.device_put(rng.standard_normal((layers, 4, width, width), np.float32) / width)

    @jax.jit
    def chain(x, w):
        for i in range(layers):
            h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            q, k = h @ w[i, 0], h @ w[i, 1]
            x = x + (jax.nn.silu(q) * k) @ w[i, 2]
            x = x + jnp.tanh(x @ w[i, 3])
        return x

    x = jax.device_put(np.ones((1, width), np.float32))
    return best_time(lambda: chain(x, w).block_until_ready(), repeats) / layers


def all_reduce_link(repeats: int, memory_bandwidth: float, width: int = ALL_REDUCE_WIDTH,
                    layers: int = 8) -> Link | None:
    """Latency and bandwidth of an all-reduce over two devices, as the engine's steps meet it:
    between products (`layers` of x = psum(x @ w) in one program), less the same program
    without the all-reduces. Fitted at two message sizes; when the larger message is not
    measurably slower, the bandwidth is the memory's (simulated devices share it). None with
    one device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    if jax.device_count() < 2:
        return None
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    w = jax.device_put(np.random.default_rng(3).standard_normal((2 * layers, width, width),
                                                                np.float32) / width)

    def program(reduce: bool):
        def body(x, w):
            for i in range(layers):
                x = x @ w[i]
                x = jax.lax.psum(x, "x") if reduce else x + 1.0
            return x
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("x")), out_specs=P(),
                                     check_vma=False))

    with_reduce, without = program(True), program(False)
    per_call = {}
    for rows in (8, 512):
        x = jnp.ones((rows, width), jnp.float32)
        t_with = best_time(lambda: with_reduce(x, w).block_until_ready(), repeats)
        t_without = best_time(lambda: without(x, w).block_until_ready(), repeats)
        per_call[rows * width * 4] = max(t_with - t_without, 1e-7) / layers
    (s1, t1), (s2, t2) = sorted(per_call.items())
    # ring all-reduce over 2 devices: nbytes / bandwidth + 2 latency (collectives.py)
    grew = t2 > 1.05 * t1
    bandwidth = (s2 - s1) / (t2 - t1) if grew else memory_bandwidth
    latency = max((t1 - s1 / bandwidth) / 2, 0.0)
    return Link(bandwidth, latency, 1.0, None if grew else
                "the all-reduce time did not grow with its size: the memory bandwidth stands "
                "in for the link's (latency measured)")


def tp_layer_programs(width: int, intermediate: int, rows: int, layers: int) -> dict[
        str, tuple[Callable, Any, Any]]:
    """`layers` decoder layers' products (q and o [width, width], gate+up [width,
    2 intermediate], down [intermediate, width]) three ways, each as (program, x, weights):
    split over two devices as the tp rules split them (q, gate+up by columns; o, down by rows),
    with the two all-reduces per layer the engine runs (after o and after down); the same split
    with each all-reduce replaced by a local op; and whole on one device."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if jax.device_count() < 2:
        raise ValueError("the TP layer programs need two devices")
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    rng = np.random.default_rng(5)
    shapes = ((width, width), (width, width), (width, 2 * intermediate), (intermediate, width))
    specs = (P(None, "x"), P("x", None), P(None, "x"), P("x", None))
    weights = [[rng.standard_normal(s, np.float32) / np.float32(np.sqrt(s[0])) for s in shapes]
               for _ in range(layers)]
    # gate and up side by side, so that splitting their columns gives each device its halves
    for layer in weights:
        g, u = np.split(layer[2], 2, axis=1)
        layer[2] = np.concatenate([np.concatenate(p, axis=1) for p in zip(
            np.split(g, 2, axis=1), np.split(u, 2, axis=1))], axis=1)

    def body(combine):  # combine: what becomes of a partial sum
        def layers_of(x, weights):
            for q, o, gate_up, down in weights:
                x = x + combine((x @ q) @ o)
                g = (x @ gate_up).reshape(rows, -1, 2, intermediate // 2)  # [.., gate/up, ..]
                x = x + combine((jax.nn.silu(g[:, :, 0]) * g[:, :, 1]).reshape(rows, -1) @ down)
            return x
        return layers_of

    split = [[jax.device_put(w, NamedSharding(mesh, s)) for w, s in zip(layer, specs)]
             for layer in weights]
    whole = [[jax.device_put(w, jax.devices()[0]) for w in layer] for layer in weights]
    x = np.ones((rows, width), np.float32)
    tp = lambda combine: jax.jit(jax.shard_map(  # noqa: E731
        body(combine), mesh=mesh, in_specs=(P(), [list(specs)] * layers), out_specs=P(),
        check_vma=False))
    replicated = jax.device_put(x, NamedSharding(mesh, P()))
    return {"tp2_with_all_reduces": (tp(lambda y: jax.lax.psum(y, "x")), replicated, split),
            "tp2_all_reduces_replaced": (tp(lambda y: y * 1.0001), replicated, split),
            "one_device": (jax.jit(body(lambda y: y)), jax.device_put(x, jax.devices()[0]),
                           whole)}


def tp_layer_all_reduces(width: int, intermediate: int, rows: int, layers: int,
                         repeats: int) -> dict[str, float]:
    """Where a TP=2 step's time goes on two devices (`tp_layer_programs`): seconds per program,
    the best of `repeats` runs, the three interleaved so each meets the same load (medians
    kept too); the cost of one all-reduce, and the split products over the whole ones."""
    programs = tp_layer_programs(width, intermediate, rows, layers)
    times: dict[str, list[float]] = {name: [] for name in programs}
    for f, x, w in programs.values():
        f(x, w).block_until_ready()
    for _ in range(repeats):
        for name, (f, x, w) in programs.items():
            t0 = time.perf_counter()
            f(x, w).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    out: dict[str, float] = {}
    for name, ts in times.items():
        out[name] = min(ts)  # other work only ever adds time
        out[name + "_median"] = float(np.median(ts))
    out["all_reduces"] = 2 * layers
    out["seconds_per_all_reduce"] = (out["tp2_with_all_reduces"]
                                     - out["tp2_all_reduces_replaced"]) / (2 * layers)
    out["split_over_one_device"] = out["tp2_all_reduces_replaced"] / out["one_device"]
    out["all_reduce_bytes"] = rows * width * 4
    return out


def host_overhead(model_dir: Path, batches: tuple[int, int], new_tokens: int) -> tuple[
        HostOverhead, dict[str, Any]]:
    """Host seconds per engine step (schedule + dispatch + process), at two batch sizes."""
    from jaxserve import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=max(batches))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    per_step = {}
    for b in batches:
        prompts = [[5 + i] * 16 for i in range(b)]
        llm.generate(prompts, params, use_tqdm=False)  # compiles this batch's shapes
        before = llm.stats()
        llm.generate(prompts, params, use_tqdm=False)
        after = llm.stats()
        host = sum(after.get(k, 0) - before.get(k, 0)
                   for k in ("schedule_s", "dispatch_s", "process_s"))
        per_step[b] = host / (after["steps"] - before["steps"])
    (b1, h1), (b2, h2) = sorted(per_step.items())
    per_seq = max((h2 - h1) / (b2 - b1), 0.0)
    return (HostOverhead(max(h1 - per_seq * b1, 0.0), per_seq),
            {f"host_s_per_step_at_batch_{b}": h for b, h in per_step.items()})


def _memory_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def calibrate(name: str = "cpu-local", quick: bool = False,
              model_dir: Path = TINY_MODEL, progress: Callable[[str], None] = print) -> Hardware:
    """Measure this machine's devices; `quick`: small sizes and few repeats (seconds, rough)."""
    import jax

    repeats = 2 if quick else 5
    rows = ROWS[:3] if quick else ROWS
    devices = jax.devices()
    platform_name = devices[0].platform
    progress(f"calibrating {len(devices)} {platform_name} device(s): {cpu_model()}")
    peak, curves, measured = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        slow = slow_dtype(dtype, platform_name)
        rows_here = rows[:2] if slow else rows
        mib = 4 if quick else 64 if slow else 256
        rates = {w: matmul_rates(dtype, w, rows_here, mib, repeats)
                 for w in matmul_widths(dtype, platform_name, quick)}
        square = square_matmul_rate(dtype, SQUARE_QUICK if quick else SQUARE, repeats)
        peak[dtype] = max(square, *(x for r in rates.values() for x in r.values()))
        curves[dtype] = {w: tuple((r, round(x / peak[dtype], 4)) for r, x in by_rows.items())
                         for w, by_rows in rates.items()}
        measured[f"matmul_{dtype}"] = {"flops_per_s_by_width_and_rows": rates,
                                       "square_flops_per_s": square}
        progress(f"  {dtype}: peak {peak[dtype] / 1e9:.1f} GFLOP/s; GFLOP/s by width, rows: "
                 + "; ".join(f"{w}: " + ", ".join(f"{r}: {x / 1e9:.1f}" for r, x in rs.items())
                             for w, rs in rates.items()))
    bandwidth = read_bandwidth(32 if quick else 512, repeats)
    kv = kv_read_bandwidth(8 if quick else 128, repeats)
    progress(f"  read bandwidth {bandwidth / 1e9:.1f} GB/s; paged KV reads {kv / 1e9:.1f} GB/s")
    per_layer = layer_overhead(repeats)
    progress(f"  fixed time per layer {per_layer * 1e6:.1f} us")
    link = all_reduce_link(repeats, bandwidth)
    if link is not None:
        progress(f"  all-reduce over 2 devices: {link.bandwidth / 1e9:.2f} GB/s, "
                 f"{link.latency * 1e6:.1f} us latency")
    host, host_measured = host_overhead(model_dir, (1, 4) if quick else (1, 8),
                                        8 if quick else 48)
    progress(f"  host per step {host.per_step_s * 1e3:.3f} ms + {host.per_sequence_s * 1e6:.1f} "
             f"us per sequence")
    measured.update(host_measured, read_bytes_per_s=bandwidth, kv_read_bytes_per_s=kv,
                    layer_overhead_s=per_layer,
                    date=datetime.date.today().isoformat(), cpu=cpu_model(),
                    jax=jax.__version__, devices=len(devices), platform=platform_name,
                    quick=quick)
    simulated = platform_name == "cpu" and len(devices) > 1
    # A link calibrate had nothing to time is written as a stand-in, flagged unknown
    between_hosts = "one host: the within-host link stands in"
    if link is None:
        link = Link(bandwidth, 0.0, 1.0, "one device: its memory bandwidth with zero latency "
                                         "stands in")
        between_hosts = link.unknown
    inter_host = Link(link.bandwidth, link.latency, link.efficiency, between_hosts)
    return Hardware(
        name=name, description=f"{platform_name} on this machine ({cpu_model()}), "
        f"{len(devices)} device(s), measured by jaxserve calibrate",
        peak_flops=peak, matmul_efficiency=curves, memory_bandwidth=bandwidth,
        memory_capacity=_memory_available() / len(devices) if platform_name == "cpu"
        else float(devices[0].memory_stats().get("bytes_limit", 0)),
        intra_host=link, inter_host=inter_host, host=host, devices_per_host=len(devices),
        bandwidth_efficiency=1.0, attention_efficiency=min(kv / bandwidth, 1.0),
        attention_query_block=16, layer_overhead_s=per_layer,
        memory_fraction=0.25 if platform_name == "cpu" else 0.9,
        shared_compute=simulated, price_per_hour=None,
        sources=(f"measured by `jaxserve calibrate` on {measured['date']}",),
        measured=_plain(measured))


def _plain(x):
    """Numbers and strings only (for YAML)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
