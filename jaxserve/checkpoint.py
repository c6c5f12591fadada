"""Checkpoints: import from HF safetensors, our orbax format, and restore straight into shardings.

Our format (`checkpoints/README.md`): `DIR/config.json` (a `ModelConfig`), the tokenizer when the
model has one (`tokenizer.model` for sentencepiece or `tokenizer.json` for HF tokenizers, with
`tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`) and `DIR/params/` (an
orbax checkpoint of the parameter tree, keyed by the model's own parameter names, e.g.
`layers/3/attn/q_proj`).

Checkpoints always hold the model's own shapes (`vocab_size` rows, `num_kv_heads` KV heads).
Restoring fits the model to the layout (`jaxserve.placement`: vocabulary padded, KV heads repeated
so every split is even) and never builds the whole model on one device: the model's structure is
traced abstractly, each parameter's logical axes give its `NamedSharding`, and orbax reads every
array directly into that sharding. The few tensors whose checkpoint shape does not split evenly
(an odd vocabulary, fewer KV heads than devices) are read with that dimension replicated and then
padded / repeated on the devices by one compiled program that writes them in their final
sharding. Linear weights (float, or int8 values with their scales) are then stored in the asked
layout (`ops.quant.weight_layout_for` by default; "out_in" transposes them to `[out.., in..]`,
by one more compiled program that writes them in their final sharding); saving transposes them
back.
Any mismatch between what the model expects and what the files hold (missing, unexpected or
mis-shaped tensors) is reported in one error that lists all of them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import (LAYOUT_FIELDS, QUANTIZATIONS, WEIGHT_LAYOUT_CHOICES, ConfigError,
                             ModelConfig, from_hf_config, hf_rope_interleaved,
                             quantization_group)
from jaxserve.models import abstract_model
from jaxserve.ops.latent_transform import (fold_transform, latent_params, pca_rotation,
                                           transform_matrix)
from jaxserve.ops.quant import QuantizedWeight, quantize, weight_layout_for
from jaxserve.placement import fit_params, fit_to_layout, unfit_params
from jaxserve.sharding import Layout
from jaxserve.text.load import GENERATION_CONFIG_FILE, SP_TOKENIZER_FILE, TOKENIZER_FILES

CONFIG_FILE = "config.json"
TOKENIZER_FILE = SP_TOKENIZER_FILE  # sentencepiece; TOKENIZER_FILES lists every tokenizer file
PARAMS_DIR = "params"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """Checkpoint files that do not match the model they claim to hold."""


def parse_dtype(name: str | None, default: str = "float32"):
    name = default if name in (None, "auto") else name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---- parameter trees: nested dicts keyed by str, flat dicts keyed by "a/b/c" ----

def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def expected_params(config: ModelConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State,
                                                                      dict[str, Any]]:
    """The model's structure: graphdef, abstract state, and flat {name: (shape, logical axes)}."""
    graphdef, state = nnx.split(abstract_model(config, dtype))
    specs = _flatten(_str_keys(nnx.to_pure_dict(nnx.get_partition_spec(state))))
    shapes = _flatten(_str_keys(nnx.to_pure_dict(state)))
    return graphdef, state, {n: (tuple(shapes[n].shape), tuple(specs[n])) for n in shapes}


def _param_dtypes(state: nnx.State) -> dict[str, Any]:
    """{name: dtype} of a (possibly abstract) state: int8 values and float32 scales of
    quantized weights, the model dtype elsewhere."""
    return {n: a.dtype for n, a in _flatten(_str_keys(nnx.to_pure_dict(state))).items()}


def flat_params(state: nnx.State) -> dict[str, Any]:
    """{"layers/0/attn/q_proj": array, ...}: the names checkpoints and error messages use."""
    return _flatten(_str_keys(nnx.to_pure_dict(state)))


