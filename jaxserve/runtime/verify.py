"""Verifying proposed tokens inside the step: acceptance on the device, one program for the batch.

A speculative step lays each decoding sequence out as a *run* of consecutive sample rows: its
last token, then its proposals d_1..d_m (the attention op makes the rows causal: each reads the
KV the earlier rows of the step wrote). Row j's logits give the target distribution p_j of the
token after row j's input; row j < m verifies d_{j+1}, the run's last row has no proposal and
draws the bonus token. A prefill chunk's sample row is a run of one row without a proposal.

Per row, with the sequence's SamplingParams applied to the target logits exactly as a plain
step applies them (penalties counting the run's earlier proposals as generated, suppressed
tokens, temperature, top_k / top_p / min_p):

- greedy: d is accepted iff it is p's argmax; otherwise the argmax is the row's token;
- sampled, with a proposal drawn from q (prompt lookup: q is a point mass on d): d is accepted
  with probability min(1, p(d) / q(d)); otherwise the token is drawn from the residual
  max(0, p - q), renormalised (Leviathan et al. 2023, Chen et al. 2023), so every token
  follows p exactly;
- the run's tokens are its rows' tokens up to and including its first rejection (every row
  when none rejects: the last one's bonus token). A row after a rejection emits nothing.

Random numbers come from the row's seed and the index of the token it decides (as in
jaxserve/runtime/sampling.py), so a seeded request gives the same tokens in any batch; a row
without a proposal draws exactly as a plain step's row does.

One DP replica (the slot state is indexed by global slot ids here). No host work, no request
objects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.runtime import sampling
from jaxserve.runtime.sampling import SamplingInputs

ACCEPT_STREAM, RESIDUAL_STREAM = 1, 2  # fold_in tags: independent of the bonus draw's key


def _state_rows(slot_ids: jax.Array, num_rows: int) -> jax.Array:
    trash = num_rows - 1
    return jnp.where((slot_ids >= 0) & (slot_ids < trash), slot_ids, trash)


def _within_run(per_row: jax.Array, run_start: jax.Array) -> jax.Array:
    """Per row, the sum of `per_row` over the earlier rows of its run (exclusive prefix sum)."""
    before = jnp.cumsum(per_row, axis=0) - per_row
    return before - before[run_start]


def accept_probability(p_draft: jax.Array) -> jax.Array:
    """min(1, p(d) / q(d)) for a point-mass proposal (q(d) = 1)."""
    return p_draft


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
    greedy_ids = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    is_greedy = inputs.temperature == 0
    has_draft = draft >= 0

    def sampled_rows():
        kept = sampling.kept_logits(processed, inputs, is_greedy)
        keys = jax.random.wrap_key_data(inputs.seed.astype(jnp.uint32), impl="threefry2x32")
        keys = jax.vmap(jax.random.fold_in)(keys, inputs.counter)
        bonus = jax.vmap(jax.random.categorical)(keys, kept).astype(jnp.int32)
        p_draft = jnp.take_along_axis(jax.nn.softmax(kept, axis=-1),
                                      jnp.maximum(draft, 0)[:, None], axis=-1)[:, 0]
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, ACCEPT_STREAM)))(keys)
        accepted = u < accept_probability(p_draft)
        # the residual max(0, p - q) of a point mass q on d: p without d
        residual = jnp.where(proposal > 0, -jnp.inf, kept)
        redrawn = jax.vmap(lambda k, lg: jax.random.categorical(
            jax.random.fold_in(k, RESIDUAL_STREAM), lg))(keys, residual).astype(jnp.int32)
        return (jnp.where(is_greedy, greedy_ids == draft, accepted),
                jnp.where(is_greedy, greedy_ids, jnp.where(has_draft, redrawn, bonus)))

    accepted, correction = jax.lax.cond(jnp.all(is_greedy),
                                        lambda: (greedy_ids == draft, greedy_ids), sampled_rows)
    accepted = accepted & has_draft
    tokens = jnp.where(accepted, draft, correction)
    rejected = (has_draft & ~accepted).astype(jnp.int32)
    emitted = sample & (_within_run(rejected, run_start) == 0)

    def with_logprobs():
        return sampling.logprobs(logits, tokens, num_top)

    def without_logprobs():
        return (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, num_top), jnp.int32),
                jnp.zeros((rows, num_top), jnp.float32))

    chosen, top_ids, top_lps = jax.lax.cond(want_logprobs.any(), with_logprobs,
                                            without_logprobs)
    return tokens, emitted, chosen, top_ids, top_lps


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
