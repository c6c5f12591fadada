"""CPU decode levers side by side: each weight format's decode products, then the engine's own
decode step, against the byte floor of the weights the step reads.

Two measurements, each with every lever in one run, interleaved repeat by repeat (the machine is
shared: only ratios measured together compare):
- the product stack: the model's own weights (`build_model`, so each lever's declaration and
  `ops.quant.project` are what the engine runs) through exactly a decode step's products, layers
  unrolled, no attention;
- the engine step: `LLM(model, dtype=..., quantization=...)`'s compiled decode step
  (`offline_parts.time_decode`, context 192).
"float32 in_out" / "float32 out_in" store the float weights as declared or transposed
(`ops.quant.float_weight_layout`; "float32" is the platform's choice, with its float32 product,
`ops.quant.float_product`); "float32 xla-dot" is XLA's dot over the declared layout whatever the
platform's choice (on a CPU whose choice is the float32 kernel: the kernel against XLA), and
"float32 f32-kernel" the float32 kernel whatever the platform's choice (on a CPU whose choice is
XLA's dot: the kernel against XLA). Bytes are the parameters
the products read (int8 values + float32 scales; the LM head stays
float32 unless `quantize_embeddings`); the floor is bytes / the read bandwidth measured here.

    python scripts/bench_products.py --json benchmarks/bench_products-DATE-cpu.json
    python scripts/bench_products.py --quick        # a check: tiny model, one repeat
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

from jaxserve.bench.report import fmt, json_default, print_table

# lever -> (dtype, quantization, quantize_embeddings, int8 product or None (the platform's),
# float weight layout); "+head": the LM head quantized too; "auto": the platform's layout
# (`ops.quant.float_weight_layout`); "xla_dot" / "f32_kernel": float products by XLA's dot / by
# the float32 kernel, whatever the platform's choice; "xla_attention":
# decode rows attend in XLA's loop, not the CPU kernel (`ops.attention._decode_kernel_applies`)
LEVERS = {
    "float32": ("float32", None, False, None, "auto"),
    "float32 xla-dot": ("float32", None, False, "xla_dot", "in_out"),
    "float32 f32-kernel": ("float32", None, False, "f32_kernel", "out_in"),
    "float32 xla-attention": ("float32", None, False, "xla_attention", "auto"),
    "float32 in_out": ("float32", None, False, None, "in_out"),
    "float32 out_in": ("float32", None, False, None, "out_in"),
    "bfloat16": ("bfloat16", None, False, None, "auto"),
    "int8 dequantize-then-dot": ("float32", "int8", False, "dequantize", "auto"),
    "int8 int8-dot": ("float32", "int8", False, "int8_dot", "auto"),
    "int8-g32 int8-dot": ("float32", "int8-g32", False, "int8_dot", "auto"),
    "int8+head int8-dot": ("float32", "int8", True, "int8_dot", "auto"),
}
# Engine levers: the platform's own choice of product (`ops.quant.int8_product`).
ENGINE_LEVERS = ("float32", "float32 xla-dot", "float32 f32-kernel", "float32 xla-attention",
                 "float32 in_out", "float32 out_in", "bfloat16", "int8 int8-dot",
                 "int8-g32 int8-dot", "int8+head int8-dot")
SHAPE_55M = dict(family="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                 num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                 max_position_embeddings=2048)
SHAPE_TINY = dict(SHAPE_55M, vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_layers=2, head_dim=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes (comma separated)")
    p.add_argument("--repeats", type=int, default=3, help="timed loops per lever and batch")
    p.add_argument("--iters", type=int, default=20, help="steps per timed loop")
    p.add_argument("--levers", default=",".join(LEVERS), help="which levers (comma separated)")
    p.add_argument("--no-engine", action="store_true", help="product stacks only")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, 3 steps")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.levers = [name.strip() for name in args.levers.split(",")]
    unknown = [name for name in args.levers if name not in LEVERS]
    if unknown:
        p.error(f"unknown lever(s) {unknown}; choose from {list(LEVERS)}")
    if args.quick:
        args.repeats, args.iters, args.batches = 1, 3, [1, 2]
    return args


@contextlib.contextmanager
def float_products_of(lever: str):
    """While tracing `lever`'s programs: float32 products by XLA's dot or by the float32 kernel,
    or decode attention in XLA's loop, where it asks for it."""
    from jaxserve.ops import attention, cpu_kernels, quant

    def kernel(platform: str) -> str:
        if not cpu_kernels.available():
            raise RuntimeError(f"lever {lever!r} needs the CPU kernels, which did not build here")
        return "f32_kernel"

    owner, name, value = {"xla_dot": (quant, "float_product", lambda platform: "xla_dot"),
                          "f32_kernel": (quant, "float_product", kernel),
                          "xla_attention": (attention, "_decode_kernel_applies",
                                            lambda *args: False)}.get(LEVERS[lever][3],
                                                                       (None, None, None))
    if owner is None:
        yield
        return
    chosen = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, chosen)


