"""Model configuration: what a checkpoint's architecture is, read from HF or our own config.json.

`ModelConfig` is the one description of an architecture every layer uses. It is built from an HF
`config.json` by `from_hf_config`, which accepts only what the models implement: a field whose value
would change the computation in a way we do not implement is rejected by name, never ignored.
This module must never import jax: it is read by tools that do not touch devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen3", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")  # multi-head latent attention
# HF model_type -> our family. Mistral without a binding sliding window is a Llama.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen3": "qwen3",
                  "qwen3_moe": "qwen3_moe", "mixtral": "mixtral",
                  "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}
ROPE_TYPES = ("default", "llama3", "yarn")
# How a MoE router picks its top-k (jaxserve/ops/moe.py `route`): softmax then top-k ("greedy",
# Qwen3-MoE, Mixtral, DeepSeek-V2), softmax top-k within the `topk_group` groups of experts with
# the best expert ("group_limited_greedy", DeepSeek-V2), sigmoid scores plus a per-expert
# correction bias choosing the groups (by their two best) and experts, weighted by the scores
# without the bias ("noaux_tc", DeepSeek-V3).
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
FORMAT_VERSION = 1
# Weight formats (jaxserve/ops/quant.py): int8 with a float32 scale per output channel, or per
# group of this many consecutive input elements.
QUANTIZATION_GROUPS = (32, 64, 128)
QUANTIZATIONS = ("int8",) + tuple(f"int8-g{g}" for g in QUANTIZATION_GROUPS)
# How float linear weights are stored on the devices (jaxserve/ops/quant.py decides which per
# platform): as declared, inputs first ("in_out"), or with the inputs last ("out_in").
WEIGHT_LAYOUTS = ("in_out", "out_in")
WEIGHT_LAYOUT_CHOICES = ("auto",) + WEIGHT_LAYOUTS  # what a user may ask for; auto: the platform's
# How an MLA model's latent is laid out (jaxserve/ops/latent_attention.py): whole on every
# tensor-parallel device, or split over tp; and the transform folded into the weights before
# it is split (jaxserve/ops/latent_transform.py).
LATENT_ATTENTIONS = ("mla", "tpla", "tpla-decode")
LATENT_TRANSFORMS = ("hadamard", "pca", "none")
# Fields that describe how the devices hold the model, set at load and never saved.
LAYOUT_FIELDS = ("padded_vocab_size", "kv_head_copies", "weight_layout", "latent_attention",
                 "latent_transform")


def quantization_group(quantization: str) -> int | None:
    """Elements per scale along a weight's inputs: None for per channel ("int8")."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                          f"got {quantization!r}")
    return None if quantization == "int8" else int(quantization.removeprefix("int8-g"))


