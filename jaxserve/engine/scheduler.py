"""Continuous batching: which sequences run in the next step, and with how many tokens.

Policy (first come, first served):
1. Every running sequence past its prefill gets one decode token. If the KV pool has no block for
   it, the most recently admitted running sequence is preempted (blocks and slot freed, KV
   recomputed later) until it fits; a sequence never waits behind a younger one.
2. The remaining token budget goes to prefill chunks: first sequences already part-way through
   their prefill, then waiting sequences in arrival order (preempted ones first). A waiting
   sequence that does not fit stops admission (no overtaking), so nobody starves.
Requests are validated on arrival to fit the pool alone, so preemption always makes progress.

Preemption changes state that steps in flight refer to, so the scheduler only preempts when
the engine says nothing is in flight (`can_preempt`); otherwise it reports `needs_preemption` and
the engine drains first. Decisions depend only on the queue contents: deterministic.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxserve.engine.block_allocator import BlockAllocator, IdPool
from jaxserve.engine.sequence import Sequence, Status


@dataclasses.dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first position of the chunk
    length: int
    samples: bool  # the chunk ends the prefill: its last token yields an output token


@dataclasses.dataclass
class StepPlan:
    prefills: list[PrefillChunk]
    decodes: list[Sequence]
    needs_preemption: bool = False

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, blocks: BlockAllocator, slots: IdPool, max_num_batched_tokens: int,
                 max_prefill_chunk: int, max_prefill_rows: int):
        self.blocks = blocks
        self.slots = slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk
        self.max_prefill_rows = max_prefill_rows
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.done_scheduling for s in self.running)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the sequence's blocks cover its first num_tokens tokens."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        seq.blocks += self.blocks.allocate(need)
        return True

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks and slot (finished, aborted or preempted)."""
        self.blocks.free(seq.blocks)
        seq.blocks = []
        if seq.slot is not None:
            self.slots.free([seq.slot])
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)

    def finish(self, seq: Sequence) -> None:
        self.release(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def preempt_youngest(self) -> bool:
        """Free the youngest running sequence's KV (used when nothing else can make progress)."""
        if not self.running:
            return False
        self._preempt(self.running[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.recompute_len = seq.total_len  # prompt + outputs (all read back: nothing in flight)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self, can_preempt: bool) -> StepPlan:
        budget = self.max_num_batched_tokens
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq.in_prefill or seq.done_scheduling or seq.status is not Status.RUNNING:
                continue
            while not self._grow(seq, seq.total_len):
                if not can_preempt:
                    return StepPlan([], [], needs_preemption=True)
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING and budget > 0:
                decodes.append(seq)
                budget -= 1

        prefills: list[PrefillChunk] = []
        candidates = [s for s in self.running if s.in_prefill] + list(self.waiting)
        for seq in candidates:
            if budget <= 0 or len(prefills) >= self.max_prefill_rows:
                break
            if seq.status is Status.WAITING and self.slots.num_free == 0:
                break
            length = min(seq.recompute_len - seq.num_computed, budget, self.max_prefill_chunk)
            if not self._grow(seq, seq.num_computed + length):
                break
            if seq.status is Status.WAITING:
                self.waiting.remove(seq)
                seq.slot = self.slots.allocate()[0]
                seq.status = Status.RUNNING
                self.running.append(seq)
            samples = seq.num_computed + length == seq.recompute_len
            prefills.append(PrefillChunk(seq, seq.num_computed, length, samples))
            budget -= length
        return StepPlan(prefills, decodes)

    def commit(self, plan: StepPlan) -> None:
        """Advance the counters as if the plan's step ran (it is dispatched next)."""
        for chunk in plan.prefills:
            chunk.seq.num_computed += chunk.length
            if chunk.samples:
                chunk.seq.num_scheduled_outputs += 1
        for seq in plan.decodes:
            seq.num_computed = seq.total_len
            seq.num_scheduled_outputs += 1
