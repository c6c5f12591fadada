"""Fit a model to a layout: pad the vocabulary and repeat KV heads so every split is even.

A checkpoint holds the model as trained (`vocab_size` rows, `num_kv_heads` KV heads). A layout
splits `vocab` and the heads over mesh axes, and those sizes need not divide: a 32001-token
vocabulary at tp=2, or 2 KV heads at tp=8. `fit_to_layout` returns the config the devices hold:

- the vocabulary padded up to a multiple of the mesh axes that split it (`padded_vocab_size`);
  the extra rows of the embedding and of the LM head (both [vocab, embed]) are zero, and the
  model gives their logits -inf, so no padding id is ever sampled or reported;
- each KV head repeated `kv_head_copies` times when there are fewer KV heads than the mesh axes
  that split the heads. With `np.repeat` along the head axis, stored head j holds original head
  j // copies. Device i of t holds stored head i and query heads [i*h/t, (i+1)*h/t), and those
  query heads read original KV head floor(q*k/h) = i // copies: the one it holds. So attention
  needs no communication, and each device keeps 1/t of the KV cache.

Query heads are never padded: a head count the mesh does not divide is an error that lists the
degrees that work. `fit_params` turns a base parameter dict into the fitted one (pure array
code: it runs under jit, placing each output in its final sharding), `unfit_params` reverses it.
`fit_to_layout` takes a `Layout` or a device-free `MeshRules` and never touches jax: the
performance model (`jaxserve.perf`) fits configs with it on machines without accelerators.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from jaxserve.config import ModelConfig
from jaxserve.rules import MeshRules, ShardingError

if TYPE_CHECKING:
    from jaxserve.sharding import Layout

# [vocab, embed] (int8 values, scales [vocab, groups] when quantized): padded along axis 0
_VOCAB_ROWS = re.compile(r"^(embed/embedding|lm_head)(/values|/scale)?$")
# [embed, kv_heads, head_dim] (scales [groups, kv_heads, head_dim]): repeated along axis 1
_KV_PROJ = re.compile(r"^layers/\d+/attn/[kv]_proj(/values|/scale)?$")


def _axes_text(axes: tuple[str, ...]) -> str:
    return "x".join(axes) if axes else "(none)"


def _kv_copies(num_kv_heads: int, t: int) -> int | None:
    """Copies of each KV head at t devices per head split; None when no number of copies works."""
    if num_kv_heads % t == 0:
        return 1
    if t % num_kv_heads == 0:
        return t // num_kv_heads
    return None


def working_degrees(config: ModelConfig) -> list[int]:
    """Head-splitting degrees this model supports: divisors of num_heads the KV heads fit."""
    h = config.num_heads
    return [t for t in range(1, h + 1) if h % t == 0 and _kv_copies(config.num_kv_heads, t)]


def fit_to_layout(config: ModelConfig, layout: Layout | MeshRules) -> ModelConfig:
    """The config as `layout` holds it: padded vocabulary, KV heads repeated as needed."""
    mapping, source = layout.rules.mapping, layout.rules.source
    works = ", ".join(map(str, working_degrees(config)))
    about = (f"this model has {config.num_heads} query heads and {config.num_kv_heads} KV heads; "
             f"degrees that work: {works}")

    q_axes = mapping.get("q_heads", ())
    t = layout.axis_size(q_axes)
    if config.num_heads % t:
        raise ShardingError(
            f"{source}: logical axis 'q_heads' has size {config.num_heads} (the model's "
            f"num_heads), not divisible by mesh axis {_axes_text(q_axes)!r} of size {t}; "
            f"query heads are never padded: {about}")

    kv_axes = mapping.get("kv_heads", ())
    t_kv = layout.axis_size(kv_axes)
    copies = _kv_copies(config.num_kv_heads, t_kv)
    if copies is None or config.num_heads % (config.num_kv_heads * copies):
        raise ShardingError(
            f"{source}: logical axis 'kv_heads' has size {config.num_kv_heads} (the model's "
            f"num_kv_heads), which mesh axis {_axes_text(kv_axes)!r} of size {t_kv} neither "
            f"divides nor is a multiple of, so repeating KV heads cannot fit it: {about}")

    if config.is_moe:
        _check_never_padded(layout, [("experts", config.num_experts, "num_experts"),
                                     ("expert_mlp", config.moe_intermediate_size,
                                      "moe_intermediate_size")])
    if config.is_mla:  # split over tp by attention="tpla"
        _check_never_padded(layout, [("latent", config.kv_lora_rank, "kv_lora_rank")])
    v = layout.axis_size(mapping.get("vocab", ()))
    rows = -(-config.vocab_size // v) * v
    return dataclasses.replace(config, padded_vocab_size=rows if rows != config.vocab_size else None,
                               kv_head_copies=copies)


def _check_never_padded(layout: Layout | MeshRules,
                        splits: list[tuple[str, int, str]]) -> None:
    """Experts, their width and a split latent are never padded: (logical axis, size, the
    config field it comes from) that the mesh does not divide is an error."""
    for logical, size, field in splits:
        axes = layout.rules.mapping.get(logical, ())
        n = layout.axis_size(axes)
        if size % n:
            works = ", ".join(str(d) for d in range(1, size + 1) if size % d == 0)
            raise ShardingError(
                f"{layout.rules.source}: logical axis {logical!r} has size {size} (the model's "
                f"{field}), not divisible by mesh axis {_axes_text(axes)!r} of size {n}; "
                f"degrees that work: {works}")


def _check_fits(base: ModelConfig, fitted: ModelConfig) -> int:
    same = dataclasses.replace(fitted, padded_vocab_size=base.padded_vocab_size,
                               kv_head_copies=base.kv_head_copies)
    if same != base:
        raise ValueError("fitted config differs from the base config in more than its layout")
    if fitted.vocab_rows < base.vocab_rows or fitted.stored_kv_heads % base.stored_kv_heads:
        raise ValueError(f"cannot fit vocab rows {base.vocab_rows} -> {fitted.vocab_rows}, KV "
                         f"heads {base.stored_kv_heads} -> {fitted.stored_kv_heads}")
    return fitted.stored_kv_heads // base.stored_kv_heads


def fit_params(params: dict[str, Any], base: ModelConfig, fitted: ModelConfig) -> dict[str, Any]:
    """Flat {name: array} laid out for `base` -> laid out for `fitted` (other tensors unchanged).

    Zero rows for `embed/embedding` and `lm_head`, each KV head of
    `layers/{i}/attn/{k,v}_proj` repeated. Works on any subset of the names; jit-compatible.
    """
    import jax.numpy as jnp  # here, not at the top: fit_to_layout must not need jax

    repeat = _check_fits(base, fitted)
    pad = fitted.vocab_rows - base.vocab_rows
    out = dict(params)
    for name, array in params.items():
        if pad and _VOCAB_ROWS.match(name):
            out[name] = jnp.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1))
        elif repeat > 1 and _KV_PROJ.match(name):
            out[name] = jnp.repeat(array, repeat, axis=1)
    return out


def unfit_params(params: dict[str, Any], base: ModelConfig, fitted: ModelConfig
                 ) -> dict[str, Any]:
    """The inverse of `fit_params`: drop the padding and the KV-head copies."""
    repeat = _check_fits(base, fitted)
    padded = fitted.vocab_rows > base.vocab_rows
    out = dict(params)
    for name, array in params.items():
        if padded and _VOCAB_ROWS.match(name):
            out[name] = array[:base.vocab_rows]
        elif repeat > 1 and _KV_PROJ.match(name):
            out[name] = array[:, ::repeat]
    return out
