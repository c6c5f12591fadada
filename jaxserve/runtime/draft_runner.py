"""The draft model's runner: a ModelRunner with one more program, `propose`, that makes a whole
round of proposals on the device in ONE dispatch.

Why one program: on a host where a step costs mostly fixed per-dispatch time (the embedded
model on a CPU: ~1 ms a step whatever its size), k separate draft steps cost k dispatches and a
readback each round. `propose` is a `lax.fori_loop` over single-token decode iterations, every
sequence one row; the last few tokens the draft has not seen yet (its catch-up, up to
`ProposeInputs.tokens.shape[1]` per sequence) are fed first (teacher forcing), then each
iteration feeds the previous iteration's proposal. Iteration i writes the KV of its input token
at position `start + i` and reads the KV the earlier iterations wrote; a row past what its
sequence wants (`num_proposals`) is padding (position -1: it writes the null block), so no KV
is written past the blocks the host allocated; the loop stops after the iterations the
neediest row runs (a round after a rejection catches up on one token per row, not two).

Where the proposals go: either back to the host, [rows, k] (a draft on devices of its own,
whose round runs beside the target's step), or straight into the target's next step
(`ProposeInputs.step_source`): each sample row of the verify step gathers the proposal it
verifies, and its q (`StepRows`: the step's `VerifyRows.draft` and `draft_probs`),
so the verify step is dispatched right after the round and nothing is read back in between;
the verify step feeds each proposal as the input of the row after the one verifying it
(jaxserve/runtime/verify.py). The host plans with the number of proposals only.

Each proposal is drawn the way the target's step draws a token (jaxserve/runtime/sampling.py,
the same functions): the row's SamplingParams applied to the draft's logits, penalties counting
the slot's output counts (the host loads the target's outputs there) plus the round's earlier
proposals, with the row's seed and the proposal's index as its counter. A greedy row takes the
argmax, a point mass; a sampled row also returns q, the distribution it drew from
([rows, k, vocab_rows], zeros for greedy rows), which the target's acceptance rule needs
(jaxserve/runtime/verify.py). The slot state is only read. One DP replica. Like runner.py,
this never sees a request object.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.ops.attention import AttentionMetadata
from jaxserve.runtime import sampling
from jaxserve.runtime.runner import ModelRunner, SlotState, _hidden, _shardings
from jaxserve.runtime.sampling import SamplingInputs
from jaxserve.runtime.verify import processed_logits
from jaxserve.sampling_params import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProposeInputs:
    """One round of proposals, one row per sequence (padding rows: num_catch_up 0)."""

    tokens: jax.Array  # i32[rows, catch_up]: the tokens the draft has not seen, in order
    num_catch_up: jax.Array  # i32[rows]: how many of them are real (0: a padding row)
    start: jax.Array  # i32[rows]: the position of the first catch-up token
    num_proposals: jax.Array  # i32[rows]: proposals wanted (<= k)
    block_tables: jax.Array  # i32[rows, table_width]
    slot_ids: jax.Array  # i32[rows]: the row's slot (penalty state; padding: the trash slot)
    sampling: SamplingInputs  # per row; counter: the index of the row's first proposal
    num_speculative_tokens: int = dataclasses.field(metadata=dict(static=True))  # k
    chunk_blocks: int = dataclasses.field(metadata=dict(static=True))
    # i32[step rows]: per sample row of the target's step, the proposal it verifies (row * k +
    # index; -1: none); None: the proposals go back to the host
    step_source: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepRows:
    """A round's proposals laid out as the verify step's sample rows (see VerifyRows)."""

    draft: jax.Array  # i32[step rows]: the proposal each row verifies; -1 = none
    draft_probs: jax.Array  # f32[step rows, vocab_rows]: its q (zeros: a point mass or none)


def _propose(graphdef, param_treedef, setting, param_leaves, kv, state: SlotState,
             inputs: ProposeInputs):
    """-> (proposals i32[rows, k], q f32[rows, k, vocab_rows], kv). Iteration i runs one token
    per row at `start + i`."""
    rows, catch_up = inputs.tokens.shape
    k = inputs.num_speculative_tokens
    vocab = state.prompt_mask.shape[1]
    block_size = jax.tree.leaves(kv)[0].shape[1]
    last_needed = inputs.num_catch_up + inputs.num_proposals - 1  # iterations a row runs
    row_ids = jnp.arange(rows)
    no_suppressed = jnp.zeros((rows, 0), jnp.int32)
    any_sampled = jnp.any(inputs.sampling.temperature > 0)

    def iteration(i, carry):
        kv, previous, proposals, probs, counts = carry
        live = i < last_needed
        forced = inputs.tokens[:, jnp.minimum(i, catch_up - 1)]
        token = jnp.where(i < inputs.num_catch_up, forced, previous)
        position = jnp.where(live, inputs.start + i, -1)
        pos = jnp.maximum(position, 0)
        block = inputs.block_tables[row_ids, pos // block_size]
        md = AttentionMetadata(positions=position,
                               slots=jnp.where(live, block * block_size + pos % block_size, 0),
                               block_tables=inputs.block_tables,
                               context_lens=jnp.where(live, position + 1, 0),
                               decode_rows=rows, chunk_blocks=inputs.chunk_blocks)
        model, hidden, kv = _hidden(graphdef, param_treedef, setting, param_leaves, kv, token,
                                    md)
        with setting[0].activate():
            logits = model.logits(hidden)
        index = i - inputs.num_catch_up + 1  # the proposal this iteration makes
        row_inputs = dataclasses.replace(
            inputs.sampling, counter=inputs.sampling.counter + jnp.maximum(index, 0))
        processed = processed_logits(logits, state.prompt_mask, state.output_counts,
                                     inputs.slot_ids, no_suppressed, row_inputs, counts)
        guess = sampling.sample(processed, row_inputs)
        keep = live & (index >= 0)
        at = jnp.where(keep, index, k)
        proposals = proposals.at[row_ids, at].set(guess, mode="drop")
        probs = jax.lax.cond(
            any_sampled,
            lambda: probs.at[row_ids, at].set(jnp.where(
                (row_inputs.temperature > 0)[:, None],
                sampling.probabilities(processed, row_inputs), 0.0), mode="drop"),
            lambda: probs)
        counts = counts.at[row_ids, guess].add(keep.astype(jnp.int32))
        return kv, guess, proposals, probs, counts

    # as many iterations as the row that needs the most: after a rejection every row has one
    # token to catch up on, so the last of the catch_up + k - 1 would be padding for all
    iterations = jnp.clip(jnp.max(last_needed), 0, catch_up + k - 1)
    carry = (kv, jnp.zeros((rows,), jnp.int32), jnp.full((rows, k), -1, jnp.int32),
             jnp.zeros((rows, k, vocab), jnp.float32), jnp.zeros((rows, vocab), jnp.int32))
    with jax.named_scope("draft_propose"):
        kv, _, proposals, probs, _ = jax.lax.fori_loop(0, iterations, iteration, carry)
    if inputs.step_source is None:
        return proposals, probs, kv
    source = inputs.step_source
    at = jnp.maximum(source, 0)
    verifies = source >= 0
    draft = jnp.where(verifies, proposals.reshape(-1)[at], -1)
    step_probs = jnp.where(verifies[:, None], probs.reshape(-1, vocab)[at], 0.0)
    return StepRows(draft, step_probs), kv


class DraftRunner(ModelRunner):
    """A ModelRunner that can also run a round of proposals in one program (`propose`)."""

    def _propose_program(self, to_step: bool):
        host, kv = (self.layout.replicated(),) * 2, self.kv.shardings()
        return self._jitted("propose_to_step" if to_step else "propose", lambda: jax.jit(
            functools.partial(_propose, self.graphdef, self._param_treedef,
                              (self.layout, self.moe)),
            donate_argnums=(1,),
            in_shardings=(_shardings(self.param_leaves), kv, _shardings(self.slot_state),
                          self._input_sharding()),
            out_shardings=(StepRows(*host), kv) if to_step else host + (kv,)))

    def _propose_executable(self, inputs: ProposeInputs):
        to_step = inputs.step_source is not None
        key = ("propose", inputs.tokens.shape, inputs.block_tables.shape,
               inputs.num_speculative_tokens,
               inputs.step_source.shape if to_step else None)
        executable = self._compiled.get(key)
        if executable is not None:
            return executable
        return self._compile_once(key, lambda: self._propose_program(to_step).lower(
            self._abstract_params, self._abstract_kv, self._abstract_slots,
            self._abstract_inputs("propose", inputs)).compile())

    def propose(self, inputs: ProposeInputs):
        """Dispatch one round of proposals; returns without waiting: (i32[rows, k] (-1: none),
        q f32[rows, k, vocab_rows] (zeros: a greedy row)), or with `inputs.step_source` the
        StepRows of the target's step."""
        *outputs, self.kv = self._propose_executable(inputs)(
            self.param_leaves, self.kv, self.slot_state, inputs)
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


