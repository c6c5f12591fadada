"""Llama-2 / Llama-3 / Mistral: a pre-norm decoder of GQA attention and SwiGLU MLP blocks.

Layers are a Python list, so the compiled step unrolls them: on XLA CPU that measured 1.5x faster
than a `scan` over stacked layers at decode batch 8 (21.8 vs 14.4 ms for the 55M model's
product stack), and the per-layer
KV pages stay separate arrays that are updated in place when the cache is donated. The step is
token-major: prefill chunks and decodes are one flat batch of tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.kv_cache import CacheSpec, KVPool
from jaxserve.models.layers import (MLP, Attention, Embedding, RMSNorm, kv_cache_spec,
                                    rope_tables, weight)
from jaxserve.ops.quant import project
from jaxserve.ops.attention import AttentionMetadata
from jaxserve.sharding import constrain


class DecoderLayer(nnx.Module):
    """Attention then a feed-forward block (`feed_forward()` builds it: the dense SwiGLU unless
    given, e.g. a MoE; `attention()` the attention block, GQA unless given); extra keyword
    arguments of a call go to the feed-forward block."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs, feed_forward=None,
                 attention=None):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype, rngs)
        self.attn = attention() if attention else Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype, rngs)
        self.mlp = feed_forward() if feed_forward else MLP(config, dtype, rngs)

    def __call__(self, x, cos, sin, cache: dict, metadata: AttentionMetadata, **mlp_args):
        attn_out, cache = self.attn(self.attn_norm(x), cos, sin, cache, metadata)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x), **mlp_args)
        return constrain(x, ("batch", "embed")), cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embedding(config, dtype, rngs)
        self.layers = nnx.List([
            DecoderLayer(config, dtype, rngs,
                         lambda i=i: self.feed_forward(config, i, dtype, rngs),
                         lambda: self.attention(config, dtype, rngs))
            for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype, rngs)
        if not config.tie_word_embeddings:
            # [vocab, embed], like the embedding (and HF's lm_head.weight): the decode-shaped
            # product contracts both operands along their contiguous axis, measured 1.5x faster
            # than [embed, vocab] at batch 8 on XLA CPU.
            self.lm_head = weight(rngs, (config.vocab_rows, config.hidden_size),
                                  ("vocab", "embed"), dtype, config, (1, 2), embedding=True)

    @staticmethod
    def attention(config: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
        """A layer's attention block (latent-attention families override this)."""
        return Attention(config, dtype, rngs)

    @staticmethod
    def feed_forward(config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
        """Layer `layer`'s feed-forward block (families with experts override this)."""
        return MLP(config, dtype, rngs)

    @staticmethod
    def cache_spec(config: ModelConfig, dtype) -> CacheSpec:
        return kv_cache_spec(config, dtype)

    def __call__(self, tokens: jax.Array, kv: KVPool,
                 metadata: AttentionMetadata) -> tuple[jax.Array, KVPool]:
        """Run one step's flat tokens [tokens] through the decoder.

        Their keys/values are written to the cache and each token attends to its sequence's
        context up to its own position (the metadata says where everything is). Returns the
        final hidden states [tokens, embed] and the updated cache.
        """
        cos, sin = rope_tables(self.config, metadata.positions)
        x = self.embed(tokens)
        layers = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, cache = layer(x, cos, sin, kv.layer(i), metadata)
            layers.append(cache)
        return self.final_norm(x), KVPool.from_layers(layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[.., embed] -> float32 [.., vocab_rows]; padding ids (>= vocab_size) are -inf."""
        with jax.named_scope("lm_head"):
            return self._logits(hidden)

    def _logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            out = self.embed.attend(hidden)
        else:
            out = project(hidden, self.lm_head)
        out = out.astype(jnp.float32)
        if self.config.vocab_rows > self.config.vocab_size:
            real = jnp.arange(self.config.vocab_rows) < self.config.vocab_size
            out = jnp.where(real, out, -jnp.inf)
        return out