class ConfigError(ValueError):
    """An HF or jaxserve config asks for something jaxserve does not implement."""


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (rope_type "yarn", DeepSeek-V2/V3): interpolated low frequencies, a
    factor on cos/sin (`attention_factor`) and, with `mscale_all_dim`, on the softmax scale."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    rope_type: str = "yarn"  # tells the two scalings apart in our config.json


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | YarnScaling | None = None
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # dtype the weights were stored in
    # Mixture of experts (num_experts > 0): a MoE layer's MLP is `num_experts` SwiGLU experts of
    # width `moe_intermediate_size`; a softmax router picks `num_experts_per_tok` per token, their
    # probabilities renormalised to sum to 1 when `norm_topk_prob`. Layer i is MoE when
    # (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers (Qwen3-MoE's rule;
    # Mixtral: every layer); the others keep the dense MLP of `intermediate_size`.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Routing (TOPK_METHODS): groups of experts (`n_group`, the best `topk_group` kept), the
    # routing weights times `routed_scaling_factor`, and `n_shared_experts` experts' width of
    # one always-on SwiGLU beside the routed ones (DeepSeek).
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    # Multi-head latent attention (MLA_FAMILIES): each token caches a latent of `kv_lora_rank`
    # (keys and values of every head are its up-projections) and one shared rope key of
    # `qk_rope_head_dim`; a head's query and key are `qk_nope_head_dim` + `qk_rope_head_dim`
    # wide (`head_dim` is their sum), its value `v_head_dim`. Queries come from the hidden state
    # directly, or through a `q_lora_rank` latent when set.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # The linear layers' weight format (None: float in `dtype`; else one of QUANTIZATIONS) and
    # whether the embedding / LM head share it (else they stay float).
    quantization: str | None = None
    quantize_embeddings: bool = False
    # How the model is laid out on a mesh (set by `jaxserve.placement.fit_to_layout`, never
    # saved): the vocabulary padded to a multiple of the axes that split it, and each KV head
    # repeated so that every tensor-parallel device holds the head its query heads read.
    padded_vocab_size: int | None = None
    kv_head_copies: int = 1
    # How float linear weights are stored (WEIGHT_LAYOUTS; set at load, never saved): checkpoints
    # always hold them as declared ("in_out").
    weight_layout: str = "in_out"
    # How an MLA model's latent is laid out (settings.LATENT_ATTENTIONS, set at load, never
    # saved): whole on every device ("mla"), or split over the devices that split `latent`
    # with per-shard attention ("tpla"; "tpla-decode": exact prefill), after the orthogonal
    # `latent_transform` was folded into the weights.
    latent_attention: str = "mla"
    latent_transform: str = "none"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        moe = self.family in MOE_FAMILIES
        if moe != (self.num_experts > 0):
            raise ConfigError(f"family {self.family!r} {'needs' if moe else 'cannot have'} "
                              f"experts, got num_experts={self.num_experts!r}")
        if moe:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                         "decoder_sparse_step"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) is more than "
                                  f"num_experts ({self.num_experts})")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"mlp_only_layers {bad} are not layers of a "
                                  f"{self.num_layers}-layer model")

        _check_choice("topk_method", self.topk_method, TOPK_METHODS)
        if self.topk_method != "greedy":
            self._check_groups()
        if (self.family in MLA_FAMILIES) != self.is_mla:
            raise ConfigError(f"family {self.family!r} "
                              f"{'needs' if self.family in MLA_FAMILIES else 'cannot have'} a "
                              f"latent, got kv_lora_rank={self.kv_lora_rank!r}")
        if self.is_mla:
            self._check_latent()
        _check_choice("attention", self.latent_attention, LATENT_ATTENTIONS)
        _check_choice("latent_transform", self.latent_transform, LATENT_TRANSFORMS)
        if self.latent_attention != "mla" and not self.is_mla:
            raise ConfigError(f"attention={self.latent_attention!r} splits a latent-attention "
                              f"model's latent; family {self.family!r} has none (use 'mla', "
                              f"the default, or a {' / '.join(MLA_FAMILIES)} model)")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ConfigError(f"weight_layout must be one of {', '.join(WEIGHT_LAYOUTS)}, got "
                              f"{self.weight_layout!r}")
        if self.quantization is not None:
            self._check_quantization()
        elif self.quantize_embeddings:
            raise ConfigError("quantize_embeddings=True needs a quantization (e.g. 'int8')")

    def _check_groups(self) -> None:
        n, g, k = self.num_experts, self.n_group, self.topk_group
        if not isinstance(g, int) or g <= 0 or n % g:
            raise ConfigError(f"n_group must be a positive divisor of num_experts ({n}), "
                              f"got {g!r}")
        if not isinstance(k, int) or not 0 < k <= g:
            raise ConfigError(f"topk_group must be in [1, n_group={g}], got {k!r}")
        if self.topk_method == "noaux_tc" and n // g < 2:
            raise ConfigError(f"topk_method 'noaux_tc' scores a group by its two best experts: "
                              f"n_group={g} leaves {n // g} expert(s) per group")
        if self.num_experts_per_tok > k * (n // g):
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) is more than "
                              f"the {k} groups of {n // g} experts a token may use")

    def _check_latent(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ConfigError(f"head_dim ({self.head_dim}) must be qk_nope_head_dim + "
                              f"qk_rope_head_dim ({self.qk_nope_head_dim} + "
                              f"{self.qk_rope_head_dim})")
        if self.num_kv_heads != self.num_heads:
            raise ConfigError(f"a latent-attention model has num_kv_heads == num_heads "
                              f"({self.num_heads}), got {self.num_kv_heads}")
        q = self.q_lora_rank
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q <= 0):
            raise ConfigError(f"q_lora_rank must be a positive integer or None, got {q!r}")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """Dims of a query / key that RoPE rotates: the whole head, or MLA's rope part."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def quantized_inputs(self) -> dict[str, int]:
        """Input size (elements one output sums over) of each kind of quantized weight."""
        e = self.hidden_size
        sizes = {"q_proj, k_proj, v_proj, gate_proj, up_proj (hidden_size)": e,
                 "o_proj (num_heads * head_dim)": self.num_heads * self.head_dim}
        if self.is_mla:
            del sizes["o_proj (num_heads * head_dim)"]
            sizes["o_proj (num_heads * v_head_dim)"] = self.num_heads * self.v_head_dim
            sizes["k_b_proj, v_b_proj (kv_lora_rank)"] = self.kv_lora_rank
            if self.q_lora_rank:
                sizes["q_b_proj (q_lora_rank)"] = self.q_lora_rank
            if self.n_shared_experts:
                sizes["shared down_proj"] = self.n_shared_experts * self.moe_intermediate_size
        if self.num_moe_layers < self.num_layers:
            sizes["down_proj (intermediate_size)"] = self.intermediate_size
        if self.is_moe:
            sizes["expert down_proj (moe_intermediate_size)"] = self.moe_intermediate_size
        return sizes

    def _check_quantization(self) -> None:
        group = quantization_group(self.quantization)
        for what, size in self.quantized_inputs().items():
            if group is not None and size % group:
                raise ConfigError(
                    f"quantization {self.quantization!r}: group size {group} does not divide "
                    f"the input dim of {what} = {size}; choose a group size that divides it "
                    f"or per-channel 'int8'")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def moe_layer(self, i: int) -> bool:
        """Whether layer i's MLP is a mixture of experts (else the dense MLP)."""
        return (self.is_moe and (i + 1) % self.decoder_sparse_step == 0
                and i not in self.mlp_only_layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer(i) for i in range(self.num_layers))

    @property
    def q_per_kv(self) -> int:
        """Query heads per *stored* KV head."""
        return self.num_heads // self.stored_kv_heads

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding / columns of the LM head: the vocabulary plus padding."""
        return self.padded_vocab_size or self.vocab_size

    @property
    def stored_kv_heads(self) -> int:
        """KV heads as the weights and the cache hold them (copies included)."""
        return self.num_kv_heads * self.kv_head_copies

    def num_params(self) -> int:
        """Every parameter (all experts included)."""
        e, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = (self._latent_attention_params() if self.is_mla
                else e * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads))
        per_layer = attn + 2 * e + (2 * self.head_dim if self.qk_norm else 0)
        moe = self.num_moe_layers
        m = self.moe_intermediate_size
        moe_block = (self.num_experts * (3 * e * m + e) + 3 * e * m * self.n_shared_experts
                     + (self.num_experts if self.topk_method == "noaux_tc" else 0))
        mlp = (self.num_layers - moe) * 3 * e * i + moe * moe_block
        head = 0 if self.tie_word_embeddings else e * v
        return v * e + self.num_layers * per_layer + mlp + e + head

    def _latent_attention_params(self) -> int:
        e, h, d, q = self.hidden_size, self.num_heads, self.head_dim, self.q_lora_rank
        lat, rope, v = self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim
        query = e * q + q + q * h * d if q else e * h * d
        return (query + e * (lat + rope) + lat + lat * h * (self.qk_nope_head_dim + v)
                + h * v * e)

    # ---- our own config.json ----
    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in LAYOUT_FIELDS:  # a property of the layout, not the model
            del d[name]
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return {"format_version": FORMAT_VERSION, **d}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        d = dict(d)
        version = d.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version must be {FORMAT_VERSION}, got {version!r}")
        known = {f.name for f in dataclasses.fields(cls)} - set(LAYOUT_FIELDS)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}")
        scaling = d.get("rope_scaling")
        if scaling is not None:
            d["rope_scaling"] = (YarnScaling(**scaling) if scaling.get("rope_type") == "yarn"
                                 else RopeScaling(**scaling))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["mlp_only_layers"] = tuple(d.get("mlp_only_layers", ()))
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        return cls.from_json_dict(json.loads(path.read_text()), source=str(path))


# ---- HF config.json ----

# Fields that never change what the forward pass computes at inference.
_HF_INERT_FIELDS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
    "pretraining_tp",  # only slices the matmuls, same result
    "max_window_layers",  # only read when use_sliding_window is true, which we reject
    "layer_types",  # checked below: every layer must be full attention
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
}
# Mixture-of-experts fields: read below, or (router losses, training-time noise) inert.
_HF_MOE_FIELDS = {
    "qwen3_moe": {"num_experts", "num_local_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                  "mlp_only_layers", "output_router_logits", "router_aux_loss_coef"},
    "mixtral": {"num_local_experts", "num_experts_per_tok", "output_router_logits",
                "router_aux_loss_coef", "router_jitter_noise"},
}
# DeepSeek-V2/V3: latent attention and routing fields (read below); `qk_head_dim` is derived,
# the multi-token-prediction layers are not part of the causal LM's forward pass, and the
# others (aux losses, the training-time ep_size) do not change inference.
_HF_DEEPSEEK_FIELDS = {
    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "qk_head_dim", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
    "n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group",
    "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "rope_interleave",
    "output_router_logits", "aux_loss_alpha", "seq_aux", "ep_size", "num_nextn_predict_layers",
    "num_mtp_layers",
}
for _family in ("deepseek_v2", "deepseek_v3"):
    _HF_MOE_FIELDS[_family] = _HF_DEEPSEEK_FIELDS
_YARN_FIELDS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "attention_factor", "truncate"}


def _rope_from_hf(hf: dict[str, Any], where: str
                  ) -> tuple[float, RopeScaling | YarnScaling | None]:
    """Both dialects: transformers 5 `rope_parameters`, older top-level rope_theta + rope_scaling.
    YaRN is read for the latent-attention families (the ones whose parity is tested with it)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "yarn":
        if hf.get("model_type") not in MLA_FAMILIES:
            raise ConfigError(f"{where}: rope_type 'yarn' is supported for model_type "
                              f"{' and '.join(MLA_FAMILIES)} only, not {hf.get('model_type')!r}")
        return float(theta), _yarn_from_hf(params, hf, where)
    if rope_type == "default":
        extra = set(params) - {"rope_theta", "rope_type", "type", "partial_rotary_factor"}
        if extra:
            raise ConfigError(f"{where}: rope fields {sorted(extra)} are not supported with "
                              f"rope_type 'default'")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor "
                              f"{params['partial_rotary_factor']!r} is not supported")
        return float(theta), None
    try:
        scaling_cfg = RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"{where}: llama3 rope scaling needs field {e.args[0]!r}") from None
    return float(theta), scaling_cfg


