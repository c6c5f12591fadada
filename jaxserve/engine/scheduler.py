"""Continuous batching: which sequences run in the next step, and with how many tokens.

Policy (first come, first served), with one token budget per DP replica:
1. Every running sequence past its prefill gets one decode token. If its replica's KV pool has no
   block for it, the most recently admitted running sequence of that replica is preempted
   (blocks and slot freed, KV recomputed later) until it fits; a sequence never waits behind a
   younger one.
2. The remaining token budget goes to prefill chunks: first sequences already part-way through
   their prefill, then waiting sequences in arrival order (preempted ones first). A waiting
   sequence joins the replica with the most free KV blocks and stays there; one that does not
   fit stops admission (no overtaking), so nobody starves.
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
    def __init__(self, blocks: list[BlockAllocator], slots: list[IdPool],
                 max_num_batched_tokens: int, max_prefill_chunk: int, max_prefill_rows: int,
                 tile: int):
        self.blocks = blocks  # one allocator per DP replica (local block ids)
        self.slots = slots  # one slot pool per DP replica
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk
        self.max_prefill_rows = max_prefill_rows
        self.tile = tile
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    @property
    def num_replicas(self) -> int:
        return len(self.blocks)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.done_scheduling for s in self.running)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the sequence's blocks cover its first num_tokens tokens."""
        blocks = self.blocks[seq.replica]
        need = blocks.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > blocks.num_free:
            return False
        seq.blocks += blocks.allocate(need)
        return True

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks and slot (finished, aborted or preempted)."""
        if seq.replica is not None:
            self.blocks[seq.replica].free(seq.blocks)
            if seq.slot is not None:
                self.slots[seq.replica].free([seq.slot])
        seq.blocks = []
        seq.slot = None
        seq.replica = None
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

    def _place(self, seq: Sequence, budget: list[int], rows: list[int]) -> int | None:
        """The replica a waiting sequence joins: the one with the most free KV blocks among
        those with a free slot, a free prefill row and token budget (lowest index on ties)."""
        open_ = [r for r in range(self.num_replicas) if self.slots[r].num_free
                 and rows[r] < self.max_prefill_rows and budget[r] >= self.tile]
        if not open_:
            return None
        return max(open_, key=lambda r: (self.blocks[r].num_free, -r))

    def schedule(self, can_preempt: bool) -> StepPlan:
        """Tokens per sequence for the next step. Budgets are per DP replica, in tokens as the
        step lays them out (a prefill chunk occupies whole query tiles)."""
        budget = [self.max_num_batched_tokens] * self.num_replicas
        rows = [0] * self.num_replicas
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq.in_prefill or seq.done_scheduling or seq.status is not Status.RUNNING:
                continue
            while not self._grow(seq, seq.total_len):
                if not can_preempt:
                    return StepPlan([], [], needs_preemption=True)
                victim = [s for s in self.running if s.replica == seq.replica][-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING and budget[seq.replica] > 0:
                decodes.append(seq)
                budget[seq.replica] -= 1

        prefills: list[PrefillChunk] = []
        candidates = [s for s in self.running if s.in_prefill] + list(self.waiting)
        for seq in candidates:
            if seq.status is Status.WAITING:
                replica = self._place(seq, budget, rows)
                if replica is None:
                    break
            else:
                replica = seq.replica
                if rows[replica] >= self.max_prefill_rows:
                    continue
            room = budget[replica] // self.tile * self.tile
            length = min(seq.recompute_len - seq.num_computed, room, self.max_prefill_chunk)
            if length <= 0:
                if seq.status is Status.WAITING:
                    break
                continue
            if seq.status is Status.WAITING:
                seq.replica = replica
                if not self._grow(seq, length):
                    seq.replica = None
                    break
                self.waiting.remove(seq)
                seq.slot = self.slots[replica].allocate()[0]
                seq.status = Status.RUNNING
                self.running.append(seq)
            elif not self._grow(seq, seq.num_computed + length):
                continue
            samples = seq.num_computed + length == seq.recompute_len
            prefills.append(PrefillChunk(seq, seq.num_computed, length, samples))
            budget[replica] -= -(-length // self.tile) * self.tile
            rows[replica] += 1
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