def _undo(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that puts a weight stored in `order` back as declared."""
    return tuple(int(i) for i in np.argsort(order))


def declared_params(state: nnx.State) -> dict[str, Any]:
    """`flat_params` with every float weight in its declared layout, as checkpoints hold it
    (each weight's `stored_order` metadata says how it is stored)."""
    flat = {}
    for path, variable in nnx.to_flat_state(state):
        array, order = variable[...], variable.get_metadata().get("stored_order")
        if order:
            array = jnp.transpose(array, _undo(order))
        flat["/".join(map(str, path))] = array
    return flat


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where: str,
                   allowed_extra: Callable[[str], bool] = lambda name: False) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not allowed_extra(n))
    misshaped = sorted(f"{n}: expected {expected[n]}, found {found[n]}"
                       for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): {'; '.join(misshaped)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model:\n  " + "\n  ".join(problems))


# ---- HF import ----

def _hf_layout(config: ModelConfig, rope_interleaved: bool = False
               ) -> dict[str, tuple[str | tuple[str, ...], tuple[int, ...], Callable]]:
    """Our parameter name -> (HF tensor name, HF shape, HF array -> our array).

    HF stores Linear weights as [out, in]; ours are [in, out] with heads as their own axis.
    Experts are one HF tensor per expert and one of ours per layer: their entry names a tuple
    of HF tensors (each of the HF shape) and the function takes the list, stacked in order.
    `rope_interleaved`: a latent-attention checkpoint's rope dims come in interleaved pairs.
    """
    e, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    same = lambda w: w  # noqa: E731
    transpose = lambda w: w.T  # noqa: E731

    def heads_in(n):  # [n*d, e] -> [e, n, d]
        return lambda w: w.reshape(n, d, e).transpose(2, 0, 1)

    out = {"embed/embedding": ("model.embed_tokens.weight", (v, e), same),
           "final_norm/scale": ("model.norm.weight", (e,), same)}
    if not config.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", (v, e), same)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers/{i}/"
        out.update({
            ours + "attn_norm/scale": (hf + "input_layernorm.weight", (e,), same),
            ours + "mlp_norm/scale": (hf + "post_attention_layernorm.weight", (e,), same)})
        if config.is_mla:
            out.update(_hf_latent_attention(config, hf, ours, rope_interleaved))
        else:
            attn = hf + "self_attn."
            out.update({
                ours + "attn/q_proj": (attn + "q_proj.weight", (h * d, e), heads_in(h)),
                ours + "attn/k_proj": (attn + "k_proj.weight", (kv * d, e), heads_in(kv)),
                ours + "attn/v_proj": (attn + "v_proj.weight", (kv * d, e), heads_in(kv)),
                ours + "attn/o_proj": (attn + "o_proj.weight", (e, h * d),
                                       lambda w: w.reshape(e, h, d).transpose(1, 2, 0)),
            })
        if config.moe_layer(i):
            out.update(_hf_experts(config, hf, ours))
        else:
            out.update({
                ours + "mlp/gate_proj": (hf + "mlp.gate_proj.weight", (m, e), transpose),
                ours + "mlp/up_proj": (hf + "mlp.up_proj.weight", (m, e), transpose),
                ours + "mlp/down_proj": (hf + "mlp.down_proj.weight", (e, m), transpose),
            })
        if config.qk_norm:
            out[ours + "attn/q_norm/scale"] = (hf + "self_attn.q_norm.weight", (d,), same)
            out[ours + "attn/k_norm/scale"] = (hf + "self_attn.k_norm.weight", (d,), same)
    return out


def _hf_latent_attention(config: ModelConfig, hf: str, ours: str, rope_interleaved: bool
                         ) -> dict[str, tuple]:
    """MLA's projections. kv_a_proj_with_mqa [latent + rope, e] becomes two of ours (the
    latent's and the rope key's), kv_b_proj [h * (nope + v), latent] W_UK and W_UV. Rope dims
    in interleaved pairs are de-interleaved (even dims, then odd): q and k move alike, so every
    score q.k is unchanged and our rotate-half RoPE applies."""
    e, h, d = config.hidden_size, config.num_heads, config.head_dim
    lat, nope, rope, v = (config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
                          config.v_head_dim)
    pe = (np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)]) if rope_interleaved
          else np.arange(rope))
    q_dims = np.concatenate([np.arange(nope), nope + pe])
    attn, mine = hf + "self_attn.", ours + "attn/"

    def q_heads(n_in):  # [h*d, n_in] -> [n_in, h, d], rope dims de-interleaved
        return lambda w: w.reshape(h, d, n_in).transpose(2, 0, 1)[..., q_dims]

    kv_b = (attn + "kv_b_proj.weight", (h * (nope + v), lat))
    out = {
        mine + "kv_a_proj": (attn + "kv_a_proj_with_mqa.weight", (lat + rope, e),
                             lambda w: w[:lat].T),
        mine + "k_pe_proj": (attn + "kv_a_proj_with_mqa.weight", (lat + rope, e),
                             lambda w: w[lat:][pe].T),
        mine + "kv_a_norm/scale": (attn + "kv_a_layernorm.weight", (lat,), lambda w: w),
        mine + "k_b_proj": kv_b + (lambda w: w.reshape(h, nope + v, lat)[:, :nope]
                                   .transpose(2, 0, 1),),
        mine + "v_b_proj": kv_b + (lambda w: w.reshape(h, nope + v, lat)[:, nope:]
                                   .transpose(2, 0, 1),),
        mine + "o_proj": (attn + "o_proj.weight", (e, h * v),
                          lambda w: w.reshape(e, h, v).transpose(1, 2, 0)),
    }
    q = config.q_lora_rank
    if q:
        out[mine + "q_a_proj"] = (attn + "q_a_proj.weight", (q, e), lambda w: w.T)
        out[mine + "q_a_norm/scale"] = (attn + "q_a_layernorm.weight", (q,), lambda w: w)
        out[mine + "q_b_proj"] = (attn + "q_b_proj.weight", (h * d, q), q_heads(q))
    else:
        out[mine + "q_proj"] = (attn + "q_proj.weight", (h * d, e), q_heads(e))
    return out


