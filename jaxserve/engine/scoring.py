"""Prefill-only scoring: the log-probability of candidate continuations of a prompt, and the
top-N next tokens after it. Nothing is sampled and no block stays held after the call; its full
blocks stay in the prefix cache, as a finished generation's do.

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

The prefix cache (jaxserve/engine/block_pool.py), shared with generation: a prefix takes the
longest run of its blocks its replica has cached (by another job of this run, an earlier call,
or a generation with the same prompt) and computes only the rest; fully cached, it runs
nothing. A branch never looks up: every token from the prompt's last on is a scored row, and
the ones before it are inside block B. Every full block a piece computes is named (entered into
the cache) as soon as the step that writes it is packed, with the hashes generation uses (the
prompt's tokens, then the candidate's, chained from the engine's root hash), so a later prefix
in the same step may read it (the attention op writes every token's KV before any is read) and
a later generation of prompt + candidate hits it. Freed blocks stay cached until the pool
evicts them. Engine counters: `score_prefix_cache_queries` (prompt tokens of started jobs),
`score_prefix_cache_hits` (those found cached), `score_prefill_tokens` (tokens computed).

Routing: each job runs on one DP replica, chosen when the run is made by the engine's routing
policy (jaxserve/engine/router.py) from one `ReplicaView` per replica: the prompt tokens cached
there or computed there by earlier jobs of this run, and the replica's load in true FLOPs
(running generation plus this run's jobs, each costing what its uncached tokens cost). So jobs
sharing a prefix gather on the replica that holds it. Scoring takes no sequence slot: every
replica shows one free.

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
from jaxserve.engine.block_pool import BlockHash, BlockPool, chain_hashes
from jaxserve.engine.router import ReplicaView, choose_replica
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
    """A run of one job's tokens, prefilled as one sequence (maybe over several steps). Its
    tokens start at a block boundary (position 0 or B)."""

    job: int
    tokens: list[int]
    start: int  # position of tokens[0]
    # (candidate, its token j, row at an offset into `tokens`); candidate -1: the top row only
    rows: list[tuple[int, int, ScoreRow]]
    prefix: _Piece | None = None  # the shared prefix a branch reads
    own_blocks: int = 0
    hashes: list[BlockHash] = dataclasses.field(default_factory=list)  # of its full blocks
    reads_cache: bool = False  # a prefix: starts at the longest run of its blocks cached
    query_tokens: int = 0  # the job's first piece: its prompt tokens (counted when it starts)
    blocks: list[int] | None = None  # held from its first chunk until nobody reads them
    computed: int = 0  # tokens cached or packed into steps so far
    named: int = 0  # its blocks entered into the prefix cache
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
        self.caching = self.pools[0].caching
        self.root_hash = engine.scheduler.root_hash  # what generation's hashes chain from
        self.jobs = jobs
        self.scores = [JobScores([[0.0] * len(c) for c in job.candidates], [])
                       for job in jobs]
        self._pieces_left = [0] * len(jobs)
        self.pieces: list[list[_Piece]] = [[] for _ in self.pools]  # every piece, to free
        self.queues: list[list[_Piece]] = [[] for _ in self.pools]  # pieces not finished
        self.replica_of: list[int] = []  # per job
        loads = engine.scheduler.replica_loads() if len(self.pools) > 1 else [0]
        planned: list[set[BlockHash]] = [set() for _ in self.pools]  # computed here by this run
        for i, job in enumerate(jobs):
            pieces = self._pieces(i, job)
            hashes = pieces[0].hashes if pieces[0].reads_cache else []
            cached = [self._cached_blocks(hashes, pool, planned[r])
                      for r, pool in enumerate(self.pools)]
            replica = choose_replica(engine.router, [
                ReplicaView(r, cached[r] * self.block_size, loads[r], pool.num_free, 1)
                for r, pool in enumerate(self.pools)]) if len(self.pools) > 1 else 0
            self.replica_of.append(replica)
            self.pieces[replica] += pieces
            self.queues[replica] += pieces
            self._pieces_left[i] = len(pieces)
            skip = cached[replica] * self.block_size  # a prefix's cached tokens cost nothing
            loads[replica] += sum(self._flops(p, skip if p.reads_cache else 0) for p in pieces)
            if self.caching:
                planned[replica].update(h for p in pieces for h in p.hashes)

    def _flops(self, piece: _Piece, skip: int) -> int:
        """True FLOPs of a piece's tokens after its first `skip`."""
        return flops.chunk_flops(self.engine.model_config, piece.start + skip,
                                 piece.start + len(piece.tokens), len(piece.rows))

    @staticmethod
    def _cached_blocks(hashes: list[BlockHash], pool: BlockPool, planned: set[BlockHash]) -> int:
        """How many of a prefix's leading blocks a replica has cached or will have computed."""
        n = len(pool.cached_prefix(hashes))
        while n < len(hashes) and hashes[n] in planned:
            n += 1
        return n

    @property
    def done(self) -> bool:
        return not any(self.queues)

    def _pieces(self, index: int, job: ScoreJob) -> list[_Piece]:
        prompt, bs = job.prompt_ids, self.block_size
        b = (len(prompt) - 1) // bs * bs
        prefix = _Piece(index, prompt[:b], 0, [], own_blocks=b // bs, reads_cache=True) \
            if b else None
        last = len(prompt) - 1 - b  # the last prompt token's offset in a branch
        branches = []
        for c, cand in enumerate(job.candidates):
            rows = [(c, j, ScoreRow(last + j, t, want_top=(c == 0 and j == 0 and job.top_n > 0)))
                    for j, t in enumerate(cand)]
            branches.append(_Piece(index, prompt[b:] + cand[:-1], b, rows, prefix))
        if not branches:
            branches.append(_Piece(index, prompt[b:], b, [(-1, 0, ScoreRow(last, 0, True))],
                                   prefix))
        if self.caching and prefix is not None:
            prefix.hashes = chain_hashes(prefix.tokens, bs, self.root_hash)
        for branch in branches:
            branch.own_blocks = -(-(branch.start + len(branch.tokens)) // bs) - b // bs
            if self.caching:
                parent = prefix.hashes[-1] if prefix is not None else self.root_hash
                branch.hashes = chain_hashes(branch.tokens, bs, parent)
        pieces = branches if prefix is None else [prefix] + branches
        pieces[0].query_tokens = len(prompt)
        if prefix is not None:
            prefix.readers = len(branches)
        return pieces

    def step(self) -> list[int] | None:
        """Run one step; returns the jobs it finished, or None when no piece could start (its
        blocks are not free: running requests hold them)."""
        packed = [self._pack(r) for r in range(len(self.queues))]
        if not any(packed):
            return None
        # a fully cached prefix is packed with no tokens: it finishes without running
        running = [[c for c in chunks if c[2]] for chunks in packed]
        logprob = top_ids = top_lps = rows = None
        if any(running):
            inputs, rows = self.engine.builder.score_step(
                [[(p.tokens[s:s + n], ChunkRow(p.start + s, n, p.table),
                   [dataclasses.replace(row, offset=row.offset - s) for _, _, row in scored])
                  for p, s, n, scored in chunks] for chunks in running])
            chunk_list = [(p.start + s, n, len(scored))
                          for chunks in running for p, s, n, scored in chunks]
            self.engine.flops.record_chunks(chunk_list, inputs, "score")
            self.engine.counters["score_prefill_tokens"] += sum(n for _, n, _ in chunk_list)
            out = self.engine.runner.score(inputs)
            logprob = np.asarray(out.logprob)
            wants_top = bool(inputs.want_top.any())
            top_ids = np.asarray(out.top_ids) if wants_top else None
            top_lps = np.asarray(out.top_logprobs) if wants_top else None
        finished = []
        for r, chunks in enumerate(packed):
            k = r * rows if rows is not None else 0  # replica r's first output row
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
            if room <= 0 or (piece.blocks is None and not self._start(piece, pool)):
                break
            s = piece.computed
            n = min(len(piece.tokens) - s, self.chunk, room)
            chunks.append((piece, s, n, [cr for cr in piece.rows if s <= cr[2].offset < s + n]))
            piece.computed += n
            room -= -(-n // QUERY_TILE) * QUERY_TILE
            self._name(piece, pool)
            if piece.computed < len(piece.tokens):
                break
        return chunks

    def _start(self, piece: _Piece, pool: BlockPool) -> bool:
        """Give a piece its blocks (a prefix: its cached ones first); False if they are not
        free."""
        hit = pool.cached_prefix(piece.hashes) if piece.reads_cache else []
        fresh = piece.own_blocks - len(hit)
        if fresh > pool.num_free - pool.num_evictable_among(hit):
            return False
        pool.share(hit)
        piece.blocks = hit + pool.allocate(fresh)
        piece.computed = len(hit) * self.block_size
        piece.named = len(hit)
        if self.caching and piece.query_tokens:
            self.engine.counters["score_prefix_cache_queries"] += piece.query_tokens
            self.engine.counters["score_prefix_cache_hits"] += piece.computed
        return True

    def _name(self, piece: _Piece, pool: BlockPool) -> None:
        """Enter the piece's full blocks that packed steps compute into the prefix cache."""
        full = min(piece.computed // self.block_size, len(piece.hashes))
        for i in range(piece.named, full):
            pool.name(piece.blocks[i], piece.hashes[i])
        piece.named = max(piece.named, full)

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