def lever_config(shape: dict, lever: str):
    import jax

    from jaxserve.config import ModelConfig
    from jaxserve.ops.quant import float_weight_layout
    _, quantization, embeddings, _, layout = LEVERS[lever]
    if layout == "auto":
        layout = float_weight_layout(jax.default_backend())
    return ModelConfig(**shape, quantization=quantization, quantize_embeddings=embeddings,
                       weight_layout=layout)


def product_stack(lever: str, shape: dict):
    """(jitted step(state, x) -> (x, ids), its state, bytes its products read) of `lever`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxserve.models import build_model
    from jaxserve.ops.quant import project

    dtype, _, _, product, _ = LEVERS[lever]
    config = lever_config(shape, lever)
    model = build_model(config, jnp.dtype(dtype))
    graphdef, state = nnx.split(model)
    kv, group = config.num_kv_heads, config.num_heads // config.num_kv_heads

    # the int8 product, for the int8 levers only
    product = None if product in ("xla_dot", "f32_kernel", "xla_attention") else product

    @jax.jit
    def step(state, x):
        with float_products_of(lever):
            return stack(state, x)

    def stack(state, x):
        m = nnx.merge(graphdef, state)
        for layer in m.layers:
            a, f = layer.attn, layer.mlp
            q, k, v = (project(x, w, product) for w in (a.q_proj, a.k_proj, a.v_proj))
            t = x.shape[0]
            mixed = (q.reshape(t, kv, group, -1) + (k + v).reshape(t, kv, 1, -1)).reshape(t, -1)
            x = x + project(mixed, a.o_proj, product)
            x = x + project(jax.nn.silu(project(x, f.gate_proj, product))
                            * project(x, f.up_proj, product), f.down_proj, product)
        logits = project(x, m.lm_head, product)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return x.astype(dtype), jnp.argmax(logits, axis=-1)

    return step, state, weight_bytes(lever, shape)


def weight_bytes(lever: str, shape: dict) -> int:
    """Bytes of the parameters a decode step's products read (not the embedding, not norms)."""
    import math

    import jax.numpy as jnp
    from flax import nnx

    from jaxserve.checkpoint import flat_params
    from jaxserve.models import abstract_model
    params = flat_params(nnx.state(abstract_model(lever_config(shape, lever),
                                                  jnp.dtype(LEVERS[lever][0]))))
    return sum(math.prod(a.shape) * a.dtype.itemsize for name, a in params.items()
               if "norm" not in name and not name.startswith("embed/"))


def time_stack(step, state, batch: int, hidden: int, dtype: str, iters: int) -> float:
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.bench.timing import readback_loop
    x = {"x": jnp.asarray(np.random.default_rng(0).standard_normal((batch, hidden)), dtype)}

    def dispatch():
        x["x"], ids = step(state, x["x"])
        return ids
    for _ in range(2):
        np.asarray(dispatch())
    return readback_loop(dispatch, iters)["ms_per_step"]


