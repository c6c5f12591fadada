"""Layers shared by the dense decoder families: norms, embeddings, RoPE, attention, MLP.

Every parameter is declared once, here, with its shape and *logical* axes (`param`); shardings are
derived from that declaration (see jaxserve/sharding.py). Activations that matter for
partitioning are pinned with `constrain` by logical name. Nothing here knows about meshes,
requests or the engine.

Activations are token-major, `[tokens, ...]`: a step's prefill chunks and decodes are one flat
batch. Attention goes through `jaxserve.ops.attention.paged_attention`, which owns the KV cache
(writes this step's keys/values, reads each sequence's context); layers never see pages.

Linear weights are declared with `weight` (a format is part of the declaration: float, or int8
with scales, `jaxserve.ops.quant`) and multiplied with `project` (read whole with `read`), inside
the step; models never branch on a format. Norm scales and the MoE router stay float (`param`).

Blocks run under `jax.named_scope` ("attention", "mlp"; "moe" in models/moe.py; "layer_{i}",
"lm_head" in the model), so a device profile and the HLO's op names speak the model's words.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig, rope_attention_factor, rope_inv_freq
from jaxserve.kv_cache import CacheBuffer, CacheSpec
from jaxserve.ops.attention import AttentionMetadata, paged_attention
from jaxserve.ops.quant import declare_weight, project, project_all, read
from jaxserve.sharding import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype,
          init: Initializer | None = None) -> nnx.Param:
    """A parameter with its logical axes: the one declaration shardings are derived from."""
    init = init or nnx.initializers.normal(0.02)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes))


def weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype,
           config: ModelConfig, inputs: tuple[int, int], embedding: bool = False):
    """A linear layer's weight in the config's format and layout; `shape`, `axes` and `inputs`
    (the [start, stop) dims it contracts) as declared. The embedding / LM head are quantized
    only when the config says so."""
    quantized = config.quantize_embeddings or not embedding
    return declare_weight(rngs, shape, axes, dtype, config.quantization if quantized else None,
                          inputs, layout=config.weight_layout)


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
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.embedding = weight(rngs, (config.vocab_rows, config.hidden_size), ("vocab", "embed"),
                                dtype, config, (1, 2), embedding=True)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return constrain(jnp.take(read(self.embedding), tokens, axis=0), ("batch", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: [.., embed] -> [.., vocab]."""
        return project(x, self.embedding)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of each position: [tokens] -> 2 x [tokens, rope_dim // 2], float32 (times
    YaRN's attention factor, when the config has one)."""
    inv_freq = jnp.asarray(rope_inv_freq(config), jnp.float32)
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq
    factor = rope_attention_factor(config)
    if factor != 1.0:
        return jnp.cos(angles) * factor, jnp.sin(angles) * factor
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves (the HF Llama convention): x [tokens, heads, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def kv_cache_spec(config: ModelConfig, dtype) -> CacheSpec:
    """GQA keeps a key and a value per token, layer and (stored) KV head."""
    buffer = CacheBuffer((config.stored_kv_heads, config.head_dim), ("kv_heads", "head_dim"),
                         jnp.dtype(dtype))
    return CacheSpec({"k": buffer, "v": buffer}, config.num_layers)


class Attention(nnx.Module):
    """Grouped-query attention over the paged KV cache (optionally with Qwen3's q/k RMSNorm)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, h, kv, d = config.hidden_size, config.num_heads, config.stored_kv_heads, config.head_dim
        self.q_proj = weight(rngs, (e, h, d), ("embed", "q_heads", "head_dim"), dtype, config,
                             (0, 1))
        self.k_proj = weight(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), dtype, config,
                             (0, 1))
        self.v_proj = weight(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), dtype, config,
                             (0, 1))
        self.o_proj = weight(rngs, (h, d, e), ("q_heads", "head_dim", "embed"), dtype, config,
                             (0, 2))
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, "head_dim", dtype, rngs)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, "head_dim", dtype, rngs)
        self.qk_norm = config.qk_norm
        self.scale = d ** -0.5

    def __call__(self, x, cos, sin, cache: dict, metadata: AttentionMetadata):
        """x [tokens, embed] -> ([tokens, embed], the layer's updated cache)."""
        with jax.named_scope("attention"):
            return self._attend(x, cos, sin, cache, metadata)

    def _attend(self, x, cos, sin, cache: dict, metadata: AttentionMetadata):
        q, k, v = project_all(x, (self.q_proj, self.k_proj, self.v_proj))
        q = constrain(q, ("batch", "q_heads", "head_dim"))
        k = constrain(k, ("batch", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "kv_heads", "head_dim"))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, cache = paged_attention(q, k, v, cache, metadata, self.scale)
        out = constrain(out, ("batch", "q_heads", "head_dim"))
        # One [tokens, heads*head_dim] x [heads*head_dim, embed] product: written as a two-axis
        # contraction, XLA CPU copied o_proj into another layout on every step.
        return project(out.reshape(out.shape[0], -1), self.o_proj), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward (of `width`, by default the config's intermediate_size)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs, width: int | None = None):
        e, m = config.hidden_size, width or config.intermediate_size
        self.gate_proj = weight(rngs, (e, m), ("embed", "mlp"), dtype, config, (0, 1))
        self.up_proj = weight(rngs, (e, m), ("embed", "mlp"), dtype, config, (0, 1))
        self.down_proj = weight(rngs, (m, e), ("mlp", "embed"), dtype, config, (0, 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            gate, up = project_all(x, (self.gate_proj, self.up_proj))
            gate, up = constrain(gate, ("batch", "mlp")), constrain(up, ("batch", "mlp"))
            return project(jax.nn.silu(gate) * up, self.down_proj)
