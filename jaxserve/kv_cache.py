"""The paged KV pool: declared per model family, sized, allocated and moved generically.

A model family declares its cache as a `CacheSpec`: named buffers, each with a per-token shape,
the logical axes of that shape and a dtype (`k` and `v` of `[kv_heads, head_dim]` for GQA; a
latent-attention model declares its latent and rope-key buffers instead). Everything that sizes,
allocates or moves cache memory works from that declaration and never names a buffer:

- the pool holds, per buffer and per layer, `[kv_blocks, block_size, *per_token_shape]`;
- `bytes_per_block` sizes the pool from memory;
- `gather_blocks` / `scatter_blocks` copy one sequence's blocks out of and into the pool (swap,
  handoff to another engine), bitwise;
- `copy_local_blocks` copies blocks inside one shard of the pool (copy on write of a block that
  sequences shared until they diverge).

Which slot of which block a token lives in is the attention op's business
(`jaxserve/ops/attention.py`): this module knows pages, not positions.

Block 0 of every DP replica's shard of the pool is that replica's *null block*: never handed to a
sequence; padding tokens write there and unused block-table entries point there, so every index
is valid and no program needs a branch for padding.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sharding import Layout

NULL_BLOCK = 0
POOL_AXES = ("kv_blocks", None)  # leading axes of every buffer: [kv_blocks, block_size, ...]


@dataclasses.dataclass(frozen=True)
class CacheBuffer:
    """One cache buffer of one layer, per token: shape, logical axes, dtype."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: jnp.dtype

    def nbytes_per_token(self) -> int:
        return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a model family keeps per token and per layer (e.g. {"k": ..., "v": ...})."""

    buffers: Mapping[str, CacheBuffer]
    num_layers: int

    def bytes_per_block(self, block_size: int) -> int:
        per_token = sum(b.nbytes_per_token() for b in self.buffers.values())
        return self.num_layers * block_size * per_token

    def pool_shape(self, name: str, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size) + self.buffers[name].shape

    def pool_axes(self, name: str) -> tuple[str | None, ...]:
        return POOL_AXES + self.buffers[name].axes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    """The pool: buffer name -> one array per layer. A pytree: programs donate and return it."""

    buffers: dict[str, tuple[jax.Array, ...]]

    @property
    def num_blocks(self) -> int:
        return next(iter(self.buffers.values()))[0].shape[0]

    @property
    def block_size(self) -> int:
        return next(iter(self.buffers.values()))[0].shape[1]

    @property
    def dtype(self) -> jnp.dtype:
        return next(iter(self.buffers.values()))[0].dtype

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.buffers.values())))

    def layer(self, i: int) -> dict[str, jax.Array]:
        return {name: arrays[i] for name, arrays in self.buffers.items()}

    @staticmethod
    def from_layers(layers: Sequence[Mapping[str, jax.Array]]) -> KVPool:
        return KVPool({name: tuple(layer[name] for layer in layers) for name in layers[0]})

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

    @classmethod
    def create(cls, spec: CacheSpec, num_blocks: int, block_size: int, layout: Layout) -> KVPool:
        """Zeroed pages, allocated directly in their sharding on the devices."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        buffers = {}
        for name, buf in spec.buffers.items():
            shape = spec.pool_shape(name, num_blocks, block_size)
            sharding = layout.sharding(spec.pool_axes(name), shape, f"KV cache buffer {name!r}")
            zeros = jax.jit(lambda shape=shape, dtype=buf.dtype: jnp.zeros(shape, dtype),
                            out_shardings=sharding)
            buffers[name] = tuple(zeros() for _ in range(spec.num_layers))
        return cls(buffers)

    @classmethod
    def create_local(cls, spec: CacheSpec, num_blocks: int, block_size: int) -> KVPool:
        """Zeroed pages with no placement (inside a traced function, e.g. a training step)."""
        return cls({name: tuple(jnp.zeros(spec.pool_shape(name, num_blocks, block_size),
                                          buf.dtype) for _ in range(spec.num_layers))
                    for name, buf in spec.buffers.items()})

    def shardings(self):
        return jax.tree.map(lambda a: a.sharding, self)


def _gather(pool: KVPool, block_ids: jax.Array) -> dict[str, jax.Array]:
    return {name: jnp.stack([a[block_ids] for a in arrays])
            for name, arrays in pool.buffers.items()}


def _scatter(pool: KVPool, block_ids: jax.Array, blocks: dict[str, jax.Array]) -> KVPool:
    return KVPool({name: tuple(a.at[block_ids].set(blocks[name][i].astype(a.dtype))
                               for i, a in enumerate(arrays))
                   for name, arrays in pool.buffers.items()})


def copy_local_blocks(pool: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:
    """Block src[i] -> block dst[i] in every buffer and layer (ids of this shard of the pool;
    pairs 0 -> 0 are padding: the null block onto itself). Run per device (the runner wraps it
    in shard_map) and with the pool donated, so the pool is updated in place."""
    return KVPool({name: tuple(a.at[dst].set(a[src]) for a in arrays)
                   for name, arrays in pool.buffers.items()})


_gather_jit = jax.jit(_gather)
_scatter_jit = jax.jit(_scatter, donate_argnums=(0,))


def gather_blocks(pool: KVPool, block_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Copy blocks out of the pool: buffer name -> [layers, len(block_ids), block_size, ...].

    block_ids index the whole pool (a DP replica's local id plus its shard's offset).
    """
    out = _gather_jit(pool, jnp.asarray(np.asarray(block_ids, np.int32)))
    return {name: np.asarray(a) for name, a in out.items()}


def scatter_blocks(pool: KVPool, block_ids: Sequence[int],
                   blocks: Mapping[str, np.ndarray]) -> KVPool:
    """Write blocks (as `gather_blocks` returns them) into the pool; returns the new pool (the
    old one is donated)."""
    missing = sorted(set(pool.buffers) - set(blocks))
    if missing:
        raise ValueError(f"blocks lack cache buffer(s) {missing}")
    return _scatter_jit(pool, jnp.asarray(np.asarray(block_ids, np.int32)),
                        {name: jnp.asarray(blocks[name]) for name in pool.buffers})
