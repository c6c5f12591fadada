"""What a model holds, from its config alone: every parameter and the KV cache of one token.

The models declare their parameters in Flax (`jaxserve.models`), each with its shape and logical
axes; this module writes the same list from the config, without jax, so the performance model
can size what each device holds on a machine without accelerators. tests/test_perf.py checks
it against `jaxserve.checkpoint.param_specs` and `jaxserve.models.layers.kv_cache_spec` for
every family, so it cannot drift from what the engine runs.

Each parameter also says which op of the step reads it and which of its logical axes are
*contracted* with the activation (summed over): when the rules split a contracted axis, each
device holds a partial sum and the op ends with an all-reduce over those mesh axes. That is how
the model derives the collectives of a layout from the rules instead of assuming them.
"""

from __future__ import annotations

import dataclasses

from jaxserve.config import ModelConfig

OPS = ("embed", "attention", "mlp", "router", "experts", "lm_head", "norm")


@dataclasses.dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    op: str  # which op of the step reads it (one of OPS)
    contracts: tuple[str, ...] = ()  # logical axes summed over against the activation
    layer: int | None = None

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def parameters(config: ModelConfig) -> dict[str, Param]:
    """{name: Param} with the names checkpoints use, at the shapes `config` holds (a config
    fitted to a layout holds padded vocabulary rows and repeated KV heads)."""
    e, h, kv, d = config.hidden_size, config.num_heads, config.stored_kv_heads, config.head_dim
    out = {"embed/embedding": Param((config.vocab_rows, e), ("vocab", "embed"), "embed",
                                    ("vocab",)),
           "final_norm/scale": Param((e,), ("embed",), "norm")}
    if not config.tie_word_embeddings:
        out["lm_head"] = Param((config.vocab_rows, e), ("vocab", "embed"), "lm_head", ("embed",))
    for i in range(config.num_layers):
        p = f"layers/{i}/"
        out[p + "attn_norm/scale"] = Param((e,), ("embed",), "norm", layer=i)
        out[p + "mlp_norm/scale"] = Param((e,), ("embed",), "norm", layer=i)
        if config.is_mla:
            out.update(_latent_attention(config, i))
        else:
            qkv = ("embed",)
            out[p + "attn/q_proj"] = Param((e, h, d), ("embed", "q_heads", "head_dim"),
                                           "attention", qkv, i)
            for name in ("k_proj", "v_proj"):
                out[p + f"attn/{name}"] = Param((e, kv, d), ("embed", "kv_heads", "head_dim"),
                                                "attention", qkv, i)
            out[p + "attn/o_proj"] = Param((h, d, e), ("q_heads", "head_dim", "embed"),
                                           "attention", ("q_heads", "head_dim"), i)
        if config.qk_norm:
            out[p + "attn/q_norm/scale"] = Param((d,), ("head_dim",), "norm", layer=i)
            out[p + "attn/k_norm/scale"] = Param((d,), ("head_dim",), "norm", layer=i)
        if config.moe_layer(i):
            n, m = config.num_experts, config.moe_intermediate_size
            out[p + "mlp/router"] = Param((e, n), ("embed", None), "router", ("embed",), i)
            for name in ("gate_proj", "up_proj"):
                out[p + f"mlp/{name}"] = Param((n, e, m), ("experts", "embed", "expert_mlp"),
                                               "experts", ("embed",), i)
            out[p + "mlp/down_proj"] = Param((n, m, e), ("experts", "expert_mlp", "embed"),
                                             "experts", ("expert_mlp",), i)
            if config.topk_method == "noaux_tc":
                out[p + "mlp/score_bias"] = Param((n,), (None,), "router", layer=i)
            if config.n_shared_experts:  # always on: a dense SwiGLU beside the routed experts
                out.update(_swiglu(p + "mlp/shared_experts/", e,
                                   config.n_shared_experts * m, i))
        else:
            out.update(_swiglu(p + "mlp/", e, config.intermediate_size, i))
    return out


def _swiglu(prefix: str, e: int, m: int, layer: int) -> dict[str, Param]:
    out = {prefix + name: Param((e, m), ("embed", "mlp"), "mlp", ("embed",), layer)
           for name in ("gate_proj", "up_proj")}
    out[prefix + "down_proj"] = Param((m, e), ("mlp", "embed"), "mlp", ("mlp",), layer)
    return out


def _latent_attention(config: ModelConfig, i: int) -> dict[str, Param]:
    """MLA's projections (`models.deepseek.LatentAttention`): the query (through its q_lora_rank
    latent, if any), the latent and the rope key, W_UK / W_UV, o_proj over v_head_dim."""
    e, h, d, q = config.hidden_size, config.num_heads, config.head_dim, config.q_lora_rank
    lat, rope, v = config.kv_lora_rank, config.qk_rope_head_dim, config.v_head_dim
    p, heads = f"layers/{i}/attn/", ("q_heads", "head_dim")
    out = {}
    if q:
        out[p + "q_a_proj"] = Param((e, q), ("embed", None), "attention", ("embed",), i)
        out[p + "q_a_norm/scale"] = Param((q,), (None,), "norm", layer=i)
        out[p + "q_b_proj"] = Param((q, h, d), (None, *heads), "attention", (), i)
    else:
        out[p + "q_proj"] = Param((e, h, d), ("embed", *heads), "attention", ("embed",), i)
    out[p + "kv_a_proj"] = Param((e, lat), ("embed", "latent"), "attention", ("embed",), i)
    out[p + "k_pe_proj"] = Param((e, rope), ("embed", None), "attention", ("embed",), i)
    out[p + "kv_a_norm/scale"] = Param((lat,), ("latent",), "norm", layer=i)
    # absorbed decode contracts W_UK with the query's heads' nope dims and W_UV with the latent
    out[p + "k_b_proj"] = Param((lat, h, config.qk_nope_head_dim), ("latent", *heads),
                                "attention", (), i)
    out[p + "v_b_proj"] = Param((lat, h, v), ("latent", *heads), "attention", (), i)
    out[p + "o_proj"] = Param((h, v, e), (*heads, "embed"), "attention", heads, i)
    return out


def kv_cache_per_token(config: ModelConfig) -> dict[str, tuple[tuple[int, ...],
                                                               tuple[str | None, ...]]]:
    """The cache buffers one token keeps in one layer: {name: (shape, logical axes)}. GQA keeps
    a key and a value per stored KV head (as `jaxserve.models.layers.kv_cache_spec` declares);
    latent attention one latent and one rope key (`models.deepseek.latent_cache_spec`)."""
    if config.is_mla:
        return {"c_kv": ((config.kv_lora_rank,), ("latent",)),
                "k_pe": ((config.qk_rope_head_dim,), (None,))}
    buffer = ((config.stored_kv_heads, config.head_dim), ("kv_heads", "head_dim"))
    return {"k": buffer, "v": buffer}
