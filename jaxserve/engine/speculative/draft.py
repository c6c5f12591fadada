"""Draft-model proposals: a smaller model of the same vocabulary guesses the next k tokens.

Design (this file owns it):
- The draft is a second runner (jaxserve/runtime/draft_runner.py) on the target's devices, or
  on devices of its own, with its own KV pool, slot state and compiled programs. Its KV
  blocks and slots are allocated here, from a block pool of its own (no prefix cache): the
  target's scheduler never sees them.
- Per decoding sequence the draft keeps a shadow Sequence (whose "prompt" is the target
  sequence's prompt + outputs), `valid`: how many of those tokens its KV holds, and the
  proposals of its last round. Outputs only ever grow, so positions below `valid` stay right.
  A round writes the KV of its own proposals d_1..d_{m-1} at the positions after the tokens it
  was given; the next round counts the leading ones the target kept as valid (their KV is
  what a catch-up would write: the same tokens after the same prefix), so after a step that
  kept a proposals only 1 token (2 when all k were kept) is new to the draft. The rest of the
  proposals' KV is overwritten by later rounds (no copy, no rollback), and positions past a
  sequence's length are never read. Which proposals the target kept, the engine says
  (`verified`): a rejected proposal is never the token the target emits (verify.py).
- One round is ONE dispatch of the draft's `propose` program for every sequence (no
  per-sequence loop, no k dispatches): the up to CATCH_UP new tokens of each sequence, then
  k - 1 decode iterations, in a loop on the device. A sequence with more new tokens than that
  (one seen for the first time, or after a preemption) first has the excess prefilled by the
  draft's step program, batched and chunked to the step budget.
- On the target's devices the proposals stay there: `propose_all` plans the round and hands
  the scheduler only how many proposals each sequence gets (`DeviceDrafts`); once the step's
  rows are laid out, `fill_step` dispatches the round, whose output is the proposals and q
  laid out as the verify step's inputs, on the device, and the verify step follows at once:
  a round is two dispatches and one readback, the verify's, where the kept proposals come
  back as the target's tokens. A draft on devices of its own reads its proposals back (`propose_all`
  returns their values), since the round ahead (below) starts from them.
- The draft decodes greedily for greedy requests (point masses: the target keeps exactly its
  greedy tokens) and samples for sampling ones, with the request's SamplingParams
  (`draft_params`) and a seed of its own per round (`round_seed`), returning q of each
  proposal with it; rejection sampling against q keeps the target's distribution exact
  (jaxserve/runtime/verify.py). Penalties count the target's outputs (loaded into the draft's
  slot state at each round that needs them) and the round's earlier proposals.
- A round dispatched ahead (`dispatched`) is for greedy sequences only (a sampled sequence's
  proposals need the next round's seed and q, which a guessed round does not carry).
- A sequence holds draft blocks and a slot only while it is proposed for: one that finished, was
  preempted or is prefilling again gives them back at the next round (a preempted one catches up
  from scratch). A sequence the draft pool has no room for gets no proposals this round.

This module never calls a model directly: it dispatches the draft runner's compiled programs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from jaxserve.engine.block_pool import BlockPool
from jaxserve.engine.id_pool import IdPool
from jaxserve.engine.scheduler import DeviceDrafts, PrefillChunk, StepPlan
from jaxserve.engine.sequence import Request, Sequence
from jaxserve.engine.speculative.proposals import (GREEDY, Proposals, draft_params,
                                                   penalty_rows, round_seed)
from jaxserve.engine.step_builder import QUERY_TILE, StepBuilder
from jaxserve.ops.attention import chunk_blocks_for
from jaxserve.runtime.draft_runner import ProposeInputs, propose_inputs
from jaxserve.runtime.runner import VerifyRows
from jaxserve.settings import SchedulerSettings, parse_draft_mesh
from jaxserve.sharding import Layout

# New tokens a round feeds before it proposes: the target's correction or bonus token, and the
# last proposal when the target kept all k (its KV was never written). More are prefilled first.
CATCH_UP = 2


@dataclasses.dataclass
class _DraftState:
    shadow: Sequence  # the draft's view of a target sequence: prompt_ids = its known tokens
    valid: int = 0  # leading tokens whose KV the draft's pool holds
    proposed_at: int = 0  # the length of the tokens the last round proposed after
    proposed: list[int] = dataclasses.field(default_factory=list)  # its values (read back)
    num_proposed: int = 0  # how many proposals that round made
    kept: int = 0  # how many of them the target kept (`verified`)
    # a round dispatched ahead (`dispatched`): (where the target's bonus token lands if it
    # keeps every proposal, the round's proposals on the device, this sequence's row)
    ahead: tuple[int, object, int] | None = None


class DraftProposer:
    samples = True  # a sampling request's proposals come with q (greedy ones: point masses)

    def __init__(self, runner, limits: SchedulerSettings, k: int, ahead: bool = False):
        """runner: the draft's DraftRunner (one DP replica); limits: the target's resolved
        scheduler settings (the draft's steps obey the same budget). ahead: propose step
        t+1's tokens while the target verifies step t's (the draft on devices of its own)."""
        self.runner, self.limits, self.k, self.ahead = runner, limits, k, ahead
        self.on_device = not ahead  # the proposals stay on the device (see the module docstring)
        # the round `propose_all` planned, for `fill_step`: its inputs and (seq, state, m) rows
        self.round: tuple[ProposeInputs, list[tuple[Sequence, _DraftState, int]]] | None = None
        self.ahead_rounds = self.ahead_hits = 0
        seqs = limits.max_num_seqs
        runner.init_slots(seqs)
        self.blocks = BlockPool(runner.blocks_per_replica, runner.block_size, caching=False)
        self.slots = IdPool(range(seqs))
        self.trash_slot = seqs
        self.builder = StepBuilder(limits, 1, block_size=runner.block_size, trash_slot=seqs,
                                   vocab_rows=runner.config.vocab_rows, eos_ids=())
        self.states: dict[Sequence, _DraftState] = {}

    @property
    def num_blocks_used(self) -> int:
        return self.blocks.num_used

    @property
    def idle(self) -> bool:
        """No sequence holds draft blocks (`propose_all([])` would do nothing)."""
        return not self.states

    def _release(self, seq: Sequence) -> None:
        shadow = self.states.pop(seq).shadow
        self.blocks.release(shadow.blocks)
        self.slots.free([shadow.slot])

    def _state(self, seq: Sequence, tokens: list[int], num_positions: int) -> _DraftState | None:
        """The sequence's draft state with blocks for `num_positions` tokens (None: no room)."""
        state = self.states.get(seq)
        if state is None:
            if not self.slots.num_free:
                return None
            request = Request("draft", tokens, GREEDY, [0], self.limits.max_model_len)
            state = _DraftState(request.sequences[0])
            state.shadow.replica, state.shadow.slot = 0, self.slots.allocate()[0]
            self.states[seq] = state
        shadow = state.shadow
        need = self.blocks.blocks_for(num_positions) - len(shadow.blocks)
        if need > self.blocks.num_free:
            return None
        if need > 0:
            shadow.blocks += self.blocks.allocate(need)
        shadow.request.prompt_ids = tokens
        shadow.num_scheduled_outputs = 0
        return state

    @staticmethod
    def _count_kept(state: _DraftState) -> None:
        """Advance `valid` over the last round's proposals whose KV the draft wrote (all but
        the last) that the target kept."""
        if state.valid == state.proposed_at:
            state.valid += max(0, min(state.kept, state.num_proposed - 1))
        state.kept = 0

    def verified(self, runs: list[tuple[Sequence, int]]) -> None:
        """A step's read back: (sequence, proposals it kept) for each that verified some."""
        for seq, kept in runs:
            state = self.states.get(seq)
            if state is not None:
                state.kept = kept

    def propose_all(self, seqs: list[Sequence]) -> Proposals:
        """Proposals for decoding sequences whose outputs are all read back: their values, or
        on the device their number (the round is dispatched by `fill_step`)."""
        self.round = None
        proposing = set(seqs)
        for gone in [s for s in self.states if s not in proposing]:
            self._release(gone)
        wanted: list[tuple[Sequence, _DraftState, int]] = []  # (seq, state, proposals to make)
        proposals: dict[Sequence, list[int] | DeviceDrafts] = {seq: [] for seq in seqs}
        for seq in seqs:
            tokens = seq.request.prompt_ids + seq.output_ids
            # proposals past max_tokens could never be kept (see Scheduler.schedule)
            m = min(self.k, seq.request.max_tokens - len(seq.output_ids) - 1)
            state = self._state(seq, tokens, len(tokens) + m - 1) if m > 0 else None
            if state is None:
                continue
            early = self._take_ahead(state, tokens, m)
            if early is not None:
                proposals[seq] = early
                continue
            self._count_kept(state)
            wanted.append((seq, state, m))
        if not wanted:
            return Proposals(proposals)
        for _, state, _ in wanted:  # a sequence the last step did not run: feed its last again
            state.valid = min(state.valid, len(state.shadow.request.prompt_ids) - 1)
        self._prefill_excess([state for _, state, _ in wanted])
        rows = next(b for b in self.builder.decode_buckets if b >= len(wanted))
        round_rows, draws = [], []
        for seq, state, m in wanted:
            tokens = state.shadow.request.prompt_ids
            round_rows.append((tokens[state.valid:], state.valid, m, state.shadow.blocks))
            draws.append((draft_params(seq.params), round_seed(seq.seed, len(seq.output_ids)),
                          state.shadow.slot))
        self._set_penalties([(seq, state.shadow.slot) for seq, state, _ in wanted])
        inputs = propose_inputs(rows, CATCH_UP, self.k, self.builder.width,
                                chunk_blocks_for(self.runner.block_size), round_rows, draws,
                                self.trash_slot)
        if self.on_device:
            self.round = (inputs, wanted)
            return Proposals({**proposals, **{seq: DeviceDrafts(m) for seq, _, m in wanted}})
        self._start(wanted)
        out, q = self.runner.propose(inputs)
        out = np.asarray(out)  # the round's one readback (with q when a row sampled)
        sampled = [i for i, (params, _, _) in enumerate(draws) if params.temperature]
        q = np.asarray(q) if sampled else None
        result = Proposals(proposals)
        for i, (seq, state, m) in enumerate(wanted):
            state.proposed = proposals[seq] = out[i, :m].tolist()
        for i in sampled:
            seq, _, m = wanted[i]
            result.probs[seq] = q[i, :m]
        return result

    @staticmethod
    def _start(wanted: list[tuple[Sequence, _DraftState, int]]) -> None:
        """The round is dispatched: its KV covers each sequence's tokens, and it proposes m."""
        for _, state, m in wanted:
            state.valid = state.proposed_at = len(state.shadow.request.prompt_ids)
            state.num_proposed, state.kept = m, 0

    def fill_step(self, rows: dict[Sequence, list[int]], verify: VerifyRows) -> VerifyRows:
        """Dispatch the round `propose_all` planned, its proposals gathered on the device into
        the verify step's rows that verify them (`rows`: per sequence, in order; every
        proposal of the step is the round's): returns the step's VerifyRows `verify` with
        `draft` and `draft_probs` the round's output. Nothing waits."""
        inputs, wanted = self.round
        self.round = None
        source = np.full(verify.draft.shape, -1, np.int32)
        for i, (seq, _, _) in enumerate(wanted):
            for j, row in enumerate(rows.get(seq, ())):
                source[row] = i * self.k + j
        self._start(wanted)
        out = self.runner.propose(dataclasses.replace(inputs, step_source=source))
        return dataclasses.replace(verify, draft=out.draft, draft_probs=out.draft_probs)

    def _set_penalties(self, pairs: list[tuple[Sequence, int]]) -> None:
        """Sampled proposals with penalties count the target's outputs: their draft slots start
        the round from the target's prompt mask and output counts."""
        pairs = [(seq, slot) for seq, slot in pairs
                 if seq.params.temperature and seq.params.uses_penalties]
        if pairs:
            self.runner.set_slots(*penalty_rows(
                [slot for _, slot in pairs], [seq.request.prompt_ids for seq, _ in pairs],
                [seq.output_ids for seq, _ in pairs], self.limits.max_num_seqs,
                self.trash_slot, self.runner.config.vocab_rows))

    def _take_ahead(self, state: _DraftState, tokens: list[int], m: int) -> list[int] | None:
        """The proposals the round dispatched ahead made, if the target kept every proposal
        and its bonus token is the one that round guessed (else None: a round corrects them)."""
        ahead, state.ahead = state.ahead, None
        if ahead is None:
            return None
        at, outputs, row = ahead
        guesses = np.asarray(outputs[0])[row].tolist()
        if len(tokens) != at + 1 or tokens[state.proposed_at:at] != state.proposed \
                or tokens[at] != guesses[0]:
            return None
        self.ahead_hits += 1
        state.valid = state.proposed_at = at + 1  # the round wrote the KV through the bonus
        state.proposed = guesses[1:1 + m]
        state.num_proposed, state.kept = len(state.proposed), 0
        return state.proposed

    def dispatched(self, plan: StepPlan) -> None:
        """The target step `plan` is on its way: dispatch, beside it, the draft's round for the
        next step, as if the target keeps every proposal (SwiftSpec's asynchronous draft). Its
        first token guesses the target's bonus token; the next round uses the rest if that
        guess and every proposal hold, and corrects them otherwise (`propose_all`)."""
        if not self.ahead:
            return
        rows = []
        for seq, drafts in plan.drafts.items():
            state = self.states.get(seq)
            if state is None or not drafts or drafts != state.proposed \
                    or state.valid != state.proposed_at or seq.params.temperature:
                continue
            at = state.proposed_at + len(drafts)  # where the bonus token lands
            shadow = state.shadow
            need = self.blocks.blocks_for(at + self.k - 1) - len(shadow.blocks)
            if need > self.blocks.num_free:
                continue
            if need > 0:
                shadow.blocks += self.blocks.allocate(need)
            rows.append((state, at, ([drafts[-1]], at - 1, self.k, shadow.blocks)))
        if not rows:
            return
        bucket = next(b for b in self.builder.decode_buckets if b >= len(rows))
        inputs = propose_inputs(bucket, CATCH_UP, self.k, self.builder.width,
                                chunk_blocks_for(self.runner.block_size), [r for *_, r in rows],
                                [(GREEDY, 0, state.shadow.slot) for state, *_ in rows],
                                self.trash_slot)
        outputs = self.runner.propose(inputs)  # read back by the next round, if it is right
        self.ahead_rounds += 1
        for i, (state, at, _) in enumerate(rows):
            state.ahead = (at, outputs, i)

    def _prefill_excess(self, states: list[_DraftState]) -> None:
        """Prefill every state's tokens past `valid` but the last CATCH_UP, in steps within the
        budget (nothing sampled: the round that follows proposes)."""
        limits = self.limits

        def excess(state: _DraftState) -> int:
            return len(state.shadow.request.prompt_ids) - CATCH_UP - state.valid

        pending = [s for s in states if excess(s) > 0]
        while pending:
            budget, chunks = limits.max_num_batched_tokens, []
            for state in pending:
                length = min(excess(state), limits.max_prefill_chunk,
                             budget // QUERY_TILE * QUERY_TILE)
                if length <= 0 or len(chunks) >= limits.max_prefill_rows:
                    break
                chunks.append(PrefillChunk(state.shadow, state.valid, length, False))
                state.valid += length
                budget -= -(-length // QUERY_TILE) * QUERY_TILE
            self.runner.step(self.builder.build(StepPlan(chunks, [])).inputs)
            pending = [s for s in pending if excess(s) > 0]


def draft_layout(mesh: str, target: Layout, rules) -> Layout:
    """The draft's layout for a speculative `mesh` ('tp=1@4': mesh tp=1 on devices 4, ...),
    refused when it reaches past the devices there are or shares one with the target."""
    shape, first = parse_draft_mesh(mesh)
    devices = jax.devices()
    need = math.prod(shape.values())
    if first + need > len(devices):
        raise ValueError(f"speculative mesh {mesh!r} needs devices {first}..{first + need - 1} "
                         f"but there are {len(devices)} (0..{len(devices) - 1})")
    chosen = devices[first:first + need]
    target_ids = sorted(d.id for d in target.mesh.devices.flat)
    shared = sorted({d.id for d in chosen} & set(target_ids))
    if shared:
        raise ValueError(f"speculative mesh {mesh!r} overlaps the target's devices "
                         f"{target_ids} (device {shared[0]}): give the draft devices of its own, "
                         f"e.g. '@{len(target_ids)}', or no mesh to share the target's")
    return Layout.create(shape, rules, devices=chosen)


def check_vocabulary(target_config, target_tokenizer, draft_config, draft_tokenizer,
                     draft_dir: str | Path) -> None:
    """Refuse a draft whose vocabulary is not the target's: the vocabulary size, and with both
    tokenizers the special ids and every token."""
    def refuse(what: str, draft, target):
        raise ValueError(f"the draft model {str(draft_dir)!r} does not share the target's "
                         f"vocabulary: its {what} is {draft!r}, the target's {target!r}")

    if draft_config.vocab_size != target_config.vocab_size:
        refuse("vocab_size", draft_config.vocab_size, target_config.vocab_size)
    if target_tokenizer is None or draft_tokenizer is None:
        return
    for what in ("vocab_size", "bos_id", "eos_ids", "special_ids"):
        draft, target = getattr(draft_tokenizer, what), getattr(target_tokenizer, what)
        if draft != target:
            refuse(f"tokenizer's {what}", sorted(draft) if what == "special_ids" else draft,
                   sorted(target) if what == "special_ids" else target)
    if Path(draft_tokenizer.model_path).read_bytes() == \
            Path(target_tokenizer.model_path).read_bytes():
        return
    for i in range(target_tokenizer.vocab_size):
        draft = draft_tokenizer.decode([i], skip_special_tokens=False)
        target = target_tokenizer.decode([i], skip_special_tokens=False)
        if draft != target:
            refuse(f"token {i}", draft, target)
