"""Draft-model proposals: a smaller model of the same vocabulary guesses the next k tokens.

Design (this file owns it):
- The draft is a second ModelRunner on the target's devices (same mesh, no sub-mesh yet), with
  its own KV pool, its own slot state and its own compiled programs. Its KV blocks and slots are
  allocated here, from a block pool of its own (no prefix cache): the target's scheduler never
  sees them.
- Per decoding sequence the draft keeps a shadow Sequence (whose "prompt" is the target
  sequence's prompt + outputs) and `valid`: how many of those tokens its KV holds. Outputs only
  ever grow, so positions below `valid` stay right; the proposals' KV past them is simply
  overwritten by the next catch-up (no copy, no rollback), and positions past a sequence's
  length are never read.
- One round (`propose_all`, every sequence batched into each step, no per-sequence loop):
  catch-up steps prefill each sequence's tokens past `valid` (chunked to the step budget); the
  chunk that ends a catch-up samples the first proposal. Then k - 1 decode steps over every
  sequence still proposing, each reading its last proposal from the draft's slot state on the
  device. The proposals are read back once, at the end.
- The draft decodes greedily for greedy requests (point masses: the target keeps exactly its
  greedy tokens) and samples for sampling ones, with the request's SamplingParams and a seed of
  its own per round, returning q of each proposal with it (proposals.py; the runner's steps
  return each row's distribution). Rejection sampling against q keeps the target's
  distribution exact (jaxserve/runtime/verify.py).
- A sequence holds draft blocks and a slot only while it is proposed for: one that finished, was
  preempted or is prefilling again gives them back at the next round (a preempted one catches up
  from scratch). A sequence the draft pool has no room for gets no proposals this round.

The draft's steps are built by the same StepBuilder as the target's; this module never calls a
model directly: it dispatches the draft runner's compiled step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxserve.engine.block_pool import BlockPool
from jaxserve.engine.id_pool import IdPool
from jaxserve.engine.scheduler import PrefillChunk, StepPlan
from jaxserve.engine.sequence import Request, Sequence
from jaxserve.engine.speculative.proposals import (GREEDY, Proposals, draft_params,
                                                   penalty_rows, round_seed)
from jaxserve.engine.step_builder import QUERY_TILE, StepBuilder
from jaxserve.settings import SchedulerSettings


@dataclasses.dataclass
class _DraftState:
    shadow: Sequence  # the draft's view of a target sequence: prompt_ids = its known tokens
    valid: int = 0  # leading tokens whose KV the draft's pool holds


class DraftProposer:
    def __init__(self, runner, limits: SchedulerSettings, k: int):
        """runner: the draft's ModelRunner (one DP replica); limits: the target's resolved
        scheduler settings (the draft's steps obey the same budget)."""
        self.runner, self.limits, self.k = runner, limits, k
        seqs = limits.max_num_seqs
        runner.init_slots(seqs)
        runner.set_output_probs(True)  # q of sampled proposals
        self.blocks = BlockPool(runner.blocks_per_replica, runner.block_size, caching=False)
        self.slots = IdPool(range(seqs))
        self.builder = StepBuilder(limits, 1, block_size=runner.block_size, trash_slot=seqs,
                                   vocab_rows=runner.config.vocab_rows, eos_ids=())
        self.states: dict[Sequence, _DraftState] = {}

    @property
    def num_blocks_used(self) -> int:
        return self.blocks.num_used

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
        shadow.request.params = draft_params(seq.params)
        shadow.seed = round_seed(seq.seed, len(seq.output_ids))
        shadow.num_scheduled_outputs = 0
        return state

    def propose_all(self, seqs: list[Sequence]) -> Proposals:
        """Proposals for decoding sequences whose outputs are all read back."""
        proposing = set(seqs)
        for gone in [s for s in self.states if s not in proposing]:
            self._release(gone)
        wanted: dict[Sequence, tuple[_DraftState, int]] = {}  # -> (state, proposals to make)
        for seq in seqs:
            tokens = seq.request.prompt_ids + seq.output_ids
            # proposals past max_tokens could never be kept (see Scheduler.schedule)
            m = min(self.k, seq.request.max_tokens - len(seq.output_ids) - 1)
            state = self._state(seq, tokens, len(tokens) + m - 1) if m > 0 else None
            if state is not None:
                wanted[seq] = state, m
        owner = {state.shadow: seq for seq, (state, _) in wanted.items()}
        self._set_penalties([(seq, state.shadow) for seq, (state, _) in wanted.items()])
        rows: list[tuple[object, int, Sequence]] = []  # (step outputs, row, target sequence)
        self._catch_up([state for state, _ in wanted.values()], owner, rows)
        for j in range(1, max((m for _, m in wanted.values()), default=0)):
            shadows = [state.shadow for state, m in wanted.values() if m > j]
            for shadow in shadows:
                shadow.num_scheduled_outputs = j  # its last proposal is at position len + j - 1
            layout = self.builder.build(StepPlan([], shadows))
            outputs = self.runner.step(layout.inputs)
            rows += [(outputs, row, owner[shadow]) for row, shadow in layout.sample_rows]
        proposals = Proposals({seq: [] for seq in seqs})
        sampled = {seq for seq, (state, _) in wanted.items() if state.shadow.params.temperature}
        read: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        for outputs, row, seq in rows:
            if id(outputs) not in read:
                read[id(outputs)] = (np.asarray(outputs.tokens),
                                     np.asarray(outputs.probs) if sampled else None)
            tokens, probs = read[id(outputs)]
            proposals.tokens[seq].append(int(tokens[row]))
            if seq in sampled:
                proposals.probs.setdefault(seq, []).append(probs[row])
        proposals.probs = {seq: np.stack(q) for seq, q in proposals.probs.items()}
        return proposals

    def _set_penalties(self, pairs: list[tuple[Sequence, Sequence]]) -> None:
        """Sampled proposals with penalties count the target's outputs: their draft slots start
        the round from the target's prompt mask and output counts."""
        pairs = [(seq, shadow) for seq, shadow in pairs
                 if shadow.params.temperature and shadow.params.uses_penalties]
        if pairs:
            self.runner.set_slots(*penalty_rows(
                [shadow.slot for _, shadow in pairs],
                [seq.request.prompt_ids for seq, _ in pairs],
                [seq.output_ids for seq, _ in pairs], self.limits.max_num_seqs,
                self.limits.max_num_seqs, self.runner.config.vocab_rows))

    def _catch_up(self, states: list[_DraftState], owner: dict, rows: list) -> None:
        """Prefill every state's tokens past `valid`, in steps within the budget; the chunk
        that ends a catch-up samples the first proposal."""
        limits = self.limits
        pending = list(states)
        while pending:
            budget, chunks = limits.max_num_batched_tokens, []
            for state in pending:
                total = len(state.shadow.request.prompt_ids)
                length = min(total - state.valid, limits.max_prefill_chunk,
                             budget // QUERY_TILE * QUERY_TILE)
                if length <= 0 or len(chunks) >= limits.max_prefill_rows:
                    break
                chunks.append(PrefillChunk(state.shadow, state.valid, length,
                                           state.valid + length == total))
                state.valid += length
                budget -= -(-length // QUERY_TILE) * QUERY_TILE
            layout = self.builder.build(StepPlan(chunks, []))
            outputs = self.runner.step(layout.inputs)
            rows += [(outputs, row, owner[shadow]) for row, shadow in layout.sample_rows]
            pending = [s for s in pending if s.valid < len(s.shadow.request.prompt_ids)]


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
