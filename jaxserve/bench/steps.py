"""The engine's own decode step, driven from outside, and probes on the engine loop.

`decode_step_inputs` builds a decode-only step with the engine's real step builder for
stand-in sequences (each its own slot and KV blocks), and `prefill_step_inputs` a step of one
prefill chunk, so a benchmark can time the compiled step without the scheduler. The probes wrap one engine method for the length of a run and
record what it did (steps and their timing, the scheduler's plans, where prefills ran)."""

from __future__ import annotations

import time
import types

import numpy as np


class StandInSequence:
    """The attributes `StepBuilder.build` reads from a decoding (or prefilling) sequence."""

    def __init__(self, slot: int, blocks: list[int], total_len: int, params, generated: int,
                 replica: int = 0):
        self.replica, self.slot, self.blocks, self.total_len = replica, slot, blocks, total_len
        self.params, self.seed, self.num_scheduled_outputs = params, slot, generated
        self.request = types.SimpleNamespace(prompt_ids=[5] * total_len)


def _check_pool(llm, sequences: int, blocks_each: int) -> None:
    from jaxserve.kv_cache import NULL_BLOCK

    if NULL_BLOCK + 1 + sequences * blocks_each > llm.runner.blocks_per_replica:
        raise ValueError(f"the KV pool ({llm.runner.blocks_per_replica} blocks per replica) is "
                         f"too small for {sequences} stand-in sequences of {blocks_each} blocks")


def decode_step_inputs(llm, batch: int, context: int, generated: int, params):
    """Decode-only step inputs for `batch` sequences per DP replica, `context` tokens each,
    `generated` of them outputs. params: one SamplingParams, or a function of the sequence's
    index in its replica."""
    from jaxserve.engine.scheduler import StepPlan
    from jaxserve.kv_cache import NULL_BLOCK

    nblk = -(-context // llm.runner.block_size)
    per_replica = llm.engine.config.max_num_seqs
    if batch > per_replica:
        raise ValueError(f"batch {batch} > the engine's max_num_seqs")
    _check_pool(llm, batch, nblk)
    params_of = params if callable(params) else (lambda i: params)
    first = NULL_BLOCK + 1
    seqs = [StandInSequence(r * per_replica + i,
                            list(range(first + i * nblk, first + (i + 1) * nblk)), context,
                            params_of(i), generated, replica=r)
            for r in range(llm.runner.num_replicas) for i in range(batch)]
    return llm.engine.builder.build(StepPlan([], seqs)).inputs


def prefill_step_inputs(llm, cached: int, length: int, params):
    """Inputs of a step that prefills positions cached .. cached + length - 1 of one stand-in
    sequence (on replica 0; the first `cached` positions are read from the pool as they are),
    its last token sampled."""
    from jaxserve.engine.scheduler import PrefillChunk, StepPlan
    from jaxserve.kv_cache import NULL_BLOCK

    nblk = -(-(cached + length) // llm.runner.block_size)
    _check_pool(llm, 1, nblk)
    seq = StandInSequence(0, list(range(NULL_BLOCK + 1, NULL_BLOCK + 1 + nblk)), cached + length,
                          params, 0)
    return llm.engine.builder.build(StepPlan([PrefillChunk(seq, cached, length, True)],
                                             [])).inputs


def warm_dispatch(llm, inputs):
    """A function dispatching the compiled step on `inputs` (its tokens), run 3 times first."""
    runner = llm.runner
    dispatch = lambda: runner.step(inputs).tokens  # noqa: E731
    for _ in range(3):
        np.asarray(dispatch())
    return dispatch


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


def record_plans(llm) -> list:
    """Wrap the scheduler so every planned step's chunks are recorded (as the performance
    model's Chunks); `del llm.engine.scheduler.schedule` ends the recording."""
    from jaxserve.perf.step import Chunk

    steps = []
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule

    def recording(can_preempt):
        plan = schedule(can_preempt)
        if not plan.empty:
            steps.append([Chunk(s.total_len - 1, s.total_len) for s in plan.decodes]
                         + [Chunk(c.start, c.start + c.length, 1, c.samples)
                            for c in plan.prefills])
        return plan

    scheduler.schedule = recording
    return steps


def track_placements(llm) -> list[int]:
    """Prefill tokens run per replica, counted as the engine commits its plans."""
    counts = [0] * llm.num_replicas
    scheduler = llm.engine.scheduler
    commit = scheduler.commit

    def counting_commit(plan):
        for chunk in plan.prefills:
            counts[chunk.seq.replica] += chunk.length
        commit(plan)

    scheduler.commit = counting_commit
    return counts
