"""The model runner: compiled programs over (params, KV cache, step inputs), nothing else.

At load the Flax model is split into its static graph definition and its parameter state; the
programs here are pure functions of the state, jitted once per input shape bucket, with every
sharding pinned and the KV cache donated so its pages are updated in place. The runner owns the
device-side KV pool; which blocks belong to which sequence is the caller's business (the engine's
block allocator). It never sees a request object.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.kv_cache import KVCache
from jaxserve.sharding import Layout


def bucket(n: int, minimum: int = 1) -> int:
    """Round up to a power of two (at least `minimum`): bounds the number of compiled shapes."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class ModelRunner:
    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                 layout: Layout, kv: KVCache):
        self.config = config
        self.graphdef = graphdef
        self.params = params
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

    # ---- programs ----
    def _forward_program(self, all_logits: bool):
        key = ("forward", all_logits)
        if key not in self._programs:
            graphdef, layout = self.graphdef, self.layout

            def forward(params, kv, tokens, positions, block_tables, last_index):
                with layout.activate():
                    model = nnx.merge(graphdef, params)
                    hidden, kv = model(tokens, positions, kv, block_tables)
                    if not all_logits:  # only each sequence's last token: [batch, 1, embed]
                        hidden = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)
                    logits = model.logits(hidden)
                return logits, kv

            self._programs[key] = jax.jit(forward, donate_argnums=(1,),
                                          out_shardings=(None, self.kv.shardings()))
        return self._programs[key]

    def _run(self, key, program, *args):
        # Params and KV have fixed shapes, so the step inputs' shapes decide what jit compiles.
        shapes = (key,) + tuple(a.shape for a in args)
        if shapes not in self._compiled_shapes:
            self._compiled_shapes.add(shapes)
            self.compilations += 1
        return program(self.params, self.kv, *args)

    def forward(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
                all_logits: bool = True) -> jax.Array:
        """Run one step over the pool. tokens/positions [batch, seq] (-1 position = padding),
        block_tables [batch, max_blocks]. Returns float32 logits [batch, seq, vocab], or
        [batch, 1, vocab] for each row's last real token when all_logits is False."""
        tokens = np.asarray(tokens, np.int32)
        positions = np.asarray(positions, np.int32)
        last_index = np.maximum((positions >= 0).sum(axis=1) - 1, 0).astype(np.int32)
        args = [jax.device_put(a, self.input_sharding(a.ndim)) for a in
                (tokens, positions, np.asarray(block_tables, np.int32), last_index)]
        logits, self.kv = self._run(("forward", all_logits), self._forward_program(all_logits),
                                    *args)
        return logits