def _yarn_from_hf(params: dict[str, Any], hf: dict[str, Any], where: str) -> YarnScaling:
    extra = set(params) - _YARN_FIELDS - {"rope_theta", "rope_type", "type"}
    if extra:
        raise ConfigError(f"{where}: rope fields {sorted(extra)} are not supported with "
                          f"rope_type 'yarn'")
    if "original_max_position_embeddings" not in params:
        raise ConfigError(f"{where}: yarn rope scaling needs field "
                          f"'original_max_position_embeddings'")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor")
    factor = float(factor) if factor is not None else (
        int(hf.get("max_position_embeddings", 2048)) / original)
    optional = {name: float(params[name]) for name in ("mscale", "mscale_all_dim",
                                                       "attention_factor")
                if params.get(name) is not None}
    return YarnScaling(factor=factor, original_max_position_embeddings=original,
                       beta_fast=float(params.get("beta_fast") or 32.0),
                       beta_slow=float(params.get("beta_slow") or 1.0),
                       truncate=bool(params.get("truncate", True)), **optional)


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(HF_MODEL_TYPES)})")
    unknown = sorted(set(hf) - _HF_INERT_FIELDS - _HF_MOE_FIELDS.get(model_type, set()))
    if unknown:
        raise ConfigError(f"{where}: unsupported field(s) {unknown} for model_type {model_type!r}")

    def reject(field: str, value: Any, why: str) -> None:
        raise ConfigError(f"{where}: {field}={value!r} is not supported: {why}")

    if hf.get("hidden_act", "silu") != "silu":
        reject("hidden_act", hf["hidden_act"], "only 'silu' is implemented")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            reject(field, hf[field], "projections with bias are not implemented")
    if hf.get("use_sliding_window", False):
        reject("use_sliding_window", hf["use_sliding_window"],
               "sliding-window attention is not implemented")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    # A window at least as long as the longest sequence never masks anything: same computation.
    if window is not None and model_type not in ("qwen3", "qwen3_moe") and int(window) < max_pos:
        reject("sliding_window", window, "sliding-window attention is not implemented; a window "
               f"shorter than max_position_embeddings ({max_pos}) would change the result")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        reject("layer_types", sorted(set(layer_types)), "only 'full_attention' is implemented")

    theta, scaling = _rope_from_hf(hf, where)
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // num_heads
    if model_type in MLA_FAMILIES:  # HF's head_dim is the rope part; ours is the whole q/k head
        head_dim = int(hf["qk_nope_head_dim"]) + int(hf["qk_rope_head_dim"])
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    try:
        moe = (_deepseek_from_hf(hf, model_type, where) if model_type in MLA_FAMILIES
               else _moe_from_hf(hf, model_type))
        return ModelConfig(
            family=HF_MODEL_TYPES[model_type],
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=(num_heads if model_type in MLA_FAMILIES  # one latent serves all heads
                          else int(hf.get("num_key_value_heads") or num_heads)),
            head_dim=int(head_dim),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(dtype),
            **moe,
        )
    except KeyError as e:
        raise ConfigError(f"{where}: required field {e.args[0]!r} is missing") from None


