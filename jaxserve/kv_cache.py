"""The paged KV cache: its format, and how tokens are written to and read from it.

The cache is a pool of fixed-size blocks per layer, `[kv_blocks, block_size, kv_heads, head_dim]`
for keys and for values, sharded like the attention it serves (kv heads over `tp`). A sequence owns
a list of blocks, its *block table*; token `p` of a sequence lives in block
`block_table[p // block_size]` at offset `p % block_size`. Block 0 is the *null block*: it is never
handed to a sequence, padding tokens write there, and unused block-table entries point there, so
every index is valid and no program needs a branch for padding.

This module knows nothing of requests or schedulers: the host-side allocator lives in the engine.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.sharding import Layout

KV_AXES = ("kv_blocks", None, "kv_heads", "head_dim")
NULL_BLOCK = 0


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer key and value pages. A pytree: programs take it, donate it and return it."""

    k: tuple[jax.Array, ...]  # per layer [kv_blocks, block_size, kv_heads, head_dim]
    v: tuple[jax.Array, ...]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k[0].dtype

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k + self.v)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype) -> int:
        return (2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim
                * jnp.dtype(dtype).itemsize)

    @classmethod
    def create(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype,
               layout: Layout) -> KVCache:
        """Zeroed pages, allocated directly in their sharding on the devices."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        sharding = layout.sharding(KV_AXES, shape, "KV cache")
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        layers = config.num_layers
        return cls(k=tuple(zeros() for _ in range(layers)), v=tuple(zeros() for _ in range(layers)))


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=[])


def token_slots(positions: jax.Array, block_tables: jax.Array, block_size: int) -> jax.Array:
    """Flat pool index of each token. positions [batch, seq] (-1 = padding) -> [batch, seq].

    block_tables: [batch, max_blocks] block ids; padding tokens map to the null block.
    """
    valid = positions >= 0
    pos = jnp.where(valid, positions, 0)
    block = jnp.take_along_axis(block_tables, pos // block_size, axis=1)
    return jnp.where(valid, block * block_size + pos % block_size, NULL_BLOCK * block_size)


def write_pages(pages: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter new [batch, seq, kv_heads, head_dim] into pages at flat slots [batch, seq]."""
    n, bs, h, d = pages.shape
    flat = pages.reshape(n * bs, h, d).at[slots.reshape(-1)].set(
        new.reshape(-1, h, d).astype(pages.dtype))
    return flat.reshape(n, bs, h, d)


def read_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """Gather each sequence's context: -> [batch, max_blocks * block_size, kv_heads, head_dim]."""
    b, nb = block_tables.shape
    _, bs, h, d = pages.shape
    return pages[block_tables].reshape(b, nb * bs, h, d)
