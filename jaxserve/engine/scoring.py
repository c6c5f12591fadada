"""Prefill-only scoring: the log-probability of candidate continuations of a prompt, and the
top-N next tokens after it. Nothing is sampled and no KV outlives the call.

How a prompt runs (the decision): its prompt is prefilled ONCE and every candidate reads it.
The prompt splits at the last block boundary before its last token, B = (P - 1) // bs * bs:

    shared prefix   prompt[:B]                          run once, in its own blocks
    one branch per  prompt[B:] + candidate[:-1]         starts at position B; its block table is
    candidate                                           the prefix's blocks, then its own

A branch recomputes at most one block of the prompt (its tail, which holds the last prompt
token whose logits score the candidate's first token), so no block is ever written by two
sequences and sharing needs no copy; a candidate costs its own length plus less than a block,
never the whole prompt again. Candidate token j is scored at the branch's token before it:
log_softmax(logits)[candidate[j]]. The last candidate token is scored, never run. With no
candidates (top-N only) the one branch is prompt[B:].

Steps: the pieces (prefix, then its branches) run in order as prefill chunks, packed into steps
by the engine's budgets (max_num_batched_tokens per DP replica in query tiles,
max_prefill_chunk per chunk) and by free KV blocks, so long prompts and many candidates split
over several steps. Within one step every token's KV is written before any is read (the
attention op's contract: a prefill chunk's tiles rely on it too), so a branch may run in the
same step as the prefix it reads. Blocks come from the engine's block pools, so scoring
can share the pool with running requests; a branch's blocks are freed after its last step, the
prefix's after its last branch. The device returns only the scored tokens' log-probs and the
top-N rows, never [tokens, vocab] logits.

A `ScoreRun` is driven one step at a time by whoever owns the engine (`LLM.score`, or the
serving loop between engine steps); it never touches requests. Each step is read back before
the next is packed (its finished pieces' blocks are free for the next), so scoring steps do not
overlap one another; they still queue behind generation steps in flight, through the KV pool
every program takes and returns.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from jaxserve import flops
from jaxserve.engine.step_builder import QUERY_TILE, ScoreRow
from jaxserve.ops.attention import ChunkRow

if TYPE_CHECKING:
    from jaxserve.engine.engine import Engine


@dataclasses.dataclass
class ScoreJob:
    """One prompt to score, validated (see `LLM.prepare_score`). Texts ride along for output."""

    prompt_ids: list[int]
    candidates: list[list[int]]
    top_n: int
    prompt: str | None = None
    candidate_texts: list[str | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class JobScores:
    """What a job's steps produced: per candidate one log-prob per token; the top-N list."""

    token_logprobs: list[list[float]]
    top: list[tuple[int, float]]


@dataclasses.dataclass
class _Piece:
    """A run of one job's tokens, prefilled as one sequence (maybe over several steps)."""

    job: int
    tokens: list[int]
    start: int  # position of tokens[0]
    # (candidate, its token j, row at an offset into `tokens`); candidate -1: the top row only
    rows: list[tuple[int, int, ScoreRow]]
    prefix: _Piece | None = None  # the shared prefix a branch reads
    own_blocks: int = 0
    blocks: list[int] | None = None  # held from its first chunk until nobody reads them
    computed: int = 0  # tokens packed into steps so far
    readers: int = 0  # a prefix: branches not finished yet

    @property
    def table(self) -> list[int]:
        shared = self.prefix.blocks if self.prefix is not None else []
        return shared + self.blocks


