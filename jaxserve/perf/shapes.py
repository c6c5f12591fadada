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
        qkv = ("embed",)
        out[p + "attn/q_proj"] = Param((e, h, d), ("embed", "q_heads", "head_dim"), "attention",
                                       qkv, i)
        for name in ("k_proj", "v_proj"):
            out[p + f"attn/{name}"] = Param((e, kv, d), ("embed", "kv_heads", "head_dim"),
                                            "attention", qkv, i)
        out[p + "attn/o_proj"] = Param((h, d, e), ("q_heads", "head_dim", "embed"), "attention",
                                       ("q_heads", "head_dim"), i)
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
        else:
            m = config.intermediate_size
            for name in ("gate_proj", "up_proj"):
                out[p + f"mlp/{name}"] = Param((e, m), ("embed", "mlp"), "mlp", ("embed",), i)
            out[p + "mlp/down_proj"] = Param((m, e), ("mlp", "embed"), "mlp", ("mlp",), i)
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