def _moe_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Our MoE fields from an HF config (empty for dense families). Qwen3-MoE's config has
    been written with `num_experts` and with `num_local_experts`; both are read."""
    if model_type == "qwen3_moe":
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        if experts is None:
            raise KeyError("num_experts")
        return dict(num_experts=int(experts),
                    num_experts_per_tok=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["moe_intermediate_size"]),
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                    decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
                    mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()))
    if model_type == "mixtral":  # every layer MoE, expert width intermediate_size, renormalised
        return dict(num_experts=int(hf["num_local_experts"]),
                    num_experts_per_tok=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True)
    return {}


def _deepseek_from_hf(hf: dict[str, Any], model_type: str, where: str) -> dict[str, Any]:
    """Latent attention and DeepSeek-MoE fields. V2 scores by softmax (greedy or
    group-limited top-k); V3 by sigmoid with the correction bias (`noaux_tc`)."""
    def reject(field: str, why: str) -> None:
        raise ConfigError(f"{where}: {field}={hf[field]!r} is not supported: {why}")

    v3 = model_type == "deepseek_v3"
    allowed = TOPK_METHODS[2:] if v3 else TOPK_METHODS[:2]
    method = hf.get("topk_method") or allowed[0]
    if method not in allowed:
        reject("topk_method", f"{model_type} routes by {' or '.join(allowed)}")
    scoring = "sigmoid" if v3 else "softmax"
    if hf.get("scoring_func", scoring) != scoring:
        reject("scoring_func", f"{model_type} scores experts by {scoring}")
    if int(hf.get("moe_layer_freq", 1)) != 1:
        reject("moe_layer_freq", "only every layer past first_k_dense_replace being MoE is "
                                 "implemented")
    if not v3 and hf.get("norm_topk_prob"):
        reject("norm_topk_prob", "transformers' DeepseekV2 never renormalises the top-k "
                                 "weights, so the reference for it is ambiguous")
    experts = int(hf["n_routed_experts"])
    dense = int(hf.get("first_k_dense_replace") or 0)
    grouped = method != "greedy"
    q_lora = hf.get("q_lora_rank")
    return dict(num_experts=experts, num_experts_per_tok=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                mlp_only_layers=tuple(range(min(dense, int(hf["num_hidden_layers"])))),
                topk_method=method,
                n_group=int(hf.get("n_group") or 1) if grouped else 1,
                topk_group=int(hf.get("topk_group") or 1) if grouped else 1,
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                n_shared_experts=int(hf.get("n_shared_experts") or 0),
                kv_lora_rank=int(hf["kv_lora_rank"]),
                q_lora_rank=None if q_lora is None else int(q_lora),
                qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
                qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
                v_head_dim=int(hf["v_head_dim"]))


def hf_rope_interleaved(hf: dict[str, Any]) -> bool:
    """Whether an HF DeepSeek checkpoint lays each rope dim pair out interleaved (x0, x1), (x2,
    x3), ...: V2 always, V3 unless `rope_interleave` is false. Import de-interleaves them into
    the rotate-half layout our RoPE uses (the scores q.k do not change)."""
    return hf.get("model_type") == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor YaRN puts on cos and sin (1 for the other scalings)."""
    s = config.rope_scaling
    if not isinstance(s, YarnScaling):
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    return _yarn_mscale(s.factor)