def propose_inputs(rows: int, catch_up: int, k: int, width: int, chunk_blocks: int,
                   sequences: list[tuple[list[int], int, int, list[int]]],
                   draws: list[tuple[SamplingParams, int, int]], trash_slot: int
                   ) -> ProposeInputs:
    """Host arrays of a round: `sequences` as (catch-up tokens, start, proposals wanted, block
    table) and `draws` as (sampling params, the round's seed, slot), padded to `rows` rows
    (greedy, the trash slot) and `catch_up` tokens."""
    tokens = np.zeros((rows, catch_up), np.int32)
    num_catch_up = np.zeros((rows,), np.int32)
    start = np.zeros((rows,), np.int32)
    num_proposals = np.zeros((rows,), np.int32)
    tables = np.zeros((rows, width), np.int32)
    for r, (ids, first, wanted, table) in enumerate(sequences):
        tokens[r, :len(ids)] = ids
        num_catch_up[r], start[r], num_proposals[r] = len(ids), first, wanted
        tables[r, :len(table)] = table
    slot_ids = np.full((rows,), trash_slot, np.int32)
    slot_ids[:len(draws)] = [slot for *_, slot in draws]
    row_sampling = SamplingInputs.from_params([p for p, *_ in draws], [s for _, s, _ in draws],
                                              [0] * len(draws), rows)
    return ProposeInputs(tokens, num_catch_up, start, num_proposals, tables, slot_ids,
                         row_sampling, k, chunk_blocks)
