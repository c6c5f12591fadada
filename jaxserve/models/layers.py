"""Layers shared by the dense decoder families: norms, embeddings, RoPE, paged attention, MLP.

Every parameter is declared once, here, with its shape and *logical* axes (`param`); shardings are
derived from that declaration (see jaxserve/sharding.py). Activations that matter for
partitioning are pinned with `constrain` by logical name. Nothing here knows about meshes,
requests or the engine.

Attention always goes through the paged KV cache: new keys/values are written to their slots
first, then each query attends to its sequence's pages with a causal mask by position. Prefill (many
tokens per sequence) and decode (one token) are the same code with a different `seq` length.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig, rope_inv_freq
from jaxserve.kv_cache import read_pages, write_pages
from jaxserve.sharding import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
_MASKED = -1e30  # finite, so an all-masked padding row gives a uniform softmax, not NaN


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype,
          init: Initializer | None = None) -> nnx.Param:
    """A parameter with its logical axes: the one declaration shardings are derived from."""
    init = init or nnx.initializers.normal(0.02)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis: str, dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), (axis,), dtype, nnx.initializers.ones)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32, cast back before the scale, as the HF reference does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return constrain(jnp.take(self.embedding[...], tokens, axis=0), ("batch", "seq", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: [.., embed] -> [.., vocab]."""
        return jnp.einsum("...e,ve->...v", x, self.embedding[...])


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of each position: [batch, seq] -> 2 x [batch, seq, head_dim // 2], float32."""
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.float32)
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves (the HF Llama convention): x [batch, seq, heads, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention over the paged KV cache (optionally with Qwen3's q/k RMSNorm)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, h, kv, d = config.hidden_size, config.num_heads, config.stored_kv_heads, config.head_dim
        self.q_proj = param(rngs, (e, h, d), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = param(rngs, (h, d, e), ("q_heads", "head_dim", "embed"), dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, "head_dim", dtype, rngs)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, "head_dim", dtype, rngs)
        self.qk_norm = config.qk_norm
        self.q_per_kv = config.q_per_kv
        self.scale = d ** -0.5

    def __call__(self, x, cos, sin, k_pages, v_pages, slots, positions, block_tables):
        """x [batch, seq, embed] -> ([batch, seq, embed], k_pages, v_pages)."""
        q = constrain(jnp.einsum("bte,ehd->bthd", x, self.q_proj[...]),
                      ("batch", "seq", "q_heads", "head_dim"))
        k = constrain(jnp.einsum("bte,ehd->bthd", x, self.k_proj[...]),
                      ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(jnp.einsum("bte,ehd->bthd", x, self.v_proj[...]),
                      ("batch", "seq", "kv_heads", "head_dim"))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        k_pages = write_pages(k_pages, k, slots)
        v_pages = write_pages(v_pages, v, slots)
        keys = constrain(read_pages(k_pages, block_tables), ("batch", None, "kv_heads", "head_dim"))
        values = constrain(read_pages(v_pages, block_tables),
                           ("batch", None, "kv_heads", "head_dim"))

        b, t, h, d = q.shape
        q = q.reshape(b, t, h // self.q_per_kv, self.q_per_kv, d)  # [batch, seq, kv_heads, group, head_dim]
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32)
        visible = jnp.arange(keys.shape[1])[None, None, :] <= positions[:, :, None]  # [b, t, s]
        scores = jnp.where(visible[:, None, None], scores * self.scale, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h, d)
        out = constrain(out, ("batch", "seq", "q_heads", "head_dim"))
        return jnp.einsum("bthd,hde->bte", out, self.o_proj[...]), k_pages, v_pages


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.gate_proj = param(rngs, (e, m), ("embed", "mlp"), dtype)
        self.up_proj = param(rngs, (e, m), ("embed", "mlp"), dtype)
        self.down_proj = param(rngs, (m, e), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = constrain(x @ self.gate_proj[...], ("batch", "seq", "mlp"))
        up = constrain(x @ self.up_proj[...], ("batch", "seq", "mlp"))
        return (jax.nn.silu(gate) * up) @ self.down_proj[...]