def softmax_scale(config: ModelConfig) -> float:
    """Attention's score scale: head_dim^-0.5, times YaRN's mscale(mscale_all_dim)^2."""
    scale = config.head_dim ** -0.5
    s = config.rope_scaling
    if isinstance(s, YarnScaling) and s.mscale_all_dim:
        scale *= _yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def _yarn_inv_freq(config: ModelConfig, s: YarnScaling) -> list[float]:
    d, base = config.rope_dim, config.rope_theta

    def correction_dim(rotations: float) -> float:
        return (d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    out = []
    for i in range(d // 2):
        extrapolation = 1.0 / (base ** (2 * i / d))
        keep = 1 - min(max((i - low) / (high - low), 0.0), 1.0)  # 1: extrapolate (high freq)
        out.append(extrapolation / s.factor * (1 - keep) + extrapolation * keep)
    return out


def rope_inv_freq(config: ModelConfig) -> list[float]:
    """Inverse frequencies of the rotary embedding, with Llama-3 or YaRN scaling when
    configured."""
    d = config.rope_dim
    inv = [1.0 / (config.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    s = config.rope_scaling
    if s is None:
        return inv
    if isinstance(s, YarnScaling):
        return _yarn_inv_freq(config, s)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen > low_wavelen:
            out.append(f / s.factor)
        elif wavelen < high_wavelen:
            out.append(f)
        else:
            smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out
