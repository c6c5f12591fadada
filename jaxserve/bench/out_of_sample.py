"""The performance model on shapes `jaxserve calibrate` did not time: `validate_perf --suite
out-of-sample`.

Calibration times decoder layers at hidden width 512, 1024 and 2048 (`calibrate.timed_shapes`);
the in-sample suite's 55M model has width 512 and nearly the timed layer, so its decode rows
mostly re-measure the calibration. The models here each differ from everything calibration
timed (hidden width, every product's (in, out) shape, the KV block's (kv_heads, head_dim);
`overlaps` says where a model would not, and tests/test_validate_perf.py keeps the suite clear
of them): other widths (256, 768, 1536), MoE, GQA ratios 1 to 6 and long context (2k-4k tokens
in the KV). The matmul rates they are predicted with come from the nearest calibrated width
class; nothing about their own shapes was measured before the run.

Each row is one compiled step of the engine, timed as the engine runs it: decode steps through
the engine's readback loop, one prefill chunk (after `cached` tokens already in the pool) as a
step of its own. Predicted: the model's device time for that step (no host term: none runs
here). Layer counts are small (2-4): what matters is the shapes, and the run must stay short.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class ValidationModel:
    """A random model of `shape` (ModelConfig fields) and the steps timed on it: decodes of
    (batch, context) and prefill chunks of (cached, tokens)."""

    name: str
    what: str  # what it tests that calibration did not time
    shape: dict[str, Any]
    decodes: tuple[tuple[int, int], ...]
    prefills: tuple[tuple[int, int], ...]


def _llama(**fields) -> dict[str, Any]:
    return dict(family="llama", vocab_size=8192, max_position_embeddings=4352,
                eos_token_ids=(2,), **fields)


SUITE = (
    ValidationModel("w256-mha", "hidden 256, MLP 3.5x, no GQA (1 q head per kv head)",
                    _llama(hidden_size=256, intermediate_size=896, num_layers=4, num_heads=4,
                           num_kv_heads=4, head_dim=64),
                    decodes=((1, 128), (16, 128)), prefills=((0, 256),)),
    ValidationModel("w768-gqa3-long", "hidden 768, GQA 3, long context (2k-4k tokens of KV)",
                    _llama(hidden_size=768, intermediate_size=2048, num_layers=4, num_heads=12,
                           num_kv_heads=4, head_dim=64),
                    decodes=((1, 128), (16, 128), (1, 4096), (16, 2048)),
                    prefills=((0, 256), (2048, 256), (3840, 256))),
    ValidationModel("w1536-gqa6", "hidden 1536, head_dim 128, GQA 6, qk-norm (Qwen3)",
                    dict(_llama(hidden_size=1536, intermediate_size=4096, num_layers=2,
                                num_heads=12, num_kv_heads=2, head_dim=128),
                         family="qwen3", qk_norm=True),
                    decodes=((1, 128), (16, 128)), prefills=((0, 256),)),
    ValidationModel("moe-w384", "MoE: 8 experts of width 512, top 2, hidden 384, GQA 2",
                    dict(_llama(hidden_size=384, intermediate_size=1024, num_layers=2,
                                num_heads=6, num_kv_heads=3, head_dim=64),
                         family="qwen3_moe", qk_norm=True, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=512, norm_topk_prob=True),
                    decodes=((1, 128), (16, 128)), prefills=((0, 256),)),
)
# --quick: two tiny models (the suite's plumbing, one model after another, in seconds)
QUICK_SUITE = (
    ValidationModel("tiny-w96", "hidden 96 (plumbing check, not a validation)",
                    dict(family="llama", vocab_size=256, hidden_size=96, intermediate_size=160,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=48,
                         max_position_embeddings=256, eos_token_ids=(2,)),
                    decodes=((2, 48),), prefills=((16, 32),)),
    ValidationModel("tiny-w80", "hidden 80 (plumbing check, not a validation)",
                    dict(family="llama", vocab_size=256, hidden_size=80, intermediate_size=96,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=40,
                         max_position_embeddings=256, eos_token_ids=(2,)),
                    decodes=((2, 48),), prefills=()),
)


def product_shapes(config) -> set[tuple[int, int]]:
    """The (in, out) weight shapes of every product a step of `config` runs: each parameter
    with a contracted axis, the contracted dims in, the rest (less the experts axis) out."""
    from jaxserve.perf.shapes import parameters

    out = set()
    for p in parameters(config).values():
        if not p.contracts:
            continue
        dims = [(a, d) for a, d in zip(p.axes, p.shape) if a != "experts"]
        out.add((math.prod(d for a, d in dims if a in p.contracts),
                 math.prod(d for a, d in dims if a not in p.contracts)))
    return out


def overlaps(config, timed: dict[str, Any]) -> list[str]:
    """What of `config`'s step calibration timed (`calibrate.timed_shapes()`): its hidden
    width, any product's (in, out) shape, its KV block's (kv_heads, head_dim). Empty: the
    model is out of sample."""
    found = []
    if config.hidden_size in timed["hidden_widths"]:
        found.append(f"hidden width {config.hidden_size}")
    products = {tuple(s) for s in timed["products"]}
    found += [f"product {s}" for s in sorted(product_shapes(config) & products)]
    kv = (config.num_kv_heads, config.head_dim)
    if kv in {tuple(b[1:]) for b in timed["kv_blocks"]}:
        found.append(f"KV block (kv_heads, head_dim) {kv}")
    return found


@dataclasses.dataclass
class Row:
    """One step to time: `measure()` -> seconds (one timed loop), and its prediction."""

    model: str
    part: str  # decode, prefill
    case: str
    measure: Callable[[], float]
    predicted: Any  # perf.step.StepTime
    detail: dict[str, Any]


def rows(models: tuple[ValidationModel, ...], hardware, iters: int,
         timed: dict[str, Any]) -> Iterator[Row]:
    """Each model built (random weights, float32), loaded on one device, and its steps; each
    row's detail says what of the model calibration timed (`timed`; nothing, for the suite)."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.bench.models import save_random_model
    from jaxserve.bench.steps import decode_step_inputs, prefill_step_inputs, warm_dispatch
    from jaxserve.bench.timing import readback_loop
    from jaxserve.perf.precision import Precision
    from jaxserve.perf.step import Chunk, Deployment, decode_chunk

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for m in models:
        with tempfile.TemporaryDirectory() as tmp:
            config = save_random_model(m.shape, Path(tmp) / m.name)
            tokens = max([b * c for b, c in m.decodes] + [c + n for c, n in m.prefills])
            llm = LLM(Path(tmp) / m.name, compilation="on_use",
                      max_num_seqs=max(b for b, _ in m.decodes), block_size=16,
                      kv_blocks=tokens // 16 + 8, max_model_len=config.max_position_embeddings)
            model = Deployment(config, None, "tp", hardware, Precision("float32"))
            detail = {"shape": {k: v for k, v in m.shape.items() if k != "eos_token_ids"},
                      "what": m.what, "calibration_overlap": overlaps(config, timed)}

            def timer(inputs, steps: int) -> Callable[[], float]:
                dispatch = warm_dispatch(llm, inputs)
                return lambda: readback_loop(dispatch, steps)["ms_per_step"] / 1e3

            for batch, context in m.decodes:
                yield Row(m.name, "decode", f"batch {batch}, context {context}",
                          timer(decode_step_inputs(llm, batch, context, 1, params), iters),
                          model.step([decode_chunk(context - 1, batch)]), detail)
            for cached, n in m.prefills:
                yield Row(m.name, "prefill", f"{n} tokens after {cached} cached",
                          timer(prefill_step_inputs(llm, cached, n, params), max(2, iters // 4)),
                          model.step([Chunk(cached, cached + n, 1, True)]), detail)
            del llm


def median_of(measure: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    samples = [measure() for _ in range(repeats)]
    return float(np.median(samples)), samples
