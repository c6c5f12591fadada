"""Verifying proposed tokens inside the step: acceptance on the device, one program for the batch.

A speculative step lays each decoding sequence out as a *run* of consecutive sample rows: its
last token, then its proposals d_1..d_m (the attention op makes the rows causal: each reads the
KV the earlier rows of the step wrote). Row j's logits give the target distribution p_j of the
token after row j's input; row j < m verifies d_{j+1}, the run's last row has no proposal and
draws the bonus token. A prefill chunk's sample row is a run of one row without a proposal.

Per row, with the sequence's SamplingParams applied to the target logits exactly as a plain
step applies them (penalties counting the run's earlier proposals as generated, suppressed
tokens, temperature, top_k / top_p / min_p):

- greedy: d is kept iff it is p's argmax; otherwise the argmax is the row's token;
- sampled: the row draws its token t from p exactly as a plain step's row would (same seed, same
  token index), and d is kept iff t = d. This is rejection sampling with the residual (Leviathan
  et al. 2023, Chen et al. 2023) for a proposal that is a point mass on d, as prompt lookup's
  are: d is kept with probability p(d) = min(1, p(d) / q(d)), and a rejected row's token is
  t ~ p given t != d, which is the residual max(0, p - q) renormalised. So every token follows
  p, and, drawn with the plain step's random numbers, is the token plain decoding draws there;
- the run's tokens are its rows' tokens up to and including its first rejection (every row
  when none rejects: the last one's bonus token). A row after a rejection emits nothing.

Random numbers come from the row's seed and the index of the token it decides (as in
jaxserve/runtime/sampling.py): a seeded request gives the same tokens in any batch, with or
without proposals. (A draft model's proposals, drawn from a full distribution q, need the general
rule: keep d with probability min(1, p(d) / q(d)), else draw from max(0, p - q).)

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


def verify_rows(logits, prompt_mask, output_counts, slot_ids, suppressed, want_logprobs,
                inputs: SamplingInputs, draft, run_start, sample, num_top: int):
    """The tokens of every row and which rows emit one.

    logits f32[rows, vocab_rows]: the target's raw logits; prompt_mask / output_counts
    [slots + 1, vocab_rows] (the last row is the trash row); draft i32[rows]: the proposal the
    row verifies (-1: none, the run's last row); run_start i32[rows]: the row that starts the
    row's run; sample bool[rows]: real rows. Returns (tokens i32[rows], emitted bool[rows],
    chosen logprob f32[rows], top ids, top logprobs), logprobs of the raw target logits.
    """
    rows, vocab = logits.shape
    state = _state_rows(slot_ids, prompt_mask.shape[0])
    proposal = jax.nn.one_hot(draft, vocab, dtype=jnp.int32)  # all zero where draft = -1

    def penalised(logits):
        counts = output_counts[state] + _within_run(proposal, run_start)
        return sampling.apply_penalties(logits, prompt_mask[state], counts, None, inputs)

    any_penalty = jnp.any((inputs.repetition_penalty != 1) | (inputs.presence_penalty != 0)
                          | (inputs.frequency_penalty != 0))
    processed = jax.lax.cond(any_penalty, penalised, lambda x: x.astype(jnp.float32), logits)
    processed = processed.at[jnp.arange(rows)[:, None], suppressed].set(-jnp.inf, mode="drop")
    # what a plain step's row draws here (greedy: the argmax); the proposal is kept iff equal
    tokens = sampling.sample(processed, inputs)
    has_draft = draft >= 0
    accepted = has_draft & (tokens == draft)
    rejected = (has_draft & ~accepted).astype(jnp.int32)
    emitted = sample & (_within_run(rejected, run_start) == 0)
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