class ScoreRun:
    def __init__(self, engine: Engine, jobs: list[ScoreJob]):
        self.engine = engine
        self.pools = engine.pools
        self.block_size = engine.runner.block_size
        self.budget = engine.config.max_num_batched_tokens // QUERY_TILE * QUERY_TILE
        self.chunk = min(engine.config.max_prefill_chunk, self.budget)
        self.jobs = jobs
        self.scores = [JobScores([[0.0] * len(c) for c in job.candidates], [])
                       for job in jobs]
        self._pieces_left = [0] * len(jobs)
        # each job runs on one DP replica: the one with the least work queued so far, in true
        # FLOPs (a long prompt's attention weighs what it costs)
        self.pieces: list[list[_Piece]] = [[] for _ in self.pools]  # every piece, to free
        self.queues: list[list[_Piece]] = [[] for _ in self.pools]  # pieces not finished
        load = [0] * len(self.pools)
        for i, job in enumerate(jobs):
            replica = min(range(len(load)), key=lambda r: (load[r], r))
            pieces = self._pieces(i, job)
            self.pieces[replica] += pieces
            self.queues[replica] += pieces
            self._pieces_left[i] = len(pieces)
            load[replica] += sum(flops.chunk_flops(engine.model_config, p.start,
                                                   p.start + len(p.tokens), len(p.rows))
                                 for p in pieces)

    @property
    def done(self) -> bool:
        return not any(self.queues)

    def _pieces(self, index: int, job: ScoreJob) -> list[_Piece]:
        prompt, bs = job.prompt_ids, self.block_size
        b = (len(prompt) - 1) // bs * bs
        prefix = _Piece(index, prompt[:b], 0, [], own_blocks=b // bs) if b else None
        last = len(prompt) - 1 - b  # the last prompt token's offset in a branch
        branches = []
        for c, cand in enumerate(job.candidates):
            rows = [(c, j, ScoreRow(last + j, t, want_top=(c == 0 and j == 0 and job.top_n > 0)))
                    for j, t in enumerate(cand)]
            branches.append(_Piece(index, prompt[b:] + cand[:-1], b, rows, prefix))
        if not branches:
            branches.append(_Piece(index, prompt[b:], b, [(-1, 0, ScoreRow(last, 0, True))],
                                   prefix))
        for branch in branches:
            branch.own_blocks = -(-(branch.start + len(branch.tokens)) // bs) - b // bs
        if prefix is None:
            return branches
        prefix.readers = len(branches)
        return [prefix] + branches

    def step(self) -> list[int] | None:
        """Run one step; returns the jobs it finished, or None when no piece could start (its
        blocks are not free: running requests hold them)."""
        packed = [self._pack(r) for r in range(len(self.queues))]
        if not any(packed):
            return None
        inputs, rows = self.engine.builder.score_step(
            [[(p.tokens[s:s + n], ChunkRow(p.start + s, n, p.table),
               [dataclasses.replace(row, offset=row.offset - s) for _, _, row in scored])
              for p, s, n, scored in chunks] for chunks in packed])
        self.engine.flops.record_chunks(
            [(p.start + s, n, len(scored)) for chunks in packed for p, s, n, scored in chunks],
            inputs, "score")
        out = self.engine.runner.score(inputs)
        logprob = np.asarray(out.logprob)
        wants_top = bool(inputs.want_top.any())
        top_ids = np.asarray(out.top_ids) if wants_top else None
        top_lps = np.asarray(out.top_logprobs) if wants_top else None
        finished = []
        for r, chunks in enumerate(packed):
            k = r * rows  # replica r's first output row
            for piece, s, n, scored in chunks:
                job, scores = self.jobs[piece.job], self.scores[piece.job]
                for c, j, row in scored:
                    if c >= 0:
                        scores.token_logprobs[c][j] = float(logprob[k])
                    if row.want_top:
                        scores.top = list(zip(top_ids[k, :job.top_n].tolist(),
                                              top_lps[k, :job.top_n].tolist()))
                    k += 1
                if s + n == len(piece.tokens) and self._finish(piece, r):
                    finished.append(piece.job)
        return finished

    def _pack(self, replica: int) -> list[tuple[_Piece, int, int, list]]:
        """The next chunks of this replica's pieces, in order, while budget and blocks last:
        (piece, first token, tokens, its score rows). Stops at a piece that does not finish in
        this step, since the pieces after it may read it."""
        pool = self.pools[replica]
        room, chunks = self.budget, []
        for piece in self.queues[replica]:
            n = min(len(piece.tokens) - piece.computed, self.chunk, room)
            if n <= 0:
                break
            if piece.blocks is None:
                if piece.own_blocks > pool.num_free:
                    break
                piece.blocks = pool.allocate(piece.own_blocks)
            s = piece.computed
            chunks.append((piece, s, n, [cr for cr in piece.rows if s <= cr[2].offset < s + n]))
            piece.computed += n
            room -= -(-n // QUERY_TILE) * QUERY_TILE
            if piece.computed < len(piece.tokens):
                break
        return chunks

    def _finish(self, piece: _Piece, replica: int) -> bool:
        """A piece ran its last chunk: free what nobody reads any more. True if its job is done."""
        self.queues[replica].remove(piece)
        if not piece.readers:  # a prefix waits for its branches
            self._free(piece, replica)
        if piece.prefix is not None:
            piece.prefix.readers -= 1
            if piece.prefix.readers == 0:
                self._free(piece.prefix, replica)
        self._pieces_left[piece.job] -= 1
        return self._pieces_left[piece.job] == 0

    def _free(self, piece: _Piece, replica: int) -> None:
        if piece.blocks is not None:
            self.pools[replica].release(piece.blocks)
            piece.blocks = None

    def release(self) -> None:
        """Give back every block still held (the run is abandoned: cancelled or failed)."""
        for replica, pieces in enumerate(self.pieces):
            for piece in pieces:
                self._free(piece, replica)
            self.queues[replica].clear()
