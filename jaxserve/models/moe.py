"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral): the Llama decoder with some or all MLPs
replaced by a router over stacked SwiGLU experts.

Experts are stacked into one array per projection and layer with a logical `experts` axis
(`[experts, embed, expert_mlp]`, `[experts, expert_mlp, embed]`), so a rules file can split them
over `ep` and their width over `tp`. How tokens meet their experts (dense, all-to-all of tokens,
all-gather of weights) is `jaxserve.ops.moe`'s business, chosen when the step is traced. The one
thing the model owns is *when* weights are gathered: under `allgather` it issues each MoE layer's
gather while the previous layer runs (`__call__`), so the transfer can hide behind compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.kv_cache import KVPool
from jaxserve.models.layers import MLP, param, rope_tables, weight
from jaxserve.models.llama import LlamaForCausalLM
from jaxserve.ops import moe
from jaxserve.ops.attention import AttentionMetadata
from jaxserve.ops.quant import read
from jaxserve.sharding import constrain


class MoE(nnx.Module):
    """Softmax router, top-k experts per token, their outputs weighted by the routing
    probabilities (renormalised over the top-k when the config says so)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, n, m = config.hidden_size, config.num_experts, config.moe_intermediate_size
        self.router = param(rngs, (e, n), ("embed", None), dtype)  # small: on every device
        self.gate_proj = weight(rngs, (n, e, m), moe.EXPERT_AXES, dtype, config, (1, 2))
        self.up_proj = weight(rngs, (n, e, m), moe.EXPERT_AXES, dtype, config, (1, 2))
        self.down_proj = weight(rngs, (n, m, e), moe.DOWN_AXES, dtype, config, (1, 2))
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's top-k expert ids and routing weights."""
        return moe.route(x @ self.router[...], self.top_k, self.normalize)

    def experts(self) -> moe.ExpertWeights:
        # Read (dequantized) in the global view, so every strategy gets float experts.
        return moe.ExpertWeights(read(self.gate_proj), read(self.up_proj), read(self.down_proj))

    def __call__(self, x: jax.Array, gathered: moe.ExpertWeights | None = None) -> jax.Array:
        """x [tokens, embed]; `gathered`: this layer's experts already all-gathered."""
        with jax.named_scope("moe"):
            ids, weights = self.route(x)
            ids, weights = constrain(ids, moe.PAIR_AXES), constrain(weights, moe.PAIR_AXES)
            strategy = moe.active_strategy(x.shape[0])
            return moe.run_experts(strategy, x, ids, weights.astype(x.dtype), self.experts(),
                                   gathered)


class MoEForCausalLM(LlamaForCausalLM):
    @staticmethod
    def feed_forward(config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
        return MoE(config, dtype, rngs) if config.moe_layer(layer) else MLP(config, dtype, rngs)

    def __call__(self, tokens: jax.Array, kv: KVPool,
                 metadata: AttentionMetadata) -> tuple[jax.Array, KVPool]:
        cos, sin = rope_tables(self.config, metadata.positions)
        x = self.embed(tokens)
        moe_layers = [i for i in range(self.config.num_layers) if self.config.moe_layer(i)]
        prefetch = moe.active_strategy(tokens.shape[0]) == "allgather"
        gathered: dict[int, moe.ExpertWeights] = {}
        if prefetch and moe_layers:
            gathered[moe_layers[0]] = moe.gather_experts(self.layers[moe_layers[0]].mlp.experts())
        layers = []
        for i, layer in enumerate(self.layers):
            ahead = [j for j in moe_layers if j > i][:1]
            if prefetch and ahead:
                # The next MoE layer's gather may start once this layer starts (the barrier
                # ties its input to this layer's input, bounding gathered weights to two
                # layers) and nothing here waits for it: it overlaps this layer's compute.
                x, local = jax.lax.optimization_barrier(
                    (x, self.layers[ahead[0]].mlp.experts()))
                gathered[ahead[0]] = moe.gather_experts(local)
            extra = {"gathered": gathered.pop(i)} if i in gathered else {}
            with jax.named_scope(f"layer_{i}"):
                x, cache = layer(x, cos, sin, kv.layer(i), metadata, **extra)
            layers.append(cache)
        return self.final_norm(x), KVPool.from_layers(layers)


class Qwen3MoeForCausalLM(MoEForCausalLM):
    """Qwen3-MoE: Qwen3 attention (q/k RMSNorm), MoE layers by `decoder_sparse_step` and
    `mlp_only_layers`, top-k probabilities renormalised when `norm_topk_prob`."""

    def __init__(self, config: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        if not config.qk_norm:
            raise ValueError("a Qwen3-MoE config must have qk_norm=True")
        super().__init__(config, dtype, rngs=rngs)


class MixtralForCausalLM(MoEForCausalLM):
    """Mixtral: Llama/Mistral attention, every layer MoE, top-k probabilities renormalised."""
