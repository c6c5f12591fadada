"""The model runner: compiled programs over (params, KV cache, step inputs), nothing else.

At load the Flax model is split into its static graph definition and its parameter state; the
programs here are pure functions of the state, jitted once per input shape bucket, with every
sharding pinned and the KV cache donated so its pages are updated in place. The runner owns the
device-side KV pool; which blocks belong to which sequence is the caller's business (the engine's
block allocator). It never sees a request object.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.kv_cache import KVCache
from jaxserve.runtime import sampling
from jaxserve.runtime.sampling import SamplingInputs
from jaxserve.sharding import Layout


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def bucket(n: int, minimum: int = 1) -> int:
    """Round up to a power of two (at least `minimum`): bounds the number of compiled shapes."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class ModelRunner:
    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                 layout: Layout, kv: KVCache):
        self.config = config
        self.graphdef = graphdef
        # Programs take the parameters as a flat list: flattening an nnx.State on every call
        # costs ~0.1-0.2 ms of host time per step; a list costs microseconds.
        self.param_leaves, self._param_treedef = jax.tree.flatten(params)
        self.layout = layout
        self.kv = kv
        self.compilations = 0
        self._programs: dict[Any, Any] = {}
        self._compiled_shapes: set[tuple] = set()

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def batch_multiple(self) -> int:
        """Batch sizes must divide evenly over the mesh axes that split `batch`."""
        return self.layout.axis_size(self.layout.rules.mapping.get("batch", ()))

    def input_sharding(self, rank: int):
        return self.layout.sharding(("batch",) + (None,) * (rank - 1), (self.batch_multiple(),)
                                    + (1,) * (rank - 1), "step input")

    def _compile_key(self, key, tokens_shape, block_tables_shape) -> None:
        # Params, KV, slot state and every other input have shapes fixed by these two: rows,
        # tokens per row, blocks per row. Counting on them costs ~1 us per step.
        shapes = (key, tokens_shape, block_tables_shape)
        if shapes not in self._compiled_shapes:
            self._compiled_shapes.add(shapes)
            self.compilations += 1

    def forward(self, tokens: np.ndarray, positions: np.ndarray,
                block_tables: np.ndarray) -> jax.Array:
        """Full-sequence logits of one pass over the pool (the `LLM.logits` program).

        tokens/positions [batch, seq] (-1 position = padding), block_tables [batch, max_blocks].
        Returns float32 logits [batch, seq, vocab]. Writes the tokens' KV into their blocks.
        """
        inputs = tuple(np.asarray(a, np.int32) for a in (tokens, positions, block_tables))
        if "forward" not in self._programs:
            graphdef, layout = self.graphdef, self.layout

            treedef = self._param_treedef

            def forward(param_leaves, kv, inputs):
                with layout.activate():
                    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, param_leaves))
                    hidden, kv = model(inputs[0], inputs[1], kv, inputs[2])
                    return model.logits(hidden), kv

            self._programs["forward"] = jax.jit(
                forward, donate_argnums=(1,),
                in_shardings=(_shardings(self.param_leaves), _shardings(self.kv),
                              tuple(self.input_sharding(2) for _ in inputs)),
                out_shardings=(self.layout.sharding(("batch", None, "vocab"),
                                                    (self.batch_multiple(), 1,
                                                     self.config.vocab_size), "logits"),
                               _shardings(self.kv)))
        self._compile_key("forward", inputs[0].shape, inputs[2].shape)
        logits, self.kv = self._programs["forward"](self.param_leaves, self.kv, inputs)
        return logits

    def init_slots(self, num_slots: int) -> None:
        self.slot_state = SlotState.create(num_slots, self.config.vocab_size, self.layout)

    def step(self, inputs: StepInputs, decode: bool) -> StepOutputs:
        """Dispatch one prefill (decode=False) or decode step; returns without waiting."""
        key = ("step", decode)
        if key not in self._programs:
            input_shardings = jax.tree.map(lambda a: self.input_sharding(np.ndim(a)), inputs)
            self._programs[key] = jax.jit(
                functools.partial(_step, self.graphdef, self._param_treedef, self.layout, decode),
                donate_argnums=(1, 2),
                in_shardings=(_shardings(self.param_leaves), _shardings(self.kv),
                              _shardings(self.slot_state), input_shardings),
                out_shardings=(self.layout.replicated(), _shardings(self.kv),
                               _shardings(self.slot_state)))
        self._compile_key(key, np.shape(inputs.tokens), np.shape(inputs.block_tables))
        outputs, self.kv, self.slot_state = self._programs[key](self.param_leaves, self.kv,
                                                                self.slot_state, inputs)
        return outputs


