"""An `LLM` loaded and run as a user gets it, timed: load and warm-up facts, and `generate`
with the engine's decode steps recorded and its counters' growth."""

from __future__ import annotations

import time
from pathlib import Path

from jaxserve.bench.report import fmt, print_table, verdict
from jaxserve.bench.steps import StepRecorder, decode_window

WARMUP_TARGET_S = 30.0


def greedy(n: int):
    """Exactly n greedy tokens."""
    from jaxserve import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


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


def timed_generate(llm, prompts, params) -> tuple[dict, list[list[int]]]:
    """`llm.generate` timed: wall time, the counters' growth and the engine's decode ms per
    step (`decode_window`); and each request's tokens."""
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
