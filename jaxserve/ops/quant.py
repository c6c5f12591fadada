"""Weight formats: how a linear layer's weight is stored, and the one op that reads it.

A weight is declared once (`declare_weight`, from models/layers.py) with its shape, logical axes,
which of its dims are the inputs it contracts, and a format: float (`ModelConfig.quantization`
None) or int8 with float32 scales, one per output channel (`"int8"`) or per group of 32/64/128
consecutive input elements (`"int8-g64"`). A quantized weight is a `QuantizedWeight`: `values`
(int8, the weight's shape and logical axes) and `scale` (float32, `[..outer dims, groups,
..output dims]`, carrying the logical axes of the weight's other dims, so a rules file shards
scales with their weights; the group dim is replicated).

Models read every weight through `read`: they never branch on a format. The first
implementation is dequantize-then-dot: `read` converts int8 to the compute dtype and multiplies by
the scales inside the jitted step, and the dot that follows is the float one. Keeping the choice
here means an int8-dot path (int32 accumulation, per-channel scales applied after the dot) can
replace it without touching a model.

Quantization is symmetric round-to-nearest: scale = max|w| / 127 over each group, q = round(w /
scale) in [-127, 127], so |w - q * scale| <= scale / 2 elementwise. An all-zero group (the
vocabulary's padding rows) has scale 0 and dequantizes to 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import quantization_group

QMAX = 127


def _grouped_shape(shape: Sequence[int], inputs: tuple[int, int], group: int | None):
    """[..outer, *inputs, ..outputs] -> (outer, groups, group size, outputs)."""
    start, stop = inputs
    outer, ins, outputs = tuple(shape[:start]), tuple(shape[start:stop]), tuple(shape[stop:])
    k = math.prod(ins)
    size = k if group is None else group
    if k % size:
        raise ValueError(f"quantization group size {size} does not divide the input dim {k}")
    return outer, k // size, size, outputs


def quantize(w: jax.Array, inputs: tuple[int, int], group: int | None
             ) -> tuple[jax.Array, jax.Array]:
    """Float weight -> (int8 values of its shape, float32 scales [..outer, groups, ..outputs]).
    `inputs`: the [start, stop) dims the weight contracts; `group`: None for per channel."""
    outer, groups, size, outputs = _grouped_shape(w.shape, inputs, group)
    w3 = w.astype(jnp.float32).reshape(outer + (groups, size) + outputs)
    at = len(outer) + 1
    scale = jnp.max(jnp.abs(w3), axis=at, keepdims=True) / QMAX
    q = jnp.round(w3 / jnp.where(scale > 0, scale, 1.0))
    q = jnp.clip(q, -QMAX, QMAX).astype(jnp.int8).reshape(w.shape)
    return q, jnp.squeeze(scale, axis=at)


def dequantize(values: jax.Array, scale: jax.Array, inputs: tuple[int, int], group: int | None,
               dtype) -> jax.Array:
    """(int8 values, scales) -> the weight in `dtype`.

    Only the (small) scales are reshaped, to broadcast over the values as they lie: reshaping
    the values into groups measured ~1.5x slower on XLA:CPU (a relayout of the whole weight)."""
    outer, groups, size, outputs = _grouped_shape(values.shape, inputs, group)
    ins = values.shape[inputs[0]:inputs[1]]
    if groups == 1:
        per_element = scale.reshape(outer + (1,) * len(ins) + outputs)
    else:
        per_element = jnp.repeat(scale, size, axis=len(outer)).reshape(values.shape)
    return (values.astype(jnp.float32) * per_element).astype(dtype)


def scale_axes(axes: Sequence[str | None], inputs: tuple[int, int]) -> tuple[str | None, ...]:
    """A scale's logical axes: the weight's outer and output axes, the group dim replicated."""
    return tuple(axes[:inputs[0]]) + (None,) + tuple(axes[inputs[1]:])


class QuantizedWeight(nnx.Module):
    """An int8 weight and its float32 scales; `read` gives it back in the compute `dtype`."""

    def __init__(self, values: jax.Array, scale: jax.Array, axes: Sequence[str | None],
                 inputs: tuple[int, int], group: int | None, dtype):
        self.values = nnx.Param(values, out_sharding=tuple(axes))
        self.scale = nnx.Param(scale, out_sharding=scale_axes(axes, inputs))
        self.inputs, self.group, self.dtype = tuple(inputs), group, jnp.dtype(dtype)

    def dequantize(self) -> jax.Array:
        return dequantize(self.values[...], self.scale[...], self.inputs, self.group, self.dtype)


def declare_weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype,
                   quantization: str | None, inputs: tuple[int, int],
                   init=None) -> nnx.Param | QuantizedWeight:
    """A linear layer's weight in its format: a float `nnx.Param`, or a `QuantizedWeight`
    (a random one is drawn in float and quantized). `inputs`: the [start, stop) dims it
    contracts."""
    init = init or nnx.initializers.normal(0.02)
    w = init(rngs.params(), tuple(shape), dtype)
    if quantization is None:
        return nnx.Param(w, out_sharding=tuple(axes))
    group = quantization_group(quantization)
    return QuantizedWeight(*quantize(w, inputs, group), axes, inputs, group, dtype)


def read(weight: nnx.Param | QuantizedWeight) -> jax.Array:
    """The weight as the dot that uses it takes it (dequantized here, inside the step)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize()
    return weight[...]
