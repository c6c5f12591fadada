"""FLOPs a model needs: the one count that stats, routing, benchmarks and planning all use.

*True* FLOPs are what the math asks for, nothing the hardware layout adds: the matmuls of the
dense parts for every token, the experts each token really uses (its top-k, not all experts),
attention's score and value products over each token's real context (causal, unpadded: the
quadratic term), and the LM head only on rows whose logits are read. A multiply-add is 2 FLOPs.
Counts use the model's own sizes (`vocab_size`, `num_kv_heads`), never a layout's padding or KV
head copies. Like `config`, this module never imports jax: planning tools read it without devices.
"""

from __future__ import annotations

import functools

from jaxserve.config import ModelConfig


def attention_projection_flops(config: ModelConfig) -> int:
    """q, k, v and o projections of one token in one layer. Latent attention: the query (through
    its q_lora_rank latent, if any), the latent and rope key, and with absorbed attention each
    head's query folded through W_UK and its output through W_UV, then o_proj."""
    if not config.is_mla:
        return 2 * config.hidden_size * config.head_dim * (2 * config.num_heads
                                                           + 2 * config.num_kv_heads)
    e, h, d, q = config.hidden_size, config.num_heads, config.head_dim, config.q_lora_rank
    lat, rope = config.kv_lora_rank, config.qk_rope_head_dim
    query = e * q + q * h * d if q else e * h * d
    absorbed = h * lat * (config.qk_nope_head_dim + config.v_head_dim)
    return 2 * (query + e * (lat + rope) + absorbed + h * config.v_head_dim * e)


def mlp_flops(config: ModelConfig, layer: int) -> int:
    """One token through layer `layer`'s MLP: the dense SwiGLU, or the router plus the
    `num_experts_per_tok` experts the token is sent to and the shared experts (if any)."""
    if not config.moe_layer(layer):
        return 2 * 3 * config.hidden_size * config.intermediate_size
    return (router_flops(config) + config.num_experts_per_tok * expert_flops(config)
            + shared_experts_flops(config))


def router_flops(config: ModelConfig) -> int:
    """One token's router logits in one MoE layer."""
    return 2 * config.hidden_size * config.num_experts


def expert_flops(config: ModelConfig) -> int:
    """One token through ONE expert (a SwiGLU of width `moe_intermediate_size`)."""
    return 2 * 3 * config.hidden_size * config.moe_intermediate_size


def shared_experts_flops(config: ModelConfig) -> int:
    """One token through one MoE layer's shared experts (DeepSeek): always on, one SwiGLU of
    `n_shared_experts` experts' width beside the routed ones."""
    return config.n_shared_experts * expert_flops(config)


@functools.lru_cache(maxsize=64)  # the engine asks per sequence and step: one sum per model
def dense_flops_per_token(config: ModelConfig) -> int:
    """Every matmul one token needs in the decoder, attention scores excluded."""
    return sum(attention_projection_flops(config) + mlp_flops(config, i)
               for i in range(config.num_layers))


def attention_score_flops(config: ModelConfig, start: int, end: int) -> int:
    """Scores (q.k) and weighted values (p.v) of the tokens at positions start..end-1 of one
    sequence, each attending to itself and every earlier position, over all layers."""
    keys = (end * (end + 1) - start * (start + 1)) // 2  # sum of (p + 1) for p in [start, end)
    if config.is_mla:  # absorbed: scores over latent + rope key, values over the latent
        per_key = 2 * config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_layers * 2 * config.num_heads * per_key * keys
    return config.num_layers * 2 * 2 * config.num_heads * config.head_dim * keys


def lm_head_flops(config: ModelConfig, rows: int = 1) -> int:
    return 2 * config.hidden_size * config.vocab_size * rows


def chunk_flops(config: ModelConfig, start: int, end: int, logit_rows: int = 1) -> int:
    """Tokens start..end-1 of one sequence run through the model (its context before `start`
    already cached), with `logit_rows` rows of logits computed."""
    return ((end - start) * dense_flops_per_token(config)
            + attention_score_flops(config, start, end) + lm_head_flops(config, logit_rows))