# ---- the serving step: prefill chunks or decodes, sampling on device ----

MAX_LOGPROBS = 20  # top-N computed on device when any row asks; rows slice what they asked for
MAX_SUPPRESSED = 16  # stop tokens masked per row while min_tokens is not reached


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-sequence state that lives on the device between steps, indexed by slot.

    Keeping the last sampled token here lets step n+1 be dispatched before step n's tokens are read
    back. Row `num_slots` is a trash row that padding rows write to.
    """

    last_token: jax.Array  # i32[slots + 1]
    output_counts: jax.Array  # i32[slots + 1, vocab]: how often each token was generated
    prompt_mask: jax.Array  # bool[slots + 1, vocab]: tokens in the prompt

    @classmethod
    def create(cls, num_slots: int, vocab: int, layout: Layout) -> SlotState:
        make = jax.jit(lambda: cls(jnp.zeros((num_slots + 1,), jnp.int32),
                                   jnp.zeros((num_slots + 1, vocab), jnp.int32),
                                   jnp.zeros((num_slots + 1, vocab), jnp.bool_)),
                       out_shardings=layout.replicated())
        return make()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """What the host sends for one step; every field has leading dim batch (rows)."""

    tokens: jax.Array  # i32[batch, seq] (decode: ignored, the slot's last token is used)
    positions: jax.Array  # i32[batch, seq], -1 = padding
    is_output: jax.Array  # bool[batch, seq]: token was generated (a recompute after preemption)
    block_tables: jax.Array  # i32[batch, max_blocks]
    slot_ids: jax.Array  # i32[batch]; padding rows use the trash slot
    first_chunk: jax.Array  # bool[batch]: reset the slot's prompt mask and output counts
    sample: jax.Array  # bool[batch]: this row's last token yields a new output token
    want_logprobs: jax.Array  # bool[batch]
    suppressed: jax.Array  # i32[batch, MAX_SUPPRESSED]; vocab = no token
    sampling: SamplingInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    tokens: jax.Array  # i32[batch]
    logprob: jax.Array  # f32[batch]: of the chosen token
    top_ids: jax.Array  # i32[batch, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[batch, MAX_LOGPROBS]


def _step(graphdef, param_treedef, layout, decode: bool, param_leaves, kv, state: SlotState,
          inputs: StepInputs):
    b = inputs.slot_ids.shape[0]
    with layout.activate():
        model = nnx.merge(graphdef, jax.tree.unflatten(param_treedef, param_leaves))
        tokens = state.last_token[inputs.slot_ids][:, None] if decode else inputs.tokens
        hidden, kv = model(tokens, inputs.positions, kv, inputs.block_tables)
        last = jnp.maximum((inputs.positions >= 0).sum(axis=1) - 1, 0)
        hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        logits = model.logits(hidden)  # [batch, vocab]

    prompt_mask, counts = state.prompt_mask, state.output_counts
    if not decode:  # record the chunk's prompt tokens (and recomputed outputs) per slot
        keep = ~inputs.first_chunk[:, None]
        prompt_mask = prompt_mask.at[inputs.slot_ids].set(prompt_mask[inputs.slot_ids] & keep)
        counts = counts.at[inputs.slot_ids].set(counts[inputs.slot_ids] * keep)
        valid = inputs.positions >= 0
        rows = jnp.broadcast_to(inputs.slot_ids[:, None], tokens.shape)
        prompt_mask = prompt_mask.at[rows, tokens].max(valid & ~inputs.is_output)
        counts = counts.at[rows, tokens].add((valid & inputs.is_output).astype(jnp.int32))

    processed = sampling.apply_penalties(logits, prompt_mask[inputs.slot_ids],
                                         counts[inputs.slot_ids], inputs.sampling)
    processed = processed.at[jnp.arange(b)[:, None], inputs.suppressed].set(-jnp.inf, mode="drop")
    next_tokens = sampling.sample(processed, inputs.sampling)

    def with_logprobs():
        return sampling.logprobs(logits, next_tokens, MAX_LOGPROBS)

    def without_logprobs():
        return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((b, MAX_LOGPROBS), jnp.float32))

    chosen, top_ids, top_lps = jax.lax.cond(inputs.want_logprobs.any(), with_logprobs,
                                            without_logprobs)
    trash = state.last_token.shape[0] - 1
    target = jnp.where(inputs.sample, inputs.slot_ids, trash)
    state = SlotState(last_token=state.last_token.at[target].set(next_tokens),
                      output_counts=counts.at[target, next_tokens].add(1),
                      prompt_mask=prompt_mask)
    return StepOutputs(next_tokens, chosen, top_ids, top_lps), kv, state
