"""KV bytes per device and the bare decode step against context length: a GQA Llama, DeepSeek MLA
with the latent whole on every device (attention="mla") and TPLA (the latent split over tp), at
tp = 1, 2, 4 (`--tp`) on simulated CPU devices.

    python scripts/bench_tpla.py --part contexts --json benchmarks/tpla_contexts.json
    python scripts/bench_tpla.py --part contexts --quick     # contexts 64 and 256, tp 2 only

Nothing is prefilled: each engine's KV pool is filled with random values (`random_pool`) and
`batch` stand-in sequences' block tables point into it (`bench/steps.decode_step_inputs`), so a
16k-token context costs pool memory, not 16k tokens of prefill. The compiled decode step reads
each sequence's whole context from the pool (and writes its one new token); it is timed alone,
without the host loop (`bench/timing.readback_loop`, the engine's two steps in flight).

The two models (`SHAPES`; float32, random weights) have the same width everywhere but the cache:
hidden 256, 8 query heads of 32 value dims, the same dense SwiGLU of 512, 2 layers.
- gqa: a Llama with 4 KV heads of 32: 2 x 4 x 32 = 256 values per token and layer, split by
  head over tp.
- mla: DeepSeek latent attention with kv_lora_rank 128 and a rope key of 16 (heads' qk 32 + 16,
  v 32): 144 values per token and layer; whole on every device under "mla", the latent split
  (the rope key whole) under "tpla". As in DeepSeek-V3 (512 + 64 against Llama-3-70B's 2 x 8 x
  128), the latent is smaller than GQA's K/V on one device but larger once TP splits GQA's heads.

Per row: KV bytes per token per device and for the whole batch's context per device, the step
(ms, median of `REPEATS` loops), and the byte floor: what all devices together read per step (the
weights' and the KV contexts' device copies, summed, as simulated devices share one memory bus)
over the read bandwidth measured in the same run (`bench/floors.read_bandwidth`, numpy over 2
threads). What CPU cannot show: the simulated devices run on the same 2 cores and one memory bus,
so a device reading fewer bytes need not make the step faster; replicated MLA at tp=4 reads its
latent 4 times over the same bus. On accelerators each device has its own bandwidth and the
per-device bytes are what bounds the step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from jaxserve.bench.report import write_json

COMMON = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
              max_position_embeddings=16384 + 64)
SHAPES = {
    "gqa": dict(COMMON, family="llama", num_kv_heads=4, head_dim=32),
    # every layer dense (mlp_only_layers): the MLP is the Llama's, only attention differs
    "mla": dict(COMMON, family="deepseek_v2", num_kv_heads=8, head_dim=32 + 16, num_experts=2,
                num_experts_per_tok=1, moe_intermediate_size=8, mlp_only_layers=(0, 1),
                kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
}
BLOCK_SIZE = 16
REPEATS = 3
BANDWIDTH_MIB = 256


def random_pool(pool, seed: int = 0):
    """A KV pool of the same buffers, shapes, dtypes and shardings, holding random normal values
    (what a step reads must be there: zero pages could be read faster than real ones)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(pool)

    def fill(key):
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype)
                                  for k, a in zip(keys, leaves)])

    return jax.jit(fill, out_shardings=jax.tree.map(lambda a: a.sharding, pool))(
        jax.random.key(seed))


def device_bytes(arrays) -> int:
    """Bytes of `arrays` on all devices together (a replicated array counts once per device)."""
    import jax

    return sum(s.data.nbytes for a in jax.tree.leaves(arrays) for s in a.addressable_shards)


def engine_rows(llm, batch: int, contexts: list[int], iters: int, bandwidth: float) -> list[dict]:
    """One row per context length for this engine, its pool filled with random values first."""
    from jaxserve.bench.steps import decode_step_inputs, warm_dispatch
    from jaxserve.bench.timing import median, readback_loop
    from jaxserve.bench.tpla import greedy
    from jaxserve.engine import sizing

    llm.runner.kv = random_pool(llm.runner.kv)
    per_token = sizing.bytes_per_block_per_device(llm.cache_spec, BLOCK_SIZE,
                                                  llm.layout) / BLOCK_SIZE
    devices = llm.layout.num_devices
    weights = device_bytes(llm.runner.param_leaves)
    rows = []
    for context in contexts:
        dispatch = warm_dispatch(llm, decode_step_inputs(llm, batch, context, 1, greedy(8)))
        ms = median([readback_loop(dispatch, iters)["ms_per_step"] for _ in range(REPEATS)])
        kv_per_device = per_token * batch * context
        read = weights + kv_per_device * devices
        rows.append({"context": context, "kv_bytes_per_token_per_device": per_token,
                     "kv_bytes_per_device": kv_per_device, "bytes_read_per_step": read,
                     "step_ms": ms, "byte_floor_ms": read / bandwidth * 1e3})
    return rows


def configurations(tps: list[int]) -> list[tuple[str, str, int]]:
    """(model, attention, tp) of every engine timed: GQA and exact MLA at each tp, TPLA at each
    tp > 1 (at tp=1 it is MLA)."""
    return ([("gqa", "mla", t) for t in tps] + [("mla", "mla", t) for t in tps]
            + [("mla", "tpla", t) for t in tps if t > 1])


def main(args) -> dict:
    """args: `bench.tpla.parse_args`'s, with --part contexts."""
    from jaxserve import LLM
    from jaxserve.bench.floors import read_bandwidth
    from jaxserve.bench.models import save_random_model

    batch, contexts, longest = args.batch, args.contexts, max(args.contexts)
    root = Path(tempfile.mkdtemp(prefix="jaxserve-tpla-contexts-"))
    layers = 1 if args.quick else COMMON["num_layers"]
    for name, shape in SHAPES.items():
        shape = {**shape, "num_layers": layers, "max_position_embeddings": longest + 64}
        if "mlp_only_layers" in shape:
            shape["mlp_only_layers"] = tuple(range(layers))
        save_random_model(shape, root / name)
    bandwidth = read_bandwidth(BANDWIDTH_MIB << 20, threads=2, repeats=3)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    blocks = batch * -(-(longest + 1) // BLOCK_SIZE) + 2
    rows = []
    for model, attention, tp in configurations(args.tp):
        # no MoE layer runs: a fixed threshold spares the crossover search over experts
        moe = dict(moe_auto_threshold=1) if model == "mla" else {}
        llm = LLM(root / model, mesh=f"tp={tp}" if tp > 1 else None, attention=attention,
                  kv_blocks=blocks, max_num_seqs=batch, max_model_len=longest + 16,
                  block_size=BLOCK_SIZE, compilation="on_use", **moe)
        for r in engine_rows(llm, batch, contexts, args.iters, bandwidth):
            rows.append({"model": model, "attention": attention, "tp": tp, **r})
            print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                             for v in rows[-1].values()), flush=True)
        del llm
    out = {"batch": batch, "contexts": contexts, "read_bandwidth_Bps": bandwidth,
           "shapes": {k: {f: v for f, v in s.items()} for k, s in SHAPES.items()},
           "num_layers": layers, "rows": rows}
    if args.json:
        write_json(args.json, out)
    return out