def run_stacks(args, shape: dict, bandwidth: float) -> dict:
    from jaxserve.bench.timing import median
    stacks = {lever: product_stack(lever, shape) for lever in args.levers}
    times = {lever: {b: [] for b in args.batches} for lever in stacks}
    for _ in range(args.repeats):
        for b in args.batches:
            for lever, (step, state, _) in stacks.items():
                times[lever][b].append(time_stack(step, state, b, shape["hidden_size"],
                                                  LEVERS[lever][0], args.iters))
    return summarize({lever: (stacks[lever][2], {b: median(ts) for b, ts in per.items()})
                      for lever, per in times.items()}, bandwidth, "product stack")


def run_engine(args, shape: dict, bandwidth: float) -> dict:
    from jaxserve import LLM
    from jaxserve.bench.models import save_random_model
    from jaxserve.bench.offline_parts import time_decode
    from jaxserve.bench.timing import median

    levers = [lever for lever in ENGINE_LEVERS if lever in args.levers]
    with tempfile.TemporaryDirectory() as tmp:
        save_random_model(shape, Path(tmp))
        llms = {}
        for lever in levers:
            dtype, quantization, embeddings, _, layout = LEVERS[lever]
            llms[lever] = LLM(tmp, dtype=dtype, quantization=quantization or "none",
                              quantize_embeddings=embeddings, weight_layout=layout,
                              max_num_seqs=max(args.batches),
                              max_model_len=512,
                              compilation="on_use")  # traced in `time_decode`
        times = {lever: {b: [] for b in args.batches} for lever in levers}
        for _ in range(args.repeats):
            for b in args.batches:
                for lever, llm in llms.items():
                    with float_products_of(lever):
                        times[lever][b] += [r["ms_per_step"]
                                            for r in time_decode(llm, b, args.iters)]
    return summarize({lever: (weight_bytes(lever, shape), {b: median(ts) for b, ts in per.items()})
                      for lever, per in times.items()}, bandwidth, "engine decode step")


def summarize(results: dict, bandwidth: float, what: str) -> dict:
    """{lever: (bytes, {batch: ms})} -> printed table rows and the JSON record."""
    base = results.get("float32")
    out, rows = {}, []
    for lever, (nbytes, per) in results.items():
        floor = nbytes / bandwidth * 1e3
        out[lever] = {"weight_bytes": nbytes, "floor_ms": floor, "batches": {}}
        for b, ms in per.items():
            rec = {"ms": ms, "GBps": nbytes / (ms * 1e-3) / 1e9, "fraction_of_floor": floor / ms,
                   "float32_over_this": base[1][b] / ms if base else None}
            out[lever]["batches"][str(b)] = rec
        cells = "; ".join(f"b{b} {fmt(r['ms'], '.2f')} ms {fmt(r['GBps'])} GB/s "
                          f"{fmt(r['fraction_of_floor'], '.2f')} of floor"
                          + (f" {fmt(r['float32_over_this'], '.2f', 'x')} f32"
                             if r["float32_over_this"] else "")
                          for b, r in out[lever]["batches"].items())
        rows.append((f"{lever} ({nbytes / 1e6:.1f} MB, floor {floor:.2f} ms)", cells))
    print_table(f"{what} (bandwidth {bandwidth / 1e9:.1f} GB/s)", rows)
    return out


def main(args) -> dict:
    from jaxserve.bench.floors import read_bandwidth
    from jaxserve.bench.machine import machine_info

    shape = SHAPE_TINY if args.quick else SHAPE_55M
    bandwidth = read_bandwidth(256 * 2**20 if not args.quick else 16 * 2**20, 2,
                               max(args.repeats, 2))
    result = {"machine": machine_info(), "shape": shape, "bandwidth_GBps": bandwidth / 1e9,
              "batches": args.batches, "repeats": args.repeats, "iters": args.iters,
              "product_stack": run_stacks(args, shape, bandwidth)}
    if not args.no_engine:
        result["engine_step"] = run_engine(args, shape, bandwidth)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=json_default))
    return result
