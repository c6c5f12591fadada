"""The draft model's runner: a ModelRunner with one more program, `propose`, that makes a whole
round of greedy proposals on the device in ONE dispatch.

Why one program: on a host where a step costs mostly fixed per-dispatch time (the embedded
model on a CPU: ~1 ms a step whatever its size), k separate draft steps cost k dispatches and a
readback each round. `propose` is a `lax.fori_loop` over single-token decode iterations, every
sequence one row; the last few tokens the draft has not seen yet (its catch-up, up to
`ProposeInputs.tokens.shape[1]` per sequence) are fed first (teacher forcing), then each
iteration feeds the previous iteration's argmax. Iteration i writes the KV of its input token
at position `start + i` and reads the KV the earlier iterations wrote; a row past what its
sequence wants (`num_proposals`) is padding (position -1: it writes the null block), so no KV
is written past the blocks the host allocated. Proposals are read back once, [rows, k].

Greedy only: a proposal is the argmax of the draft's raw logits, a point mass (the target's
acceptance rule stays exact, jaxserve/runtime/verify.py). One DP replica. Like runner.py, this
never sees a request object.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.ops.attention import AttentionMetadata
from jaxserve.runtime.runner import ModelRunner, _hidden, _shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProposeInputs:
    """One round of proposals, one row per sequence (padding rows: num_catch_up 0)."""

    tokens: jax.Array  # i32[rows, catch_up]: the tokens the draft has not seen, in order
    num_catch_up: jax.Array  # i32[rows]: how many of them are real (0: a padding row)
    start: jax.Array  # i32[rows]: the position of the first catch-up token
    num_proposals: jax.Array  # i32[rows]: proposals wanted (<= k)
    block_tables: jax.Array  # i32[rows, table_width]
    num_speculative_tokens: int = dataclasses.field(metadata=dict(static=True))  # k
    chunk_blocks: int = dataclasses.field(metadata=dict(static=True))


def _propose(graphdef, param_treedef, setting, param_leaves, kv, inputs: ProposeInputs):
    """-> (proposals i32[rows, k], kv). Iteration i runs one token per row at `start + i`."""
    rows, catch_up = inputs.tokens.shape
    k = inputs.num_speculative_tokens
    block_size = jax.tree.leaves(kv)[0].shape[1]
    last_needed = inputs.num_catch_up + inputs.num_proposals - 1  # iterations a row runs
    row_ids = jnp.arange(rows)

    def iteration(i, carry):
        kv, previous, proposals = carry
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
            guess = jnp.argmax(model.logits(hidden), axis=-1).astype(jnp.int32)
        index = i - inputs.num_catch_up + 1  # the proposal this iteration makes
        keep = live & (index >= 0)
        proposals = proposals.at[row_ids, jnp.where(keep, index, k)].set(guess, mode="drop")
        return kv, guess, proposals

    iterations = catch_up + k - 1
    carry = (kv, jnp.zeros((rows,), jnp.int32), jnp.full((rows, k), -1, jnp.int32))
    with jax.named_scope("draft_propose"):
        kv, _, proposals = jax.lax.fori_loop(0, iterations, iteration, carry)
    return proposals, kv


class DraftRunner(ModelRunner):
    """A ModelRunner that can also run a round of proposals in one program (`propose`)."""

    def _propose_program(self):
        return self._jitted("propose", lambda: jax.jit(
            functools.partial(_propose, self.graphdef, self._param_treedef,
                              (self.layout, self.moe)),
            donate_argnums=(1,),
            in_shardings=(_shardings(self.param_leaves), self.kv.shardings(),
                          self._input_sharding()),
            out_shardings=(self.layout.replicated(), self.kv.shardings())))

    def _propose_executable(self, inputs: ProposeInputs):
        key = ("propose", inputs.tokens.shape, inputs.block_tables.shape,
               inputs.num_speculative_tokens)
        executable = self._compiled.get(key)
        if executable is not None:
            return executable
        return self._compile_once(key, lambda: self._propose_program().lower(
            self._abstract_params, self._abstract_kv,
            self._abstract_inputs("propose", inputs)).compile())

    def propose(self, inputs: ProposeInputs) -> jax.Array:
        """Dispatch one round of proposals; returns i32[rows, k] without waiting (-1: none)."""
        proposals, self.kv = self._propose_executable(inputs)(self.param_leaves, self.kv,
                                                              inputs)
        return proposals


def propose_inputs(rows: int, catch_up: int, k: int, width: int, chunk_blocks: int,
                   sequences: list[tuple[list[int], int, int, list[int]]]) -> ProposeInputs:
    """Host arrays of a round: `sequences` as (catch-up tokens, start, proposals wanted, block
    table), padded to `rows` rows and `catch_up` tokens."""
    tokens = np.zeros((rows, catch_up), np.int32)
    num_catch_up = np.zeros((rows,), np.int32)
    start = np.zeros((rows,), np.int32)
    num_proposals = np.zeros((rows,), np.int32)
    tables = np.zeros((rows, width), np.int32)
    for r, (ids, first, wanted, table) in enumerate(sequences):
        tokens[r, :len(ids)] = ids
        num_catch_up[r], start[r], num_proposals[r] = len(ids), first, wanted
        tables[r, :len(table)] = table
    return ProposeInputs(tokens, num_catch_up, start, num_proposals, tables, k, chunk_blocks)
