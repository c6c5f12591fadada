"""DeepSeek-V2 / V3: the MoE decoder with multi-head latent attention (MLA), shared experts and
grouped routing.

Attention (`LatentAttention`, after DeepSeek-V2 section 2.1): the hidden state is compressed into a
latent c_kv [kv_lora_rank] (RMS-normalised) and one rope key k_pe [qk_rope_head_dim] shared by
the heads; only those are cached (`latent_cache_spec`: no head axis). A head's key is
[c_kv @ W_UK, k_pe] and its value c_kv @ W_UV, with W_UK / W_UV the two halves of kv_b_proj;
`jaxserve.ops.latent_attention` decides whether to expand them per context token or fold them
into the query and the output (absorbed). Queries come from the hidden state, or through a
q_lora_rank latent (q_a_proj, an RMSNorm, q_b_proj) when the config has one. RoPE rotates only
the last qk_rope_head_dim dims of each query and the rope key, in the rotate-half layout (the
importer de-interleaves checkpoints whose rope pairs are interleaved); YaRN's attention factor
is in the rope tables and its mscale in the softmax scale (`config.softmax_scale`).

The small projections into the latents (q_a_proj, kv_a_proj, k_pe_proj) are replicated over
`tp` like the router: every tensor-parallel device needs the whole latent of every token, and
the latent is what the cache keeps. W_UK and W_UV are read whole by the attention op, in their
declared layout on every platform (never stored transposed), in the weight format of the other
projections: int8 ones (the latent their input, as in kv_b_proj) are dequantized in the step.

Feed-forward: the first `first_k_dense_replace` layers (`mlp_only_layers`) keep the dense MLP;
the others are `DeepseekMoE`: routed experts (`ops.moe.route_grouped`) plus `n_shared_experts`
experts' width of an always-on SwiGLU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig, softmax_scale
from jaxserve.kv_cache import CacheBuffer, CacheSpec
from jaxserve.models.layers import MLP, RMSNorm, apply_rope, param, weight
from jaxserve.models.moe import MoE, MoEForCausalLM
from jaxserve.ops import moe
from jaxserve.ops.attention import AttentionMetadata
from jaxserve.ops.latent_attention import latent_attention
from jaxserve.ops.quant import declare_weight, project, read
from jaxserve.sharding import constrain

LATENT_NORM_EPS = 1e-6  # the reference's q_a / kv_a RMSNorms keep their default eps


def latent_cache_spec(config: ModelConfig, dtype) -> CacheSpec:
    """MLA keeps one latent and one rope key per token and layer, for every head."""
    dtype = jnp.dtype(dtype)
    return CacheSpec({"c_kv": CacheBuffer((config.kv_lora_rank,), ("latent",), dtype),
                      "k_pe": CacheBuffer((config.qk_rope_head_dim,), (None,), dtype)},
                     config.num_layers)


class LatentAttention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, h, d = config.hidden_size, config.num_heads, config.head_dim
        lat, rope = config.kv_lora_rank, config.qk_rope_head_dim
        q_lora = config.q_lora_rank
        if q_lora:
            self.q_a_proj = weight(rngs, (e, q_lora), ("embed", None), dtype, config, (0, 1))
            self.q_a_norm = RMSNorm(q_lora, LATENT_NORM_EPS, None, dtype, rngs)
            self.q_b_proj = weight(rngs, (q_lora, h, d), (None, "q_heads", "head_dim"), dtype,
                                   config, (0, 1))
        else:
            self.q_proj = weight(rngs, (e, h, d), ("embed", "q_heads", "head_dim"), dtype, config,
                                 (0, 1))
        self.kv_a_proj = weight(rngs, (e, lat), ("embed", "latent"), dtype, config, (0, 1))
        self.k_pe_proj = weight(rngs, (e, rope), ("embed", None), dtype, config, (0, 1))
        self.kv_a_norm = RMSNorm(lat, LATENT_NORM_EPS, "latent", dtype, rngs)
        self.k_b_proj = declare_weight(rngs, (lat, h, config.qk_nope_head_dim),
                                       ("latent", "q_heads", "head_dim"), dtype,
                                       config.quantization, (0, 1))  # W_UK
        self.v_b_proj = declare_weight(rngs, (lat, h, config.v_head_dim),
                                       ("latent", "q_heads", "head_dim"), dtype,
                                       config.quantization, (0, 1))  # W_UV
        self.o_proj = weight(rngs, (h, config.v_head_dim, e), ("q_heads", "head_dim", "embed"),
                             dtype, config, (0, 2))
        self.q_lora = bool(q_lora)
        self.nope = config.qk_nope_head_dim
        self.scale = softmax_scale(config)
        self.latent_split = config.latent_attention

    def __call__(self, x, cos, sin, cache: dict, metadata: AttentionMetadata):
        """x [tokens, embed] -> ([tokens, embed], the layer's updated cache)."""
        with jax.named_scope("attention"):
            if self.q_lora:
                q = project(self.q_a_norm(project(x, self.q_a_proj)), self.q_b_proj)
            else:
                q = project(x, self.q_proj)
            q = constrain(q, ("batch", "q_heads", "head_dim"))  # [tokens, q_heads, nope + rope]
            c_kv = constrain(self.kv_a_norm(project(x, self.kv_a_proj)), ("batch", "latent"))
            with jax.named_scope("rope"):
                q_pe = apply_rope(q[..., self.nope:], cos, sin)
                k_pe = apply_rope(project(x, self.k_pe_proj)[:, None], cos, sin)[:, 0]
            out, cache = latent_attention(q[..., :self.nope], q_pe, c_kv, k_pe,
                                          read(self.k_b_proj), read(self.v_b_proj), cache,
                                          metadata, self.scale, split=self.latent_split)
            out = constrain(out, ("batch", "q_heads", "head_dim"))  # [tokens, q_heads, v]
            return project(out.reshape(out.shape[0], -1), self.o_proj), cache


class DeepseekMoE(MoE):
    """Routed experts chosen by `config.topk_method` (V3's correction bias a parameter of its
    own, float like the router), plus the shared experts every token runs through."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype, rngs)
        if config.topk_method == "noaux_tc":
            self.score_bias = param(rngs, (config.num_experts,), (None,), dtype,
                                    nnx.initializers.zeros)
        if config.n_shared_experts:
            self.shared_experts = MLP(config, dtype, rngs,
                                      width=config.n_shared_experts * config.moe_intermediate_size)
        self.method, self.n_group, self.topk_group = (config.topk_method, config.n_group,
                                                      config.topk_group)
        self.scaling = config.routed_scaling_factor
        self.shared = bool(config.n_shared_experts)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        bias = self.score_bias[...] if self.method == "noaux_tc" else None
        return moe.route_grouped(x.astype(jnp.float32) @ self.router[...].astype(jnp.float32),
                                 self.top_k, self.method, self.n_group, self.topk_group,
                                 self.normalize, self.scaling, bias)

    def __call__(self, x: jax.Array, gathered: moe.ExpertWeights | None = None) -> jax.Array:
        routed = super().__call__(x, gathered)
        return routed + self.shared_experts(x) if self.shared else routed


class DeepseekForCausalLM(MoEForCausalLM):
    @staticmethod
    def attention(config: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
        return LatentAttention(config, dtype, rngs)

    @staticmethod
    def feed_forward(config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
        return (DeepseekMoE(config, dtype, rngs) if config.moe_layer(layer)
                else MLP(config, dtype, rngs))

    @staticmethod
    def cache_spec(config: ModelConfig, dtype) -> CacheSpec:
        return latent_cache_spec(config, dtype)


class DeepseekV2ForCausalLM(DeepseekForCausalLM):
    """DeepSeek-V2: softmax routing, greedy or group-limited."""


class DeepseekV3ForCausalLM(DeepseekForCausalLM):
    """DeepSeek-V3: sigmoid routing with the correction bias (`noaux_tc`)."""
