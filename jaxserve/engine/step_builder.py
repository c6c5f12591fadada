"""The step builder: a scheduler plan -> one step's input arrays, in one of a few bucketed shapes.

A step is one program (see jaxserve/ops/attention.py for the token layout): per DP replica,
`decode_rows` decode tokens then `prefill_tokens` tokens of query tiles; one sample row per
decode, and in a step with prefill `max_prefill_rows` rows for the chunks that end a prefill
(and the siblings forked from them). The shape of a step is the pair (decode_rows, prefill_tokens),
each rounded up to a bucket, so a handful of programs serve every mix:

- decode-only steps: decode_rows in 1, 4, 8, 16, ... up to max_num_seqs (with speculation, a
  sequence's last token and each of its proposals is a decode row: those buckets times 1 + k,
  within the token budget, and 1; a speculative engine's decode-only steps in which nobody
  proposes are a plain builder's, in its buckets: jaxserve/engine/engine.py);
- steps with prefill: prefill_tokens in 2, 4, 8, ... tiles up to max_num_batched_tokens, and
  decode_rows in a coarser set (0, a small bucket, max_num_seqs): a few padded decode rows cost
  little next to a prefill chunk, and each extra bucket is a program to compile.

`shapes()` lists them all; `Engine.warmup` compiles exactly those (jaxserve/engine/warmup.py
decides in which order). A step may also run in a larger shape than its bucket (`covering`):
padding rows write only the null blocks and the trash slot, so while the warm-up compiles the
rest, a step whose bucket is not compiled yet runs in a compiled shape that holds it instead of
waiting. This module never
calls a model: it builds numpy arrays, and the runner dispatches them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from jaxserve.engine.scheduler import DeviceDrafts, StepPlan
from jaxserve.engine.sequence import Sequence
from jaxserve.ops.attention import ChunkRow, build_metadata, table_width
from jaxserve.runtime.runner import (MAX_SUPPRESSED, ScoreInputs, StepInputs, VerifyRows,
                                     bucket)
from jaxserve.runtime.sampling import SamplingInputs
from jaxserve.settings import SchedulerSettings

QUERY_TILE = 16  # prefill tokens per attention row
SMALL_MIXED_DECODES = 8


def powers_of_two(limit: int, start: int = 1) -> list[int]:
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return out + [bucket(limit, start)]


@dataclasses.dataclass
class StepLayout:
    """Where each sequence of a planned step sits in its arrays (for reading results back)."""

    inputs: StepInputs
    sample_rows: list[tuple[int, Sequence]]  # (row of the step's outputs, sequence) that sample
    wants_logprobs: bool
    # rows of a speculative step's decode runs that verify proposals, whose tokens the step's
    # `emitted` selects
    verify_rows: frozenset[int] = frozenset()
    run_starts: frozenset[int] = frozenset()  # with trees: the first row of every run
    # with trees: a branch node's row -> (its tree slot, its position's slot), local slot ids:
    # where its KV moves when its branch is kept
    tree_moves: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # proposals on the device (DeviceDrafts): per sequence, the rows that verify them, in order
    # (the draft's round lays its proposals out there: `VerifyRows.draft`, `draft_probs`)
    device_draft_rows: dict[Sequence, list[int]] = dataclasses.field(default_factory=dict)


class StepBuilder:
    def __init__(self, limits: SchedulerSettings, num_replicas: int, *, block_size: int,
                 trash_slot: int, vocab_rows: int, eos_ids: tuple[int, ...],
                 speculative_tokens: int = 0, sampled_drafts: bool = False,
                 trees: bool = False):
        """limits: resolved (max_model_len known), per DP replica. speculative_tokens: k, the
        most proposals a decoding sequence verifies per step (0: no speculation).
        sampled_drafts: proposals may come with their draft distribution q (a draft model):
        the step carries q for every row (`VerifyRows.draft_probs`). trees: proposals may
        come as a token tree, `plan.branches` beside `plan.drafts` (speculative_tokens then
        counts every row a sequence may have past its first)."""
        max_num_seqs, max_num_batched_tokens = limits.max_num_seqs, limits.max_num_batched_tokens
        self.speculative = speculative_tokens > 0
        self.sampled_drafts = sampled_drafts
        self.trees = trees
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.width = table_width(math.ceil(limits.max_model_len / block_size), block_size)
        self.trash_slot = trash_slot
        self.vocab_rows = vocab_rows
        self.eos_ids = eos_ids
        self.max_prefill_rows = limits.max_prefill_rows
        # 2 and 3 decodes pad to 4, a prefill of one tile to two: the weight products cost the
        # same at those sizes, and each bucket dropped is a program less to compile.
        self.decode_buckets = [1] + powers_of_two(max_num_seqs, start=4)
        if self.speculative:
            # a run is 1 + k rows: sequences' buckets times that, not the next power of two
            # (one sequence verifying k = 4 runs 5 rows, not 8); 1 for a step without proposals
            run = 1 + speculative_tokens
            self.decode_buckets = sorted({1} | {min(run * b, max(max_num_seqs,
                                                                 max_num_batched_tokens))
                                                for b in self.decode_buckets})
        self.mixed_decode_buckets = sorted({0, min(SMALL_MIXED_DECODES, self.decode_buckets[-1]),
                                            self.decode_buckets[-1]})
        self.prefill_buckets = [QUERY_TILE * n for n in
                                powers_of_two(-(-max_num_batched_tokens // QUERY_TILE), start=2)]

    def shapes(self) -> list[tuple[int, int]]:
        """Every (decode_rows, prefill_tokens) a step can have."""
        return ([(d, 0) for d in self.decode_buckets]
                + [(d, p) for p in self.prefill_buckets for d in self.mixed_decode_buckets])

    def shape_for(self, decodes: int, prefill_tokens: int) -> tuple[int, int]:
        if prefill_tokens == 0:
            return next(b for b in self.decode_buckets if b >= decodes), 0
        return (next(b for b in self.mixed_decode_buckets if b >= decodes),
                next(b for b in self.prefill_buckets if b >= prefill_tokens))

    def covering(self, decodes: int, prefill_tokens: int) -> list[tuple[int, int]]:
        """Every shape a step of `decodes` decodes and `prefill_tokens` prefill tokens (per
        replica) fits in, the cheapest (fewest tokens, then fewest sample rows) first: its own
        bucket, then larger ones. A decode-only step fits a shape with prefill tokens too."""
        fits = [(d, p) for d, p in self.shapes() if d >= decodes and p >= prefill_tokens]
        return sorted(fits, key=lambda s: (s[0] + s[1], self.sample_rows_per_replica(*s)))

    def sample_rows_per_replica(self, decode_rows: int, prefill_tokens: int) -> int:
        """One row per decode; a step with prefill has max_prefill_rows more, one per chunk
        that ends a prefill and one per sibling forked from it (see scheduler.py)."""
        return decode_rows + (self.max_prefill_rows if prefill_tokens else 0)

    # ---- a planned step ----
    def build(self, plan: StepPlan,
              shape_for: Callable[[int, int], tuple[int, int]] | None = None) -> StepLayout:
        """The step's arrays, in the shape `shape_for(decodes, prefill_tokens)` picks (one that
        holds them; default: their bucket, `self.shape_for`)."""
        n = self.num_replicas
        decodes = [[] for _ in range(n)]
        chunks = [[] for _ in range(n)]
        for seq in plan.decodes:
            decodes[seq.replica].append(seq)
        for chunk in plan.prefills:
            chunks[chunk.seq.replica].append(chunk)
        prefill_tokens = max(sum(-(-c.length // QUERY_TILE) * QUERY_TILE for c in cs)
                             for cs in chunks)
        # Each decode row: (sequence, offset in its run, its input token or None = the slot's
        # last token, the proposal it verifies or -1, its tree slots or None, where its KV
        # moves or None). Without speculation a run is one row. A run's later rows are fed,
        # on the device, the proposal the row before verifies (verify.feed_proposals).
        runs = [[(s,) + row for s in decodes[r] for row in self._run(s, plan)]
                for r in range(n)]
        d_rows, p_tokens = (shape_for or self.shape_for)(max(len(d) for d in runs),
                                                         prefill_tokens)
        rows = [([ChunkRow(s.total_len - 1 + j, 1, s.blocks, tree)
                  for s, j, _, _, tree, _ in runs[r]],
                 [ChunkRow(c.start, c.length, c.seq.blocks) for c in chunks[r]])
                for r in range(n)]
        md, first = build_metadata(rows, d_rows, p_tokens, QUERY_TILE, self.block_size,
                                   self.width, trees=self.trees)
        t_loc = d_rows + p_tokens
        s_loc = self.sample_rows_per_replica(d_rows, p_tokens)
        tokens = np.zeros((n, t_loc), np.int32)
        token_slot = np.full((n, t_loc), -1, np.int32)
        sample_index = np.zeros((n, s_loc), np.int32)
        slot_ids = np.full((n, s_loc), self.trash_slot, np.int32)
        sample = np.zeros((n, s_loc), np.bool_)
        row_seqs: list[Sequence | None] = [None] * (n * s_loc)
        offsets = [0] * (n * s_loc)  # the row's token index after the sequence's scheduled ones
        draft = np.full((n * s_loc,), -1, np.int32)
        run_start = np.arange(n * s_loc, dtype=np.int32)
        group_start = np.arange(n * s_loc, dtype=np.int32)  # a sequence's first row
        moves: dict[int, tuple[int, int]] = {}
        sample_rows = []

        def add_row(r: int, row: int, token: int, seq: Sequence) -> None:
            sample_index[r, row] = r * t_loc + token
            slot_ids[r, row] = seq.slot
            sample[r, row] = True
            row_seqs[r * s_loc + row] = seq
            sample_rows.append((r * s_loc + row, seq))

        firsts: dict[Sequence, int] = {}  # a decoding sequence's first flat row
        for r in range(n):
            for i, (seq, j, token, proposal, _, move) in enumerate(runs[r]):
                if token is None:
                    token_slot[r, i] = seq.slot
                else:
                    tokens[r, i] = token
                add_row(r, i, i, seq)
                flat = r * s_loc + i
                offsets[flat] = j
                draft[flat] = proposal
                run_start[flat] = flat - j
                group_start[flat] = firsts.setdefault(seq, flat)
                if move is not None:
                    moves[flat] = tuple(self._slot(seq, pos) for pos in move)
            row = d_rows
            for k, c in enumerate(chunks[r]):
                seq, f, end = c.seq, first[r, len(runs[r]) + k], c.start + c.length
                prompt = seq.request.prompt_ids
                tokens[r, f:f + c.length] = prompt[c.start:end] if end <= len(prompt) else \
                    [seq.prefill_token(i) for i in range(c.start, end)]
                # the chunk's last token samples for the sequence, and for its forked siblings
                for sampler in ([seq] if c.samples else []) + c.forks:
                    add_row(r, row, f + c.length - 1, sampler)
                    row += 1
        device_rows = {seq: [firsts[seq] + j for j in range(len(d))]
                       for seq, d in plan.drafts.items()
                       if isinstance(d, DeviceDrafts) and d and seq in firsts}
        sampling, suppressed, want = self.sampling_columns(row_seqs, offsets)
        # q of proposals on the device comes with them (`fill_step`), for every row
        probs = None if device_rows else self._draft_probs(runs, plan, s_loc)
        verify = VerifyRows(draft, run_start, probs,
                            group_start if self.trees else None) if self.speculative else None
        inputs = StepInputs(tokens.reshape(-1), token_slot.reshape(-1), md,
                            sample_index.reshape(-1), slot_ids.reshape(-1), sample.reshape(-1),
                            want, suppressed, sampling, verify)
        # rows of runs that verify proposals (a decode without any is a plain one)
        verifying = frozenset(r * s_loc + i for r in range(n)
                              for i, run in enumerate(runs[r]) if plan.drafts.get(run[0]))
        return StepLayout(inputs, sample_rows, bool(want.any()), verifying,
                          frozenset(int(x) for x in set(run_start[list(verifying)]))
                          if self.trees else frozenset(), moves, device_rows)

    def _draft_probs(self, runs, plan: StepPlan, s_loc: int) -> np.ndarray | None:
        """q of every row's proposal, f32[rows, vocab_rows] (zeros: a point mass or none)."""
        if not self.sampled_drafts:
            return None
        probs = np.zeros((self.num_replicas * s_loc, self.vocab_rows), np.float32)
        for r, rows in enumerate(runs):
            for i, (seq, j, _, proposal, _, _) in enumerate(rows):
                q = plan.draft_probs.get(seq)
                if q is not None and proposal >= 0:
                    probs[r * s_loc + i] = q[j]
        return probs

    def _run(self, seq: Sequence, plan: StepPlan) -> list[tuple]:
        """A decoding sequence's rows: (offset in its run, input token, proposal verified, tree
        slots, KV move). Without proposals one row whose token stays on the device; with them,
        the last token (read back: proposals start from read-back tokens) and then one row per
        proposal, whose input the step feeds from the row
        before (the host's 0 is not read); proposals on the device verify -1 here, replaced
        by the draft's round (StepLayout.device_draft_rows). A token tree is one run per
        branch, each starting from the last token (the same draw: same seed and token
        index): the first branch written at its positions, the others at tree slots after it,
        each node seeing the context and its own branch (jaxserve/ops/attention.py). A sequence
        without proposals is a plain decode in any step: its step need not have been read back."""
        if not plan.drafts.get(seq):
            return [(0, None, -1, None, None)]
        last = seq.total_len - 1  # the last token's position
        chains = [plan.drafts.get(seq) or []] + plan.branches.get(seq, [])
        out, used = [], 0  # used: tree slots the earlier branches took
        for c, chain in enumerate(chains):
            proposals = [-1] * len(chain) if isinstance(chain, DeviceDrafts) else list(chain)
            for j, proposal in enumerate(proposals + [-1]):
                token = seq.prefill_token(last) if j == 0 else 0
                tree = move = None
                if self.trees and j:
                    slot = last + used + j
                    tree = (slot, last + 1, ((1 << j) - 1) << used)
                    move = (slot, last + j) if c else None
                out.append((j, token, proposal, tree, move))
            used += len(chain)
        return out

    def _slot(self, seq: Sequence, position: int) -> int:
        """The local KV slot (block * block_size + offset) of a sequence's position."""
        return seq.blocks[position // self.block_size] * self.block_size + \
            position % self.block_size

    def slot_pairs(self, moves: list[tuple[int, int]], size: int) -> np.ndarray:
        """KV slot moves as the runner's copy_slots [1, size x 2^n, 2] (one DP replica): size
        (a tree's nodes) per sequence that commits a branch, doubled until all fit (several
        sequences may commit in one step; few shapes)."""
        while size < len(moves):
            size *= 2
        pairs = np.zeros((1, size, 2), np.int32)
        pairs[0, :len(moves)] = moves
        return pairs

    def sampling_columns(self, row_seqs: list[Sequence | None], offsets: list[int] | None = None):
        rows = len(row_seqs)
        offsets = offsets or [0] * rows
        counters = [s.num_scheduled_outputs + o if s is not None else 0
                    for s, o in zip(row_seqs, offsets)]
        sampling = SamplingInputs.from_params(
            [s.params if s is not None else None for s in row_seqs],
            [s.seed if s is not None else 0 for s in row_seqs], counters, rows)
        suppressed = np.full((rows, MAX_SUPPRESSED), self.vocab_rows, np.int32)
        want_logprobs = np.zeros((rows,), np.bool_)
        for r, seq in enumerate(row_seqs):
            if seq is None:
                continue
            params = seq.params
            want_logprobs[r] = params.logprobs is not None
            if counters[r] < params.min_tokens:
                ids = self.eos_ids + tuple(params.stop_token_ids)
                suppressed[r, :len(ids)] = ids
        return sampling, suppressed, want_logprobs

    def idle(self, decode_rows: int, prefill_tokens: int) -> StepInputs:
        """A step of padding only: writes the null blocks and the trash slot, changes nothing."""
        n = self.num_replicas
        md, _ = build_metadata([([], [])] * n, decode_rows, prefill_tokens, QUERY_TILE,
                               self.block_size, self.width, trees=self.trees)
        t = n * (decode_rows + prefill_tokens)
        s = n * self.sample_rows_per_replica(decode_rows, prefill_tokens)
        sampling, suppressed, want = self.sampling_columns([None] * s)
        probs = np.zeros((s, self.vocab_rows), np.float32) if self.sampled_drafts else None
        rows = np.arange(s, dtype=np.int32)
        verify = VerifyRows(np.full((s,), -1, np.int32), rows, probs,
                            rows if self.trees else None) if self.speculative else None
        return StepInputs(np.zeros((t,), np.int32), np.full((t,), -1, np.int32), md,
                          np.zeros((s,), np.int32), np.full((s,), self.trash_slot, np.int32),
                          np.zeros((s,), np.bool_), want, suppressed, sampling, verify)

    # ---- beside the step ----
    @property
    def max_admissions(self) -> int:
        """Sequences that can take a slot in one step: a sample row each."""
        return self.num_replicas * self.max_prefill_rows

    def slot_rows(self, admitted: list[Sequence]):
        """The slot state of admitted sequences that use penalties, from their token ids: prompt
        mask and counts of the outputs generated before a preemption (see SlotState). None when
        no admitted sequence uses penalties."""
        seqs = [s for s in admitted if s.params.uses_penalties]
        if not seqs:
            return None
        k = self.max_admissions
        slots = np.full((k,), self.trash_slot, np.int32)
        mask = np.zeros((k, self.vocab_rows), np.bool_)
        counts = np.zeros((k, self.vocab_rows), np.int32)
        for i, seq in enumerate(seqs):
            slots[i] = seq.slot
            mask[i, seq.request.prompt_ids] = True
            np.add.at(counts[i], seq.output_ids, 1)
        return slots, mask, counts

    def copy_pairs(self, copies: list[tuple[int, int, int]]) -> np.ndarray:
        """(replica, source, destination) block copies as the runner's [replicas, rows, 2]."""
        pairs = np.zeros((self.num_replicas, self.max_prefill_rows, 2), np.int32)
        used = [0] * self.num_replicas
        for replica, src, dst in copies:
            pairs[replica, used[replica]] = src, dst
            used[replica] += 1
        return pairs

    def prefill_only(self, replicas: list[list[tuple[list[int], list[int]]]]):
        """Tokens and metadata of a step that prefills whole token lists (for `LLM.logits`):
        per replica, a list of (token ids, block table). Also returns, per replica, each list's
        first flat token index (global)."""
        tokens, md, first, p_tokens = self._prefill_chunks(
            [[(ids, ChunkRow(0, len(ids), table)) for ids, table in rs] for rs in replicas])
        starts = [[r * p_tokens + int(first[r, k]) for k in range(len(rs))]
                  for r, rs in enumerate(replicas)]
        return tokens, md, starts

    def score_step(self, replicas: list[list[tuple[list[int], ChunkRow, list[ScoreRow]]]]
                   ) -> tuple[ScoreInputs, int]:
        """The inputs of a scoring step (see jaxserve/engine/scoring.py): per replica, prefill
        chunks as (the chunk's token ids, its row, its score rows). Score rows are laid out
        replica after replica in the order given; returns the inputs and the rows per replica
        (replica r's k-th score row is output row r * rows + k)."""
        tokens, md, first, p_tokens = self._prefill_chunks(
            [[(ids, row) for ids, row, _ in rs] for rs in replicas])
        n = self.num_replicas
        rows = min(p_tokens, bucket(max(sum(len(s) for _, _, s in rs) for rs in replicas),
                                    QUERY_TILE))
        score_index = np.zeros((n, rows), np.int32)
        target = np.zeros((n, rows), np.int32)
        want_top = np.zeros((n, rows), np.bool_)
        for r, rs in enumerate(replicas):
            k = 0
            for c, (_, _, score_rows) in enumerate(rs):
                for row in score_rows:
                    score_index[r, k] = r * p_tokens + first[r, c] + row.offset
                    target[r, k] = row.target
                    want_top[r, k] = row.want_top
                    k += 1
        return ScoreInputs(tokens, md, score_index.reshape(-1), target.reshape(-1),
                           want_top.reshape(-1)), rows

    def _prefill_chunks(self, replicas: list[list[tuple[list[int], ChunkRow]]]):
        """Tokens and metadata of a step of prefill chunks only, per replica (token ids, row);
        also each chunk's first token index within its replica and the step's tokens per
        replica."""
        n = self.num_replicas
        need = max(sum(-(-row.length // QUERY_TILE) * QUERY_TILE for _, row in rs)
                   for rs in replicas)
        p_tokens = QUERY_TILE * bucket(-(-need // QUERY_TILE))
        md, first = build_metadata([([], [row for _, row in rs]) for rs in replicas], 0,
                                   p_tokens, QUERY_TILE, self.block_size, self.width)
        tokens = np.zeros((n, p_tokens), np.int32)
        for r, rs in enumerate(replicas):
            for k, (ids, _) in enumerate(rs):
                tokens[r, first[r, k]:first[r, k] + len(ids)] = ids
        return tokens.reshape(-1), md, first, p_tokens


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """A scored position of a prefill chunk: the log-prob of `target` as the next token after
    the chunk's token at `offset` (and the top tokens there, with want_top)."""

    offset: int
    target: int
    want_top: bool = False
