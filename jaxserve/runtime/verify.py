"""Verifying proposed tokens inside the step: acceptance on the device, one program for the batch.

A speculative step lays each decoding sequence out as a *run* of consecutive sample rows: its
last token, then its proposals d_1..d_m (the attention op makes the rows causal: each reads the
KV the earlier rows of the step wrote). Row j's logits give the target distribution p_j of the
token after row j's input; row j < m verifies d_{j+1}, the run's last row has no proposal and
draws the bonus token. A prefill chunk's sample row is a run of one row without a proposal.
The input of row j >= 1 is the proposal row j - 1 verifies, taken from the step's `draft` on
the device (`feed_proposals`): proposals a draft model left on the device (laid out as
`draft` by its round) are never read by the host before they are verified.

Per row, with the sequence's SamplingParams applied to the target logits exactly as a plain
step applies them (penalties counting the run's earlier proposals as generated, suppressed
tokens, temperature, top_k / top_p / min_p), p is the distribution the plain step draws from:

- a point-mass proposal d (prompt lookup; a draft model decoding greedily): the row draws its
  token t from p exactly as a plain step's row would (same seed, same token index), and d is
  kept iff t = d. This is rejection sampling with the residual (Leviathan et al. 2023, Chen et
  al. 2023) for q = a point mass on d: d is kept with probability p(d) = min(1, p(d) / q(d)),
  and a rejected row's token is t ~ p given t != d, which is the residual max(0, p - q)
  renormalised. Drawn with the plain step's random numbers, every token is the one plain
  decoding draws there (greedy: d is kept iff it is p's argmax);
- a proposal drawn from a full distribution q (a draft model sampling with the same
  SamplingParams: `draft_probs`): d is kept iff u q(d) < p(d), u uniform, and a rejected row
  draws its token from max(0, p - q) renormalised. u and the residual draw have streams of
  their own, `fold_in(row key, ACCEPT)` and `fold_in(row key, RESIDUAL)` of the row's
  `fold_in(key(seed), token index)` key, so a seeded request gives the same tokens in any
  batch. (The draft draws d with a seed of its own, so d is independent of u: a token index's
  numbers decide at most one emitted token, because a row that decides one is never verified
  again.) Greedy rows follow the same rule with p a point mass on the argmax;
- the run's tokens are its rows' tokens up to and including its first rejection (every row
  when none rejects: the last one's bonus token, drawn from p). A row after a rejection emits
  nothing;
- a token tree (point-mass proposals) is one run per root-to-leaf branch, every run starting
  from the sequence's last token with the same seed and token indices, so the runs agree on
  every token they both emit: the run that emits the most is the sequence's (`_best_run`),
  the others emit nothing.

One DP replica (the slot state is indexed by global slot ids here). No host work, no request
objects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.runtime import sampling
from jaxserve.runtime.sampling import SamplingInputs


def _state_rows(slot_ids: jax.Array, num_rows: int) -> jax.Array:
    trash = num_rows - 1
    return jnp.where((slot_ids >= 0) & (slot_ids < trash), slot_ids, trash)


def _within_run(per_row: jax.Array, run_start: jax.Array) -> jax.Array:
    """Per row, the sum of `per_row` over the earlier rows of its run (exclusive prefix sum)."""
    before = jnp.cumsum(per_row, axis=0) - per_row
    return before - before[run_start]


ACCEPT, RESIDUAL = 1, 2  # streams folded into a row's key (see the module docstring)


def feed_proposals(tokens, draft, run_start, decode_rows: int):
    """The step's input tokens with each run's later rows fed the proposal the row before it
    verifies. One DP replica: decode row i is token i and sample row i."""
    row = jnp.arange(decode_rows)
    later = run_start[:decode_rows] != row
    fed = jnp.where(later, draft[jnp.maximum(row - 1, 0)], tokens[:decode_rows])
    return tokens.at[:decode_rows].set(fed)


def processed_logits(logits, prompt_mask, output_counts, slot_ids, suppressed,
                     inputs: SamplingInputs, extra_counts=None):
    """The logits a row's distribution comes from: penalties (the slot's output counts, plus
    `extra_counts` i32[rows, vocab_rows] when given), then the suppressed tokens at -inf."""
    rows = logits.shape[0]
    state = _state_rows(slot_ids, prompt_mask.shape[0])

    def penalised(logits):
        counts = output_counts[state] if extra_counts is None else \
            output_counts[state] + extra_counts
        return sampling.apply_penalties(logits, prompt_mask[state], counts, None, inputs)

    any_penalty = jnp.any((inputs.repetition_penalty != 1) | (inputs.presence_penalty != 0)
                          | (inputs.frequency_penalty != 0))
    processed = jax.lax.cond(any_penalty, penalised, lambda x: x.astype(jnp.float32), logits)
    return processed.at[jnp.arange(rows)[:, None], suppressed].set(-jnp.inf, mode="drop")


def draft_distribution(logits, prompt_mask, output_counts, slot_ids, suppressed,
                       inputs: SamplingInputs):
    """q of a draft model's sample rows, f32[rows, vocab_rows]: what its plain step draws each
    row's token from (the same SamplingParams processing as the target's p)."""
    return sampling.probabilities(processed_logits(logits, prompt_mask, output_counts, slot_ids,
                                                   suppressed, inputs), inputs)


def _accept_sampled(processed, inputs: SamplingInputs, draft, draft_probs, plain_tokens):
    """Per row with a proposal drawn from q = draft_probs (rows of zeros: a point mass, kept
    iff the plain draw equals it): (token, kept). See the module docstring."""
    rows = processed.shape[0]
    p = sampling.probabilities(processed, inputs)
    index = jnp.arange(rows)
    d = jnp.maximum(draft, 0)
    has_q = (draft >= 0) & (draft_probs.sum(axis=-1) > 0)
    keys = sampling.row_keys(inputs)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, ACCEPT)))(keys)
    kept_q = u * draft_probs[index, d] < p[index, d]
    residual = jnp.maximum(p - draft_probs, 0.0)
    # p = q to the last bit leaves no residual, and then d is always kept: draw from p instead
    residual = jnp.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
    redraw = jax.vmap(lambda k, r: jax.random.categorical(jax.random.fold_in(k, RESIDUAL),
                                                          jnp.log(r)))(keys, residual)
    tokens = jnp.where(has_q, jnp.where(kept_q, d, redraw.astype(jnp.int32)), plain_tokens)
    kept = jnp.where(has_q, kept_q, plain_tokens == draft) & (draft >= 0)
    return tokens, kept


def _best_run(emitted, run_start, group_start):
    """A token tree's runs (one per branch, all from the sequence's last token, all with its
    first token): only the run that emits the most (the first on ties) emits."""
    rows = emitted.shape[0]
    count = jax.ops.segment_sum(emitted.astype(jnp.int32), run_start, num_segments=rows)
    score = count[run_start] * rows - run_start  # per row, its run's
    best = jax.ops.segment_max(score, group_start, num_segments=rows)
    return emitted & (score == best[group_start])


def verify_rows(logits, prompt_mask, output_counts, slot_ids, suppressed, want_logprobs,
                inputs: SamplingInputs, draft, run_start, sample, num_top: int,
                draft_probs=None, group_start=None):
    """The tokens of every row and which rows emit one.

    logits f32[rows, vocab_rows]: the target's raw logits; prompt_mask / output_counts
    [slots + 1, vocab_rows] (the last row is the trash row); draft i32[rows]: the proposal the
    row verifies (-1: none, the run's last row); run_start i32[rows]: the row that starts the
    row's run; sample bool[rows]: real rows; draft_probs f32[rows, vocab_rows] or None: q of a
    sampled proposal (a row of zeros, or None for all rows: point masses). Returns (tokens
    i32[rows], emitted bool[rows], chosen logprob f32[rows], top ids, top logprobs), logprobs
    of the raw target logits. group_start i32[rows] or None: with token trees, the first row
    of the row's sequence (its branches' runs are consecutive).
    """
    vocab = logits.shape[1]
    proposal = jax.nn.one_hot(draft, vocab, dtype=jnp.int32)  # all zero where draft = -1
    processed = processed_logits(logits, prompt_mask, output_counts, slot_ids, suppressed,
                                 inputs, _within_run(proposal, run_start))
    # what a plain step's row draws here (greedy: the argmax); a point mass is kept iff equal
    tokens = sampling.sample(processed, inputs)
    has_draft = draft >= 0
    if draft_probs is None:
        accepted = has_draft & (tokens == draft)
    else:
        tokens, accepted = jax.lax.cond(
            jnp.any(has_draft & (draft_probs.sum(axis=-1) > 0)),
            lambda: _accept_sampled(processed, inputs, draft, draft_probs, tokens),
            lambda: (tokens, has_draft & (tokens == draft)))
    rejected = (has_draft & ~accepted).astype(jnp.int32)
    emitted = sample & (_within_run(rejected, run_start) == 0)
    if group_start is not None:
        emitted = _best_run(emitted, run_start, group_start)
    return (tokens, emitted) + sampling.logprobs_if_wanted(logits, tokens, want_logprobs, num_top)


def record_run_tokens(last_token, output_counts, slot_ids, run_start, emitted, tokens):
    """Every emitted token is counted among its slot's outputs; the last one a run emits
    becomes the slot's last token (rows that emit nothing write the trash row)."""
    state = _state_rows(slot_ids, last_token.shape[0])
    trash = last_token.shape[0] - 1
    next_emitted = jnp.concatenate([emitted[1:], jnp.zeros((1,), bool)])
    next_in_run = jnp.concatenate([run_start[1:] == run_start[:-1], jnp.zeros((1,), bool)])
    last = emitted & ~(next_emitted & next_in_run)
    last_token = last_token.at[jnp.where(last, state, trash)].set(tokens)
    output_counts = output_counts.at[jnp.where(emitted, state, trash), tokens].add(1)
    return last_token, output_counts