# HF names of a MoE layer: (block, router, gate, up, down) per family.
_HF_MOE_NAMES = {"qwen3_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
                 "mixtral": ("block_sparse_moe", "gate", "w1", "w3", "w2"),
                 "deepseek_v2": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
                 "deepseek_v3": ("mlp", "gate", "gate_proj", "up_proj", "down_proj")}


def _hf_experts(config: ModelConfig, hf: str, ours: str) -> dict[str, tuple]:
    block, router, gate, up, down = _HF_MOE_NAMES[config.family]
    e, m, n = config.hidden_size, config.moe_intermediate_size, config.num_experts

    def names(proj):
        return tuple(f"{hf}{block}.experts.{j}.{proj}.weight" for j in range(n))

    def stack_transposed(ws):  # n x [out, in] -> [n, in, out]
        return np.stack([np.asarray(w).T for w in ws])

    out = {
        ours + "mlp/router": (f"{hf}{block}.{router}.weight", (n, e), lambda w: w.T),
        ours + "mlp/gate_proj": (names(gate), (m, e), stack_transposed),
        ours + "mlp/up_proj": (names(up), (m, e), stack_transposed),
        ours + "mlp/down_proj": (names(down), (e, m), stack_transposed),
    }
    if config.topk_method == "noaux_tc":
        out[ours + "mlp/score_bias"] = (f"{hf}{block}.{router}.e_score_correction_bias", (n,),
                                        lambda w: w)
    if config.n_shared_experts:
        shared, width = f"{hf}{block}.shared_experts.", config.n_shared_experts * m
        out.update({
            ours + "mlp/shared_experts/gate_proj": (shared + "gate_proj.weight", (width, e),
                                                    lambda w: w.T),
            ours + "mlp/shared_experts/up_proj": (shared + "up_proj.weight", (width, e),
                                                  lambda w: w.T),
            ours + "mlp/shared_experts/down_proj": (shared + "down_proj.weight", (e, width),
                                                    lambda w: w.T),
        })
    return out


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({hf_dir / f for f in weight_map.values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def read_hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in _safetensors_files(hf_dir):
        # "flax" returns jax arrays, which (unlike "numpy") covers bfloat16.
        with safe_open(str(path), framework="flax") as f:
            for name in f.keys():
                tensors[name] = np.asarray(f.get_tensor(name))
    return tensors


def convert_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> ModelConfig:
    """Import an HF checkpoint (config.json + safetensors [+ the tokenizer files]) into our format.

    The tokenizer files present (`TOKENIZER_FILES`) are copied as they are; the EOS ids of
    generation_config.json (an int or a list) join the config's, so generation stops at any of
    them even without a tokenizer."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json")
    hf_config = json.loads(config_path.read_text())
    config = from_hf_config(hf_config, where=str(config_path))
    target = parse_dtype(dtype, default=config.dtype if config.dtype in DTYPES else "float32")
    config = dataclasses.replace(config, dtype=jnp.dtype(target).name)
    generation = hf_dir / GENERATION_CONFIG_FILE
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            raise CheckpointError(f"{generation}: eos_token_id must be an int or a list of ints, "
                                  f"got {eos!r}")
        config = dataclasses.replace(
            config, eos_token_ids=tuple(dict.fromkeys((*config.eos_token_ids, *eos))))

    layout = _hf_layout(config, config.is_mla and hf_rope_interleaved(hf_config))
    tensors = read_hf_tensors(hf_dir)
    # Report in HF's names: that is what the user's files hold.
    expected_hf = {name: shape for hf, shape, _ in layout.values()
                   for name in ((hf,) if isinstance(hf, str) else hf)}
    found_hf = {name: t.shape for name, t in tensors.items()}

    def allowed_extra(name: str) -> bool:  # buffers and duplicates HF may store
        return name.endswith("rotary_emb.inv_freq") or (
            config.tie_word_embeddings and name == "lm_head.weight")

    _check_tensors(expected_hf, found_hf, f"HF checkpoint {hf_dir}", allowed_extra)
    params = {ours: np.asarray(fn(tensors[hf] if isinstance(hf, str)
                                  else [tensors[n] for n in hf])).astype(target)
              for ours, (hf, _, fn) in layout.items()}
    _, _, expected = expected_params(config, target)
    _check_tensors({n: s for n, (s, _) in expected.items()},
                   {n: a.shape for n, a in params.items()}, "converted parameters")

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir / CONFIG_FILE)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)
    save_params(out_dir / PARAMS_DIR, params)
    return config


# ---- our format ----

def save_params(params_dir: str | Path, params: dict[str, Any] | nnx.State) -> None:
    """Save a parameter tree (an nnx State, its weights put back in their declared layout, or
    a flat {name: array} dict as declared) as orbax.

    Checkpoints hold the model's own shapes: give parameters of an unfitted config (or use
    `save_model`, which removes a layout's padding and KV-head copies)."""
    import orbax.checkpoint as ocp

    if isinstance(params, nnx.State):
        params = declared_params(params)
    params_dir = Path(params_dir).absolute()
    if params_dir.exists():
        shutil.rmtree(params_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, _unflatten(params))
    checkpointer.wait_until_finished()


def save_model(out_dir: str | Path, config: ModelConfig, params: nnx.State | dict[str, Any],
               tokenizer_model: str | Path | None = None) -> None:
    """Save config + params in our format; a fitted config's layout is undone first."""
    out_dir = Path(out_dir)
    base = dataclasses.replace(config, **{name: ModelConfig.__dataclass_fields__[name].default
                                          for name in LAYOUT_FIELDS})
    if base != config:
        params = (declared_params(params) if isinstance(params, nnx.State)
                  else lay_out_params(params, config, inverse=True))
        params = unfit_params(params, base, dataclasses.replace(config,
                                                                weight_layout=base.weight_layout))
    out_dir.mkdir(parents=True, exist_ok=True)
    base.save(out_dir / CONFIG_FILE)
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, out_dir / TOKENIZER_FILE)
    save_params(out_dir / PARAMS_DIR, params)


def param_specs(config: ModelConfig, dtype=jnp.float32) -> dict[str, tuple]:
    """Flat {name: (shape, logical axes)} of the model's parameters."""
    return expected_params(config, dtype)[2]


QUANTIZATION_REQUESTS = ("auto", "none")  # the checkpoint's format; float


def resolve_quantization(config: ModelConfig, quantization: str | None,
                         quantize_embeddings: bool, where: str) -> ModelConfig:
    """The config to run: the checkpoint's, or a float checkpoint's quantized on load.

    `quantization`: "auto" (the checkpoint's format), "none" or None (float), or a format
    (`config.QUANTIZATIONS`). A quantized checkpoint loads only in its own format: it is never
    dequantized or re-quantized, so asking for another is an error naming both."""
    if quantization != "auto" and quantization is not None and quantization != "none":
        quantization_group(quantization)  # an unknown value fails here, named
    if quantization == "auto":
        if quantize_embeddings and config.quantization is None:
            raise ConfigError(f"quantize_embeddings=True needs a quantization: {where} holds "
                              f"float weights and quantization is 'auto'")
        wanted = config.quantization
    else:
        wanted = None if quantization in (None, "none") else quantization
    if config.quantization is not None:
        embeddings = config.quantize_embeddings or quantize_embeddings
        if wanted != config.quantization or embeddings != config.quantize_embeddings:
            asked = ("quantize_embeddings=True" if wanted == config.quantization
                     else f"quantization={quantization!r}" + (" (float)" if wanted is None
                                                              else ""))
            raise ConfigError(
                f"{where} holds weights quantized as {config.quantization!r} (quantize_embeddings="
                f"{config.quantize_embeddings}); it cannot load with {asked}: use "
                f"quantization='auto' or {config.quantization!r}, or quantize the float "
                f"checkpoint again")
        return config
    if wanted is None:
        if quantize_embeddings:
            raise ConfigError("quantize_embeddings=True needs a quantization (e.g. 'int8')")
        return config
    return dataclasses.replace(config, quantization=wanted,
                               quantize_embeddings=bool(quantize_embeddings))


def quantize_params(params: dict[str, Any], quantized: ModelConfig) -> dict[str, Any]:
    """Flat float params -> the flat params of the model `quantized` describes (each
    quantized weight's `values` and `scale` in place of its float array). Jit-compatible."""
    out = dict(params)
    for path, module in nnx.iter_graph(abstract_model(quantized)):
        if isinstance(module, QuantizedWeight):
            name = "/".join(map(str, path))
            out[name + "/values"], out[name + "/scale"] = quantize(
                out.pop(name), module.inputs, module.group)
    return out


def stored_orders(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: permutation from declared to stored dims} of the float weights `config`'s
    `weight_layout` stores transposed."""
    return {"/".join(map(str, path)): node.get_metadata()["stored_order"]
            for path, node in nnx.iter_graph(abstract_model(config))
            if isinstance(node, nnx.Param) and node.get_metadata().get("stored_order")}


def lay_out_params(params: dict[str, Any], config: ModelConfig, inverse: bool = False
                   ) -> dict[str, Any]:
    """Flat params with float weights as declared -> as `config.weight_layout` stores them
    (`inverse`: back). Other tensors unchanged; jit-compatible."""
    out = dict(params)
    for name, order in stored_orders(config).items():
        if name in out:
            out[name] = jnp.transpose(out[name], _undo(order) if inverse else order)
    return out


def resolve_weight_layout(weight_layout: str, quantized: bool = False) -> str:
    """"auto" -> the platform's layout for float or int8 weights
    (`ops.quant.weight_layout_for`); a layout as given."""
    if weight_layout not in WEIGHT_LAYOUT_CHOICES:
        raise ConfigError(f"weight_layout must be one of {', '.join(WEIGHT_LAYOUT_CHOICES)}, "
                          f"got {weight_layout!r}")
    if weight_layout == "auto":
        return weight_layout_for(jax.default_backend(), quantized)
    return weight_layout


def _pca_rotations(params: dict, calibration: np.ndarray | None, config: ModelConfig,
                   slices: int) -> np.ndarray:
    """Per layer, the principal axes of the latent the folded model caches: the exact model's
    cached c_kv with the norm's scale divided out (`fold_transform` moves it into W_UK / W_UV)."""
    want = (config.num_layers, config.kv_lora_rank)
    if calibration is None or calibration.ndim != 3 or \
            (calibration.shape[0], calibration.shape[2]) != want:
        raise ConfigError(f"latent_transform 'pca' needs the calibration latents, [layers, "
                          f"tokens, kv_lora_rank] = [{want[0]}, n, {want[1]}], got "
                          f"{None if calibration is None else calibration.shape}")
    rotations = []
    for i, latents in enumerate(calibration):
        gain = np.asarray(params[f"layers/{i}/attn/kv_a_norm/scale"], np.float64)
        safe = np.where(gain == 0, 1.0, gain)
        rotations.append(pca_rotation(np.where(gain == 0, 0.0, latents / safe), slices))
    return transform_matrix(config, "pca", np.stack(rotations))


def restore_model(model_dir: str | Path, layout: Layout, dtype: str | None = None,
                  quantization: str | None = "auto", quantize_embeddings: bool = False,
                  weight_layout: str = "auto", attention: str = "mla",
                  latent_transform: str = "none", calibration: np.ndarray | None = None
                  ) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """Read config + params fitted to `layout`, each array placed directly in its sharding.

    Returns the fitted config (`placement.fit_to_layout`: padded vocabulary, repeated KV heads),
    and the graphdef and state of the model built from it. `quantization`: see
    `resolve_quantization`; a float checkpoint asked for a format is quantized on the devices,
    after it is placed. `weight_layout`: how float linear weights are stored ("auto": the
    platform's, `resolve_weight_layout`), transposed on the devices after that.
    `attention`: how an MLA model's latent is laid out (`config.LATENT_ATTENTIONS`); when it is
    split, `latent_transform` is folded into the float weights first (`ops.latent_transform`;
    "pca": `calibration` holds the exact model's cached latents of a calibration text,
    [layers, tokens, kv_lora_rank], whose principal axes it folds).
    """
    import orbax.checkpoint as ocp

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    config = ModelConfig.load(model_dir / CONFIG_FILE)
    split = attention != "mla"
    config = dataclasses.replace(config, latent_attention=attention,  # a non-MLA model fails here
                                 latent_transform=latent_transform if split else "none")
    rotation = transform_matrix(config, config.latent_transform) \
        if config.latent_transform != "pca" else None
    if config.latent_transform != "none" and config.quantization is not None:
        raise ConfigError(f"latent_transform {latent_transform!r} is folded into float weights; "
                          f"{model_dir} holds {config.quantization!r} weights: load its float "
                          f"checkpoint (quantization may then be asked for), or use "
                          f"latent_transform='none'")
    running = resolve_quantization(config, quantization, quantize_embeddings, str(model_dir))
    stored_layout = resolve_weight_layout(weight_layout, running.quantization is not None)
    target_dtype = parse_dtype(dtype, default=config.dtype)
    params_dir = (model_dir / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no {PARAMS_DIR}/ directory")
    fitted = fit_to_layout(config, layout)  # a head count the mesh cannot split fails here

    _, stored_state, stored_shapes = expected_params(config, target_dtype)
    dtypes = _param_dtypes(stored_state)
    checkpointer = ocp.StandardCheckpointer()
    stored = _flatten(checkpointer.metadata(params_dir).item_metadata.tree)
    _check_tensors({n: s for n, (s, _) in stored_shapes.items()},
                   {n: tuple(m.shape) for n, m in stored.items()}, f"checkpoint {params_dir}")

    graphdef, state, expected = expected_params(fitted, target_dtype)
    final = {n: layout.sharding(axes, shape, f"parameter {n!r}")
             for n, (shape, axes) in expected.items()}
    # Tensors that keep their shape go straight into their final sharding; the rest are read at
    # their stored shape (an indivisible dimension replicated) and fitted on the devices.
    changed = sorted(n for n, (shape, _) in expected.items() if shape != stored_shapes[n][0])
    targets = {}
    for n, (shape, axes) in stored_shapes.items():
        sharding = (layout.sharding(axes, shape, f"parameter {n!r}", lenient=True)
                    if n in changed else final[n])
        targets[n] = jax.ShapeDtypeStruct(shape, dtypes[n], sharding=sharding)
    restored = _flatten(checkpointer.restore(params_dir, _unflatten(targets)))
    if changed:
        fit = jax.jit(lambda params: fit_params(params, config, fitted),
                      out_shardings={n: final[n] for n in changed})
        restored.update(fit({n: restored.pop(n) for n in changed}))
    if config.latent_transform == "pca":
        rotation = _pca_rotations(restored, calibration, config,
                                  layout.mesh_rules.logical_size("latent"))
    if rotation is not None:
        names = latent_params(restored)
        fold = jax.jit(lambda params: fold_transform(params, rotation),
                       out_shardings={n: final[n] for n in names})
        restored.update(fold({n: restored.pop(n) for n in names}))
    if running != config:
        fitted = dataclasses.replace(fitted, quantization=running.quantization,
                                     quantize_embeddings=running.quantize_embeddings)
        graphdef, state, expected = expected_params(fitted, target_dtype)
        shardings = {n: layout.sharding(axes, shape, f"parameter {n!r}")
                     for n, (shape, axes) in expected.items()}
        restored = jax.jit(lambda params: quantize_params(params, fitted),
                           out_shardings=shardings)(restored)
    fitted = dataclasses.replace(fitted, weight_layout=stored_layout)
    orders = stored_orders(fitted)
    if orders:
        graphdef, state, expected = expected_params(fitted, target_dtype)
        shardings = {n: layout.sharding(expected[n][1], expected[n][0], f"parameter {n!r}")
                     for n in orders}
        restored.update(jax.jit(lambda params: lay_out_params(params, fitted),
                                out_shardings=shardings)({n: restored.pop(n) for n in orders}))
    nnx.replace_by_pure_dict(state, _unflatten(restored))
    return fitted, graphdef, state


def quantize_checkpoint(src: str | Path, dst: str | Path, quantization: str,
                        quantize_embeddings: bool = False) -> ModelConfig:
    """Write `src` (a float checkpoint) quantized to `dst`: int8 values and float32 scales,
    config.json recording the format, the tokenizer files copied. It loads without
    re-quantizing."""
    src, dst = Path(src), Path(dst)
    if not quantization or quantization in QUANTIZATION_REQUESTS:
        raise ConfigError(f"quantize needs a format, one of {', '.join(QUANTIZATIONS)}, "
                          f"got {quantization!r}")
    if ModelConfig.load(src / CONFIG_FILE).quantization is not None:
        raise ConfigError(f"{src} is already quantized; quantize its float checkpoint")
    config, _, state = restore_model(src, Layout.create(None, "tp"), None, quantization,
                                     quantize_embeddings)
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantize: the destination is the source ({src})")
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    save_model(dst, config, state)
    return config
