"""Continuous batching: which sequences run in the next step, and with how many tokens.

Policy (first come, first served), with one token budget per DP replica:
1. Every running sequence past its prefill gets one decode token. If its replica's KV pool has no
   block for it, the most recently admitted running sequence of that replica is preempted
   (blocks and slot freed, KV recomputed later) until it fits; a sequence never waits behind a
   younger one.
2. The remaining token budget goes to prefill chunks: first sequences already part-way through
   their prefill, then waiting sequences in arrival order (preempted ones first). A waiting
   sequence joins the replica its routing policy picks (jaxserve/engine/router.py) and stays
   there; it takes the longest prefix that replica has cached (jaxserve/engine/block_pool.py)
   and prefills only the rest, always recomputing at least its last token so that it samples.
   If the next blocks of its prefix are being prefilled there by another sequence, it waits for
   them instead of computing them a second time. One that does not fit its replica this step
   closes that replica to later arrivals for the step (no overtaking on a replica), so nobody
   starves.
3. `n > 1`: the request's first sequence prefills the prompt; the others wait. The step that
   samples its first token samples theirs too, from the same logits (one extra sample row each):
   they share the prompt's full blocks and get a copy of the partly filled last block, which the
   engine copies on the device right after that step (never shared: their continuations
   differ). Siblings that find no free row, slot or block then are admitted like any sequence,
   with the prompt's full blocks as a prefix cache hit.
Requests are validated on arrival to fit the pool alone, so preemption always makes progress.

The other half, `update`, applies a step's read-back tokens: each is appended to its sequence,
whose full blocks join the prefix cache, and the stops a token id decides (EOS, stop token ids,
max_tokens, a full context) finish the sequence and free its slot and blocks before the next
step is planned. Stops found in the text (stop strings) are the output processor's; it returns
them and the engine applies them here (`stop_late`).

Speculation (jaxserve/engine/speculative/): a decoding sequence may come with proposed tokens;
it then runs 1 + m tokens (its last token and m proposals, as many as its budget, its
max_tokens and its blocks allow: proposals are dropped before anyone is preempted for them).
How many of them it keeps is known only when the step is read back, so its counters advance in
`update`, not in `commit`; the KV of rejected proposals lies beyond the sequence's new length,
in blocks it gives back (or overwrites next step): nothing is copied. A decoding sequence
without proposals is a plain decode, in a speculative step too: one token, counted in
`commit`, so it may be planned again before its step is read back (see engine.py).

Disaggregated prefill/decode (jaxserve/engine/handoff.py): on the prefill engine a request's
sequence stops being scheduled after its first token (`Request.handoff_after`); when that token
is applied it moves to `handing_off`, keeping its blocks and giving back its slot, until the
handoff commits (`hand_over`) or it finishes. On the decode engine a handed-off sequence gets
its blocks and slot from `reserve` and joins the running sequences through `adopt`, with its
first token as a one-token prefill chunk still to run (the token is known on the host; the
decode slot's state is set as for any admitted sequence).

With `cache.swap_preempted` a preempted sequence's KV goes to host memory instead of being
recomputed: `_preempt` lists its blocks in `swap_out` (the engine copies them out before the
next dispatch, while their content is still there), and when it is admitted again it takes
fresh blocks, listed in `swap_in` (the engine copies the KV back before the step that reads
it), and computes only its last token.

Preemption changes state that steps in flight refer to, so the scheduler only preempts when
the engine says nothing is in flight (`can_preempt`); otherwise it reports `needs_preemption` and
the engine drains first. Decisions depend only on the queue contents: deterministic.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxserve.config import ModelConfig
from jaxserve.engine.id_pool import IdPool
from jaxserve.engine.block_pool import BlockHash, BlockPool, chain_hashes
from jaxserve.engine.router import (ReplicaView, RoutingPolicy, choose_replica,
                                    remaining_flops)
from jaxserve.engine.sequence import SampledToken, Sequence, Status, TokenStop
from jaxserve.settings import SchedulerSettings


@dataclasses.dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first position of the chunk
    length: int
    samples: bool  # the chunk ends the prefill: its last token yields an output token
    # siblings (n > 1) whose first token is sampled from this chunk's last token too
    forks: list[Sequence] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class DeviceDrafts:
    """A sequence's proposals whose token ids are still on the device (a draft model's round):
    the host plans with their number alone, like a list of that many tokens, and the step takes
    the values from the round's output (jaxserve/runtime/draft_runner.py)."""

    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, part: slice) -> DeviceDrafts:
        return DeviceDrafts(len(range(self.count)[part]))


