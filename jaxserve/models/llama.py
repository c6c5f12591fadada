"""Llama-2 / Llama-3 / Mistral: a pre-norm decoder of GQA attention and SwiGLU MLP blocks.

Layers are a Python list, so the compiled step unrolls them: on XLA CPU that measured 1.5x faster
than a `scan` over stacked layers at decode batch 8 (see ../shared/PLATFORM.md), and the per-layer
KV pages stay separate arrays that are updated in place when the cache is donated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.kv_cache import KVCache, token_slots
from jaxserve.models.layers import MLP, Attention, Embedding, RMSNorm, param, rope_tables
from jaxserve.sharding import constrain


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype, rngs)
        self.attn = Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype, rngs)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, cos, sin, k_pages, v_pages, slots, positions, block_tables):
        attn_out, k_pages, v_pages = self.attn(self.attn_norm(x), cos, sin, k_pages, v_pages,
                                               slots, positions, block_tables)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "seq", "embed")), k_pages, v_pages


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embedding(config.vocab_rows, config.hidden_size, dtype, rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.hidden_size, config.vocab_rows), ("embed", "vocab"),
                                 dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv: KVCache,
                 block_tables: jax.Array) -> tuple[jax.Array, KVCache]:
        """Run tokens [batch, seq] at positions [batch, seq] (-1 = padding) through the decoder.

        Their keys/values are written to the cache at the sequences' block tables
        [batch, max_blocks]; each token attends to every cached token of its sequence at a position
        <= its own. Returns the final hidden states [batch, seq, embed] and the updated cache.
        """
        cos, sin = rope_tables(self.config, positions)
        slots = token_slots(positions, block_tables, kv.block_size)
        x = self.embed(tokens)
        new_k, new_v = [], []
        for layer, k_pages, v_pages in zip(self.layers, kv.k, kv.v):
            x, k_pages, v_pages = layer(x, cos, sin, k_pages, v_pages, slots, positions,
                                        block_tables)
            new_k.append(k_pages)
            new_v.append(v_pages)
        return self.final_norm(x), KVCache(k=tuple(new_k), v=tuple(new_v))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[.., embed] -> float32 [.., vocab_rows]; padding ids (>= vocab_size) are -inf."""
        if self.config.tie_word_embeddings:
            out = self.embed.attend(hidden)
        else:
            out = hidden @ self.lm_head[...]
        out = out.astype(jnp.float32)
        if self.config.vocab_rows > self.config.vocab_size:
            real = jnp.arange(self.config.vocab_rows) < self.config.vocab_size
            out = jnp.where(real, out, -jnp.inf)
        return out