@dataclasses.dataclass
class StepPlan:
    prefills: list[PrefillChunk]
    decodes: list[Sequence]
    needs_preemption: bool = False
    admitted: list[Sequence] = dataclasses.field(default_factory=list)  # given a slot this step
    # (replica, source block, destination block), local ids: copied right after the step
    copies: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    # a speculative step: the tokens each decoding sequence verifies after its last one (or
    # their number, when they are on the device)
    drafts: dict[Sequence, list[int] | DeviceDrafts] = dataclasses.field(default_factory=dict)
    # sampled proposals: q of each of a sequence's drafts, f32[drafts, vocab_rows] (absent:
    # point masses); set beside `drafts` by the engine
    draft_probs: dict[Sequence, object] = dataclasses.field(default_factory=dict)
    # a token tree: the branches verified beside `drafts` (each from the last token)
    branches: dict[Sequence, list[list[int]]] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def verifies(self) -> bool:
        """Some decoding sequence verifies proposals (a speculative step)."""
        return any(self.drafts.values())


@dataclasses.dataclass
class StepUpdate:
    """What applying one step's tokens did (`Scheduler.update`)."""

    sampled: list[SampledToken]  # tokens appended, in sample-row order
    generated: int = 0  # tokens appended to outputs
    discarded: int = 0  # tokens of sequences that stopped while the step was in flight
    proposed: int = 0  # speculative: proposals verified
    accepted: int = 0  # speculative: proposals the target kept
    verified_runs: int = 0  # speculative: decoding sequences that verified proposals
    # speculative: (sequence, proposals it kept) per sequence that verified proposals
    runs: list[tuple[Sequence, int]] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, limits: SchedulerSettings, pools: list[BlockPool], slots: list[IdPool],
                 *, tile: int, router: RoutingPolicy, model_config: ModelConfig,
                 root_hash: BlockHash, speculative: bool = False, swap: bool = False):
        """limits: the step's token budget, chunk and prefill rows, per DP replica.
        speculative: decodes may verify proposals (see the module docstring)."""
        self.speculative = speculative
        self.pools = pools  # one per DP replica (local block ids)
        self.slots = slots  # one slot pool per DP replica
        self.max_num_batched_tokens = limits.max_num_batched_tokens
        self.max_prefill_chunk = limits.max_prefill_chunk
        self.max_prefill_rows = limits.max_prefill_rows
        self.tile = tile
        self.router = router
        self.model_config = model_config
        self.root_hash = root_hash  # the parent of every sequence's first block
        self.block_size = pools[0].block_size
        self.caching = pools[0].caching
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.counters = collections.Counter()
        self.handing_off: list[Sequence] = []  # prefilled, waiting to move to another engine
        # cache.swap_preempted: (seq, replica, blocks, tokens) whose KV the engine copies to
        # host memory, and (seq, replica, blocks) it copies back, before the next dispatch
        self.swap = swap
        self.swap_out: list[tuple[Sequence, int, list[int], int]] = []
        self.swap_in: list[tuple[Sequence, int, list[int]]] = []
        self._adopted: list[Sequence] = []  # taken over from another engine, slot state not set

    @property
    def num_replicas(self) -> int:
        return len(self.pools)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.done_scheduling for s in self.running)

    # ---- blocks ----
    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the sequence's blocks cover its first num_tokens tokens."""
        pool = self.pools[seq.replica]
        need = pool.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > pool.num_free:
            return False
        seq.blocks += pool.allocate(need)
        return True

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        """Hashes of the sequence's first num_blocks full blocks (their tokens must be known)."""
        request, bs = seq.request, self.block_size
        if request.prompt_hashes is None:
            request.prompt_hashes = chain_hashes(request.prompt_ids, bs, self.root_hash)
        if seq.block_hashes is None:
            seq.block_hashes = list(request.prompt_hashes)
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            tokens = [seq.prefill_token(i) for i in range(len(hashes) * bs, num_blocks * bs)]
            hashes += chain_hashes(tokens, bs, hashes[-1] if hashes else self.root_hash)
        return hashes[:num_blocks]

    def name_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's full blocks whose KV is computed (by dispatched steps) and whose
        tokens are known on the host into its replica's prefix cache."""
        if not self.caching or seq.replica is None:
            return
        known = len(seq.request.prompt_ids) + len(seq.output_ids)
        full = min(seq.num_computed, known) // self.block_size
        if full <= seq.num_named_blocks:
            return
        pool = self.pools[seq.replica]
        for i, h in enumerate(self._hashes(seq, full)[seq.num_named_blocks:],
                              seq.num_named_blocks):
            pool.name(seq.blocks[i], h)
        seq.num_named_blocks = full

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks and slot (finished, aborted or preempted)."""
        if seq.replica is not None:
            self.name_blocks(seq)
            self.pools[seq.replica].release(seq.blocks)
            if seq.slot is not None:
                self.slots[seq.replica].free([seq.slot])
        seq.blocks = []
        seq.num_named_blocks = 0
        seq.slot = None
        seq.replica = None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.handing_off:
            self.handing_off.remove(seq)
        if seq in self._adopted:
            self._adopted.remove(seq)

    # ---- handoff between engines ----
    def _hold_for_handoff(self, seq: Sequence) -> None:
        """Prefill side: the sequence's first token is applied; it keeps its blocks (named
        into the prefix cache) and gives back its slot until `hand_over`."""
        self.name_blocks(seq)
        self.slots[seq.replica].free([seq.slot])
        seq.slot = None
        seq.status = Status.HANDOFF
        self.running.remove(seq)
        self.handing_off.append(seq)

    def hand_over(self, seq: Sequence) -> None:
        """Prefill side: another engine owns the sequence now; its blocks go back (the full
        ones stay in the prefix cache)."""
        self.release(seq)

    def _headroom(self, replica: int) -> int:
        """Free blocks of a replica less what its running sequences still grow into."""
        pool = self.pools[replica]
        growth = sum(max(0, pool.blocks_for(len(s.request.prompt_ids) + s.request.max_tokens)
                         - len(s.blocks)) for s in self.running if s.replica == replica)
        return pool.num_free - growth

    def reserve(self, num_tokens: int, final_tokens: int) -> tuple[int, list[int], int] | None:
        """Decode side: (replica, blocks for num_tokens, slot) for a sequence handed over, or
        None (back-pressure) unless a replica has a free slot and room for the sequence at its
        longest (`final_tokens`) besides what its running sequences grow into: a handed-over
        sequence never makes anyone be preempted. Preempted sequences go first."""
        if self.waiting:
            return None
        best, room = None, 0
        for r, pool in enumerate(self.pools):
            headroom = self._headroom(r)
            if self.slots[r].num_free and pool.blocks_for(final_tokens) <= headroom and (
                    best is None or headroom > room):
                best, room = r, headroom
        if best is None:
            return None
        pool = self.pools[best]
        return best, pool.allocate(pool.blocks_for(num_tokens)), self.slots[best].allocate()[0]

    def cancel_reservation(self, replica: int, blocks: list[int], slot: int) -> None:
        self.pools[replica].release(blocks)
        self.slots[replica].free([slot])

    def adopt(self, seq: Sequence, replica: int, blocks: list[int], slot: int) -> None:
        """Decode side: a sequence whose KV up to its last token was written into `blocks`
        runs here from now on; its last token is the one prefill chunk left to run."""
        seq.replica, seq.blocks, seq.slot = replica, blocks, slot
        # its blocks are named in this engine's prefix cache, from this engine's root hash
        seq.num_named_blocks, seq.block_hashes, seq.request.prompt_hashes = 0, None, None
        seq.num_computed = seq.total_len - 1
        seq.recompute_len = seq.total_len
        seq.status = Status.RUNNING
        self.running.append(seq)
        self._adopted.append(seq)

    def clear_prefix_cache(self) -> None:
        """Forget every cached block (their pages are about to be overwritten)."""
        for pool in self.pools:
            pool.clear()

    def finish(self, seq: Sequence) -> None:
        self.release(seq)
        seq.host_kv = None
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
        if self.swap and seq.num_computed:  # the engine copies them out before the next step
            self.swap_out.append((seq, seq.replica, list(seq.blocks), seq.num_computed))
            seq.host_kv, seq.host_kv_tokens = {}, seq.num_computed  # filled by the engine
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.recompute_len = seq.total_len  # prompt + outputs (all read back: nothing in flight)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- load ----
    def _remaining_flops(self, seq: Sequence) -> int:
        request = seq.request
        return remaining_flops(self.model_config, seq.num_computed, len(request.prompt_ids),
                               request.max_tokens, seq.num_scheduled_outputs)

    def replica_loads(self) -> list[int]:
        """Per DP replica, the true FLOPs of the work admitted there and not yet done."""
        loads = [0] * self.num_replicas
        for seq in self.running:
            loads[seq.replica] += self._remaining_flops(seq)
        return loads

    # ---- planning ----
    @staticmethod
    def _held(seq: Sequence) -> bool:
        """A sibling (n > 1) that waits for the first sequence to sample from the prompt."""
        leader = seq.request.sequences[0]
        return (seq is not leader and seq.num_scheduled_outputs == 0
                and leader.num_scheduled_outputs == 0 and leader.status is not Status.FINISHED)

    def _start(self, seq: Sequence, replica: int, plan: StepPlan) -> None:
        """A waiting sequence joins `replica` (its blocks are already set)."""
        self.waiting.remove(seq)
        seq.replica = replica
        seq.slot = self.slots[replica].allocate()[0]
        seq.status = Status.RUNNING
        self.running.append(seq)
        plan.admitted.append(seq)

    def _in_progress(self) -> list[set[BlockHash]]:
        """Per replica, the hashes of prompt blocks that sequences there are prefilling."""
        out: list[set[BlockHash]] = [set() for _ in range(self.num_replicas)]
        for seq in self.running:
            if seq.in_prefill:
                full = seq.recompute_len // self.block_size
                out[seq.replica].update(self._hashes(seq, full)[seq.num_named_blocks:])
        return out

    def _admit(self, seq: Sequence, budget: list[int], rows: list[int], closed: set[int],
               loads: list[int] | None, in_progress: list[set[BlockHash]],
               plan: StepPlan) -> PrefillChunk | None:
        """A waiting sequence's first chunk, or None when it waits (and maybe closes a replica)."""
        if seq.host_kv is not None:
            return self._swap_in(seq, budget, rows, closed, plan)
        bs = self.block_size
        hashes = self._hashes(seq, (seq.recompute_len - 1) // bs) if self.caching else []
        hits, coming, views = [], [], []
        for r in range(self.num_replicas):
            hits.append(self.pools[r].cached_prefix(hashes))
            coming.append(0)  # blocks right after the hit that a sequence there is computing
            while len(hits[r]) + coming[r] < len(hashes) and \
                    hashes[len(hits[r]) + coming[r]] in in_progress[r]:
                coming[r] += 1
            views.append(ReplicaView(r, (len(hits[r]) + coming[r]) * bs,
                                     loads[r] if loads else 0, self.pools[r].num_free,
                                     self.slots[r].num_free))
        replica = choose_replica(self.router, views) if len(views) > 1 else 0
        if replica in closed or coming[replica] or not self.slots[replica].num_free:
            return None
        pool, hit = self.pools[replica], hits[replica]
        start = len(hit) * bs
        room = budget[replica] // self.tile * self.tile
        length = min(seq.recompute_len - start, room, self.max_prefill_chunk)
        need = pool.blocks_for(start + length) - len(hit)
        if rows[replica] >= self.max_prefill_rows or length <= 0 or \
                need > pool.num_free - pool.num_evictable_among(hit):
            closed.add(replica)
            return None
        pool.share(hit)
        seq.blocks = list(hit) + pool.allocate(need)
        seq.num_named_blocks = len(hit)
        seq.num_computed = start
        self._start(seq, replica, plan)
        if self.caching:
            self.counters["prefix_cache_queries"] += seq.recompute_len
            self.counters["prefix_cache_hits"] += start
            in_progress[replica].update(
                self._hashes(seq, seq.recompute_len // bs)[len(hit):])
        if seq.request.cached_prompt_tokens is None:
            seq.request.cached_prompt_tokens = min(start, len(seq.request.prompt_ids))
        if loads:
            loads[replica] += self._remaining_flops(seq)
        return PrefillChunk(seq, start, length, start + length == seq.recompute_len)

    def _swap_in(self, seq: Sequence, budget: list[int], rows: list[int], closed: set[int],
                 plan: StepPlan) -> PrefillChunk | None:
        """A sequence whose KV waits in host memory rejoins the replica with the most free
        blocks: its KV is copied back (`swap_in`) and only the tokens after it are computed."""
        replica = max(range(self.num_replicas), key=lambda r: self.pools[r].num_free)
        pool, start = self.pools[replica], seq.host_kv_tokens
        length = min(seq.recompute_len - start, budget[replica] // self.tile * self.tile,
                     self.max_prefill_chunk)
        if replica in closed or not self.slots[replica].num_free or length <= 0 or \
                rows[replica] >= self.max_prefill_rows or \
                pool.blocks_for(start + length) > pool.num_free:
            closed.add(replica)
            return None
        seq.blocks = pool.allocate(pool.blocks_for(start + length))
        seq.num_named_blocks, seq.num_computed = 0, start
        self.swap_in.append((seq, replica, seq.blocks[:pool.blocks_for(start)]))
        self._start(seq, replica, plan)
        return PrefillChunk(seq, start, length, start + length == seq.recompute_len)

    def _fork(self, chunk: PrefillChunk, rows: list[int], plan: StepPlan) -> None:
        """Siblings waiting on `chunk.seq`'s first token take theirs from the same logits."""
        leader, replica = chunk.seq, chunk.seq.replica
        pool, prompt_len = self.pools[replica], len(leader.request.prompt_ids)
        full = prompt_len // self.block_size
        # A sibling decodes into the partly filled last block, so it needs its own copy of it;
        # one that stops at its first token never writes there.
        copy = prompt_len % self.block_size > 0 and not leader.stops_at_first_token
        for sibling in leader.request.sequences[1:]:
            if sibling.status is not Status.WAITING or not self._held(sibling):
                continue
            if rows[replica] >= self.max_prefill_rows or not self.slots[replica].num_free \
                    or (copy and not pool.num_free):
                break
            shared = leader.blocks[:full]
            pool.share(shared)
            sibling.blocks = shared + (pool.allocate(1) if copy else [])
            if copy:
                plan.copies.append((replica, leader.blocks[full], sibling.blocks[-1]))
            sibling.num_computed = sibling.recompute_len = prompt_len
            sibling.num_named_blocks = full
            self._start(sibling, replica, plan)
            chunk.forks.append(sibling)
            rows[replica] += 1
            self.counters["forked_sequences"] += 1

    def schedule(self, can_preempt: bool,
                 proposals: dict[Sequence, list[int]] | None = None,
                 branches: dict[Sequence, list[list[int]]] | None = None) -> StepPlan:
        """Tokens per sequence for the next step. Budgets are per DP replica, in tokens as the
        step lays them out (a prefill chunk occupies whole query tiles). proposals: tokens
        decoding sequences may verify (speculative); branches: a token tree's other branches
        (each its own run from the last token, kept only when all of them fit)."""
        budget = [self.max_num_batched_tokens] * self.num_replicas
        rows = [0] * self.num_replicas
        plan = StepPlan([], [])
        for seq in list(self.running):
            if seq.in_prefill or seq.done_scheduling or seq.status is not Status.RUNNING:
                continue
            if self.speculative:
                # emitted tokens (proposals kept + one) never pass max_tokens or the context
                room = min(seq.request.max_tokens - seq.num_scheduled_outputs,
                           budget[seq.replica]) - 1
                draft = (proposals or {}).get(seq, [])[:max(room, 0)]
                if draft and not self._grow(seq, seq.total_len + len(draft)):
                    draft = []
                plan.drafts[seq] = draft
                more = [b[:room] for b in (branches or {}).get(seq, []) if draft and b[:room]]
                slots = seq.total_len + len(draft) + sum(len(b) for b in more)  # tree slots too
                if more and (1 + len(draft) + sum(1 + len(b) for b in more) > budget[seq.replica]
                             or slots > seq.request.max_model_len
                             or not self._grow(seq, slots)):
                    more = []
                if more:
                    plan.branches[seq] = more
            while not self._grow(seq, seq.total_len):
                if not can_preempt:
                    return StepPlan([], [], needs_preemption=True)
                victim = [s for s in self.running if s.replica == seq.replica][-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING and budget[seq.replica] > 0:
                plan.decodes.append(seq)
                budget[seq.replica] -= 1 + len(plan.drafts.get(seq, ())) + sum(
                    1 + len(b) for b in plan.branches.get(seq, ()))
            else:
                plan.drafts.pop(seq, None)
                plan.branches.pop(seq, None)

        closed: set[int] = set()  # replicas that admit nobody else this step
        loads = self.replica_loads() if self.num_replicas > 1 and self.waiting else None
        in_progress = self._in_progress() if self.caching and self.waiting else None
        # Waiting sequences looked at per step: more could not start in one step anyway.
        lookahead = self.max_prefill_rows * self.num_replicas
        candidates = [s for s in self.running if s.in_prefill] + list(self.waiting)
        for seq in candidates:
            if seq.status is Status.WAITING:
                if self._held(seq):
                    continue
                if lookahead == 0 or all(r in closed or not self.slots[r].num_free
                                         for r in range(self.num_replicas)):
                    break
                lookahead -= 1
                chunk = self._admit(seq, budget, rows, closed, loads, in_progress, plan)
                if chunk is None:
                    continue
            else:
                replica = seq.replica
                if rows[replica] >= self.max_prefill_rows:
                    continue
                room = budget[replica] // self.tile * self.tile
                length = min(seq.recompute_len - seq.num_computed, room, self.max_prefill_chunk)
                if length <= 0 or not self._grow(seq, seq.num_computed + length):
                    continue
                chunk = PrefillChunk(seq, seq.num_computed, length,
                                     seq.num_computed + length == seq.recompute_len)
            replica = seq.replica
            plan.prefills.append(chunk)
            budget[replica] -= -(-chunk.length // self.tile) * self.tile
            rows[replica] += 1
            if chunk.samples and seq.num_scheduled_outputs == 0 and seq.index == 0 \
                    and len(seq.request.sequences) > 1:
                self._fork(chunk, rows, plan)
        plan.admitted[:0] = self._adopted  # their slot state is set before the step too
        return plan

    def commit(self, plan: StepPlan) -> None:
        """Advance the counters as if the plan's step ran (it is dispatched next)."""
        self._adopted = [s for s in self._adopted if s not in plan.admitted]
        for chunk in plan.prefills:
            seq = chunk.seq
            seq.num_computed += chunk.length
            if chunk.samples:
                seq.num_scheduled_outputs += 1
            for sibling in chunk.forks:
                sibling.num_scheduled_outputs += 1
            self.name_blocks(seq)
        for seq in plan.decodes:
            seq.num_computed = seq.total_len
            if not plan.drafts.get(seq):  # else: in `update`, once the kept tokens are known
                seq.num_scheduled_outputs += 1

    # ---- applying a step's results ----
    def update(self, rows: list[tuple[int, Sequence]], tokens,
               eos_ids: tuple[int, ...], emitted=None,
               verify_rows: frozenset[int] = frozenset(),
               run_starts: frozenset[int] | None = None) -> StepUpdate:
        """Apply one step's read-back tokens (tokens i32[rows]; `rows` pairs a row with the
        sequence it sampled for): append them, name full blocks, finish the sequences a token
        id stops. A sequence that stopped while the step was in flight drops its token.
        Speculative steps: `emitted` bool[rows] says which rows' tokens count; `verify_rows`
        are rows of decode runs that verify proposals, whose sequences advance here (see
        `_settle`); `run_starts`, with token trees, the first row of every run (a sequence has
        one run per branch)."""
        tokens = tokens.tolist()
        emitted = emitted.tolist() if emitted is not None else None
        update = StepUpdate([])
        runs: dict[Sequence, list[int]] = {}  # decode runs -> [rows, tokens emitted, runs]
        for r, seq in rows:
            if r in verify_rows:
                run = runs.setdefault(seq, [0, 0, 0 if run_starts is not None else 1])
                run[0] += 1
                run[2] += run_starts is not None and r in run_starts
            if emitted is not None and not emitted[r]:
                continue
            if r in verify_rows:
                runs[seq][1] += 1
                if seq.status is not Status.FINISHED:
                    seq.num_scheduled_outputs += 1
            if seq.status is Status.FINISHED:
                update.discarded += 1
                continue
            token = tokens[r]
            seq.output_ids.append(token)
            self.name_blocks(seq)  # its full blocks join the prefix cache
            n = len(seq.output_ids)
            update.generated += 1
            stop = self._token_stop(seq, token, n, eos_ids)
            if stop is not None:
                self.finish(seq)
            elif seq.request.handoff_after is not None and n >= seq.request.handoff_after:
                self._hold_for_handoff(seq)
            update.sampled.append(SampledToken(seq, r, token, n, stop))
        for seq, (run_rows, kept, num_runs) in runs.items():
            if run_rows > num_runs:
                update.proposed += run_rows - num_runs
                update.accepted += kept - 1
                update.verified_runs += 1
                update.runs.append((seq, kept - 1))
            if seq.status is not Status.FINISHED:
                self._settle(seq)
        return update

    def _settle(self, seq: Sequence) -> None:
        """A decode run was read back: the KV of its kept tokens counts as computed (the last
        one is next step's input), and the blocks past its new length, which held only
        rejected proposals, go back to the pool."""
        seq.num_computed = seq.total_len - 1
        pool = self.pools[seq.replica]
        keep = pool.blocks_for(seq.total_len)
        if len(seq.blocks) > keep:
            pool.release(seq.blocks[keep:])
            del seq.blocks[keep:]
        self.name_blocks(seq)

    @staticmethod
    def _token_stop(seq: Sequence, token: int, n: int,
                    eos_ids: tuple[int, ...]) -> TokenStop | None:
        """The stops the sequence's n-th output token decides, in the order they take effect."""
        params = seq.params
        if token in eos_ids and not params.ignore_eos and n > params.min_tokens - 1:
            return TokenStop("stop")
        if token in params.stop_token_ids and n > params.min_tokens - 1:
            return TokenStop("stop", token)
        if (params.max_tokens is not None and n >= params.max_tokens) or \
                len(seq.request.prompt_ids) + n >= seq.request.max_model_len:
            return TokenStop("length", text_stop_wins=True)
        return None

    def stop_late(self, seq: Sequence, num_outputs: int) -> int:
        """A stop string ended the sequence at its num_outputs-th token after later tokens were
        appended: drop those and finish it (if nothing did yet). Returns how many were
        dropped."""
        late = max(0, len(seq.output_ids) - num_outputs)
        del seq.output_ids[num_outputs:]
        if seq.status is not Status.FINISHED:
            self.finish(seq)
        return late
