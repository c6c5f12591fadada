"""Weight formats: how a linear layer's weight is stored, and the one op that reads it.

A weight is declared once (`declare_weight`, from models/layers.py) with its shape, logical axes,
which of its dims are the inputs it contracts, and a format: float (`ModelConfig.quantization`
None) or int8 with float32 scales, one per output channel (`"int8"`) or per group of 32/64/128
consecutive input elements (`"int8-g64"`). A quantized weight is a `QuantizedWeight`: `values`
(int8, the weight's shape and logical axes) and `scale` (float32, `[..outer dims, groups,
..output dims]`, carrying the logical axes of the weight's other dims, so a rules file shards
scales with their weights; the group dim is replicated).

Models run every linear product through `project(x, weight)`, or `project_all(x, weights)` for
weights that share their input (and read a weight whole, for a gather or the experts' grouped
products, through `read`): they never branch on a format. How an
int8 weight's product runs is decided in one place, `int8_product(platform)`:

- "int8_kernel" (CPU, where `ops.cpu_kernels` builds: g++ on first use): the "int8_dot" below,
  its activation scales and int32 sums computed by a C++ XLA FFI custom call (AVX-512 VNNI or
  AVX2, each weight row read once for up to 8 tokens, on XLA's own threads; the weights that share an input,
  `project_all`'s q/k/v and gate/up, in one call) for per-channel weights stored `[out, in]`, up to
  `KERNEL_MAX_TOKENS` tokens (the decode step; a prefill chunk keeps XLA's matrix product) and
  one device. The SPMD partitioner cannot split a custom call (it would gather the weight), and
  wrapping it in shard_map per weight would psum the partial sums of the weights whose inputs
  are split; CPU meshes of several devices are simulated ones sharing the same cores, so a
  program over several devices, grouped scales and longer chunks run XLA's int8 dot. The sums
  are exact integers either way and the scaling after them is the same XLA code, so the logits
  are bit for bit those of "int8_dot" (tests/test_cpu_kernels.py). Side by side in one process
  (three runs, 2026-12-03 18:57-19:25, 2 cores shared, load average 3.5-8; BENCHMARKS.md, "An int8
  kernel for XLA:CPU"), the 55M model's decode step at batch 1 ran 1.5-1.9x faster than with XLA's
  int8 dot (int8) and 2.0-2.5x (int8 + int8 LM head: 3.5-4.9 ms, 24-33 % of its 1.2 ms byte floor,
  where XLA's dot reached 12-13 %); at batch 8 0.89-1.23x (best of loops; with 8 tokens both are
  bound by the multiply-adds). Where it cannot be built, `int8_product` says "int8_dot" and one
  warning says why.
- "int8_dot" (CPU without the kernel): the activations are quantized too, per token and per weight
  group (symmetric, max|x| / 127, like llama.cpp's q8_0 for its activations), the product is an
  int8 x int8 dot accumulating in int32, and both scales multiply its result. On XLA:CPU a float
  dot fed by an int8 -> float conversion of the weight ran 4-15x slower than the float32 dot (the
  converted weight is written out every step, and the dot after a fusion ran far below Eigen's
  speed), while the int8 dot reads 1 byte per weight: the 55M model's decode step ran 1.07x / 1.6x
  / 2.3x faster than float32 at batch 1 / 8 / 32 (BENCHMARKS.md, "CPU decode levers"). XLA:CPU
  emits a slow matrix-vector kernel for an integer dot of ONE row, so a single token is padded to
  two rows. The numerics change: each activation is off by at most half its scale step, so a
  product moves by at most (max|x| / 254) * sum|w| beyond the dequantized product (the bound the
  tests assert).
- "dequantize" (elsewhere): the weight is converted to the compute dtype and scaled inside the
  step, then the float dot runs (GPU/TPU compilers fuse the conversion into the dot's operand).

How a float32 weight's product runs is decided in one place too, `float_product(platform)`:

- "f32_kernel" (a CPU with AVX2 and FMA but not AVX-512, where `ops.cpu_kernels` builds): every
  product of a float32 weight stored `[out, in]` by a C++ custom call, the weights that share an
  input in one call (`project_all`), on one device (as for the int8 kernel). It sums each element
  in one fixed order, so a token's result does not depend on the tokens beside it: decode,
  prefill chunks of any length, prefix-cached and uncached prompts and verify steps compute the
  same numbers. XLA's dot sums in another order, so the logits differ from it by float32
  rounding (tests/test_f32_kernel.py). Mixing the two by token count (the kernel for the
  decode step only) made a prefix-cached prompt's scores differ from the uncached ones by more
  than float32 rounding once int8 KV quantized the two paths' keys (tests/test_kv_dtype.py), so
  prefill runs in the kernel too: on long chunks XLA's dot, which packs its operands, is faster
  (a 128 / 512-token product stack 0.83-0.94x / 0.75-0.83x as fast in the kernel). On a 2-core
  AMD EPYC with AVX2 (2026-12-04, BENCHMARKS.md "A float32 kernel"), the 55M model's engine
  decode step against XLA's dot in one run: 1.01x / 1.33x / 1.18x faster at batch 1 / 8 / 32;
  float32 generation at batch 32 went from 1.18x to 1.53x HF transformers' tokens/s. On AVX-512
  CPUs XLA's dots use twice the kernel's vector width, and the kernel was not measured there:
  they keep XLA's dot.
- "xla_dot": everywhere else.

How a float weight is stored is decided in one place, `float_weight_layout(platform)`, at
load (`ModelConfig.weight_layout`; checkpoints always hold the declared layout and the loader
transposes): "in_out" stores a projection as declared, `[in.., out..]`; "out_in" stores it
`[out.., in..]`, the logical axes moving with the dims (so the rules shard it as before), and
the product contracts the activations with the weight's minor dims. "out_in" where the product
is "f32_kernel", whose rows are `[out, in]`; "in_out" elsewhere: for XLA's dot on a shared
2-core CPU the 55M model's engine decode step with "out_in" ran 0.85-0.99x as fast at batch 8
and 0.92-1.05x at batch 32 in three side-by-side runs (BENCHMARKS.md, "CPU decode levers").
Only weights whose inputs lead are stored transposed (the embedding / LM head are `[vocab,
embed]` already; the experts, read whole, keep their layout).

int8 weights have their own rule, `int8_weight_layout(platform)`: "out_in" (values and scales
transposed together) where the product is "int8_kernel", whose rows are `[out, in]`; as declared
elsewhere. Without the kernel, "out_in" was measured and not kept: with one token and `[out, in]`
rows the CPU int8 product is the rounded activations times the widened rows (the int8 dot's
arithmetic: integer products, float32 sums exact below 2^24): `x @ float(w).T` compiles on XLA:CPU
to one loop fusion that widens each row and reduces it against the activations, reading every
weight byte once. Alone, those products ran 1.6-2.4x faster than the int8 dot padded to two rows
(a [512, 1408] weight 0.053 vs 0.083 ms, the [32000, 512] LM head 1.24 vs 2.98 ms, best of 20, one
process); over `[in, out]` the widening does not fuse. But the 55M model's whole decode step was
slower stored "out_in" on a quiet machine (batch 1: 9.98 vs 8.79 ms, with the LM head int8 too
8.55 vs 7.94; batch 8 equal within noise), so XLA's int8 dot keeps the declared layout.

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

from jaxserve.config import WEIGHT_LAYOUTS, quantization_group
from jaxserve.ops import cpu_kernels
from jaxserve.sharding import active_num_devices

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


INT8_PRODUCTS = ("int8_kernel", "int8_dot", "dequantize")
KERNEL_MAX_TOKENS = 16  # more tokens (prefill chunks): XLA's int8 dot, a real matrix product


def int8_product(platform: str) -> str:
    """How an int8 weight's product runs on `platform` (a `jax.default_backend()` name): the one
    place this is decided (see the module docstring for the measurements behind it). On CPU the
    kernel when it builds here (`ops.cpu_kernels.available`), else XLA's int8 dot."""
    if platform != "cpu":
        return "dequantize"
    return "int8_kernel" if cpu_kernels.available() else "int8_dot"


FLOAT_PRODUCTS = ("f32_kernel", "xla_dot")


def float_product(platform: str) -> str:
    """How a float32 weight's product runs on `platform`: the one place this is decided (module
    docstring). On a CPU with AVX2 and FMA but not AVX-512 the float32 kernel, where it builds;
    else XLA's dot (whose AVX-512 kernels are twice the kernel's width)."""
    if (platform == "cpu" and "avx512f" not in cpu_kernels.cpu_flags()
            and cpu_kernels.available() and cpu_kernels.f32_loop() == "avx2_fma"):
        return "f32_kernel"
    return "xla_dot"


def float_weight_layout(platform: str) -> str:
    """How float linear weights are stored on `platform` (a `jax.default_backend()` name): the
    one place this is decided (see the module docstring): `[out, in]` rows where the float32
    kernel computes the products, as declared elsewhere."""
    return "out_in" if float_product(platform) == "f32_kernel" else "in_out"


def int8_weight_layout(platform: str) -> str:
    """How int8 linear weights are stored on `platform`: "out_in" (rows) where the product is
    the CPU kernel, which reads `[out, in]` rows; as declared elsewhere (module docstring)."""
    return "out_in" if int8_product(platform) == "int8_kernel" else "in_out"


def weight_layout_for(platform: str, quantized: bool) -> str:
    """The layout "auto" means for a model's linear weights on `platform`: one rule."""
    return int8_weight_layout(platform) if quantized else float_weight_layout(platform)


def stored_order(ndim: int, inputs: tuple[int, int], layout: str) -> tuple[int, ...] | None:
    """The permutation from a float weight's declared dims to its stored dims under `layout`
    (`jnp.transpose(declared, order)`), or None when it is stored as declared."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight layout must be one of {', '.join(WEIGHT_LAYOUTS)}, "
                         f"got {layout!r}")
    start, stop = inputs
    if layout == "in_out" or start != 0 or stop == ndim:
        return None
    return tuple(range(stop, ndim)) + tuple(range(stop))


class QuantizedWeight(nnx.Module):
    """An int8 weight and its float32 scales; `read` gives it back in the compute `dtype`."""

    def __init__(self, values: jax.Array, scale: jax.Array, axes: Sequence[str | None],
                 inputs: tuple[int, int], group: int | None, dtype,
                 stored_orders: tuple[tuple[int, ...], tuple[int, ...]] | None = None):
        """values, scale, axes and inputs as stored; `stored_orders`: the permutations from the
        declared values and scale to these (None when stored as declared)."""
        values_order, scale_order = stored_orders or (None, None)
        self.values = nnx.Param(values, out_sharding=tuple(axes), stored_order=values_order)
        self.scale = nnx.Param(scale, out_sharding=scale_axes(axes, inputs),
                               stored_order=scale_order)
        self.inputs, self.group, self.dtype = tuple(inputs), group, jnp.dtype(dtype)

    def dequantize(self) -> jax.Array:
        return dequantize(self.values[...], self.scale[...], self.inputs, self.group, self.dtype)


def declare_weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype,
                   quantization: str | None, inputs: tuple[int, int],
                   init=None, layout: str = "in_out") -> nnx.Param | QuantizedWeight:
    """A linear layer's weight in its format: a float `nnx.Param`, or a `QuantizedWeight`
    (a random one is drawn in float and quantized). `inputs`: the [start, stop) dims it
    contracts, of the declared `shape`; `layout`: how a float weight is stored (its metadata
    `stored_order` records the transpose, None when stored as declared)."""
    init = init or nnx.initializers.normal(0.02)
    w = init(rngs.params(), tuple(shape), dtype)
    order = stored_order(len(shape), inputs, layout)
    if order is not None:  # the output dims now lead
        w, axes = jnp.transpose(w, order), tuple(axes[i] for i in order)
        inputs = (len(shape) - inputs[1], len(shape))
    if quantization is None:
        return nnx.Param(w, out_sharding=tuple(axes), inputs=tuple(inputs), stored_order=order)
    group = quantization_group(quantization)
    # Quantizing the stored weight gives the declared weight's values and scales transposed:
    # values by `order`, scales [groups, ..outputs] -> [..outputs, groups].
    orders = None if order is None else (order, tuple(range(1, inputs[0] + 1)) + (0,))
    return QuantizedWeight(*quantize(w, inputs, group), axes, inputs, group, dtype, orders)


def read(weight: nnx.Param | QuantizedWeight) -> jax.Array:
    """The weight as the dot that uses it takes it (dequantized here, inside the step)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize()
    return weight[...]


def _inputs_of(weight: nnx.Param | QuantizedWeight) -> tuple[int, int]:
    if isinstance(weight, QuantizedWeight):
        return weight.inputs
    return tuple(weight.get_metadata()["inputs"])


def _product_shape(x: jax.Array, weight: nnx.Param | QuantizedWeight):
    """(the weight's output dims, which of its 2-D views' dims contracts, K) for `project`."""
    start, stop = _inputs_of(weight)
    shape = weight.values.shape if isinstance(weight, QuantizedWeight) else weight.shape
    if start == 0:
        outputs, contract = shape[stop:], 0
    elif stop == len(shape) and start >= 1:
        outputs, contract = shape[:start], 1
    else:
        raise ValueError(f"project: a weight of shape {tuple(shape)} contracting dims "
                         f"[{start}, {stop}) has outer dims; read it with `read`")
    k = math.prod(shape[start:stop])
    if x.shape[-1] != k:
        raise ValueError(f"project: x has {x.shape[-1]} inputs, the weight {k}")
    return tuple(outputs), contract, k


def _int8_product_of(product: str | None) -> str:
    product = product or int8_product(jax.default_backend())
    if product not in INT8_PRODUCTS:
        raise ValueError(f"int8 product must be one of {', '.join(INT8_PRODUCTS)}, "
                         f"got {product!r}")
    return product


def project(x: jax.Array, weight: nnx.Param | QuantizedWeight,
            product: str | None = None) -> jax.Array:
    """x [..tokens, K] times a linear weight -> [..tokens, ..its output dims].

    The weight's input dims (K elements together) are its leading dims (`[in.., out..]`) or its
    trailing ones (`[out.., in..]`: the LM head, and the projections stored "out_in"); weights
    with outer dims (the experts) are read with `read`. `product`: an int8 weight's
    implementation, by default `int8_product` of the platform being traced for."""
    outputs, contract, k = _product_shape(x, weight)
    if isinstance(weight, QuantizedWeight):
        product = _int8_product_of(product)
        if product in ("int8_kernel", "int8_dot"):
            out = _int8_dot(x.reshape(-1, k), weight.values[...], weight.scale[...], contract,
                            k, weight.group or k, kernel=product == "int8_kernel")
            return out.astype(weight.dtype).reshape(x.shape[:-1] + outputs)
    w = read(weight)
    if _f32_kernel_applies(x, [w], [contract]):
        return _f32_kernel_products(x.reshape(-1, k), (w.reshape(-1, k),))[0].reshape(
            x.shape[:-1] + outputs)
    w2 = w.reshape((k, -1)) if contract == 0 else w.reshape((-1, k))
    out = jax.lax.dot_general(x.reshape(-1, k), w2, (((1,), (contract,)), ((), ())))
    return out.reshape(x.shape[:-1] + outputs)


def project_all(x: jax.Array, weights: Sequence[nnx.Param | QuantizedWeight],
                product: str | None = None) -> list[jax.Array]:
    """x times each of `weights`, linear weights that share the input (q, k and v; gate and
    up): what `project(x, w)` gives for each, bit for bit. Where the CPU kernel computes their
    products, it is one call for all of them (the activations quantized once, one fork and join
    of the kernel's threads instead of one per weight)."""
    shapes = [_product_shape(x, w) for w in weights]
    quantized = all(isinstance(w, QuantizedWeight) and w.group is None for w in weights)
    tokens = math.prod(x.shape[:-1])
    if (len(weights) > 1 and quantized and _int8_product_of(product) == "int8_kernel"
            and all(_kernel_applies(tokens, 1, contract) for _, contract, _ in shapes)):
        k = shapes[0][2]
        outs = _kernel_products(x.reshape(-1, k), [(w.values[...], w.scale[...]) for w in weights])
        return [out.astype(w.dtype).reshape(x.shape[:-1] + outputs)
                for out, w, (outputs, _, _) in zip(outs, weights, shapes)]
    floats = [w[...] for w in weights if not isinstance(w, QuantizedWeight)]
    if (len(weights) > 1 and len(floats) == len(weights)
            and _f32_kernel_applies(x, floats, [contract for _, contract, _ in shapes])):
        k = shapes[0][2]
        outs = _f32_kernel_products(x.reshape(-1, k), tuple(w.reshape(-1, k) for w in floats))
        return [out.reshape(x.shape[:-1] + outputs) for out, (outputs, _, _) in zip(outs, shapes)]
    return [project(x, w, product) for w in weights]


def _f32_kernel_applies(x: jax.Array, weights: Sequence[jax.Array],
                        contracts: Sequence[int]) -> bool:
    """Whether the float32 kernel computes these products: float32 activations (any number of
    tokens: one order of sums for decode, prefill and scoring alike) and float32 rows `[out,
    in]`, on one CPU device (as for the int8 kernel), where `float_product` chooses it."""
    tokens = math.prod(x.shape[:-1])
    return (x.dtype == jnp.float32 and all(w.dtype == jnp.float32 for w in weights)
            and all(c == 1 for c in contracts) and tokens > 0
            and jax.default_backend() == "cpu" and active_num_devices() == 1
            and float_product("cpu") == "f32_kernel")


@jax.custom_vjp
def _f32_kernel_products(x: jax.Array, rows: tuple[jax.Array, ...]) -> list[jax.Array]:
    """x [tokens, K] times each of `rows` ([N_i, K]) transposed, by the float32 kernel."""
    return cpu_kernels.f32_products(x, rows)


def _f32_kernel_products_fwd(x, rows):
    return cpu_kernels.f32_products(x, rows), (x, rows)


def _f32_kernel_products_bwd(residuals, grads):
    """The products' gradients (training differentiates through the layers), by XLA's dots."""
    x, rows = residuals
    dx = sum(g @ w for g, w in zip(grads, rows))
    return dx, tuple(g.T @ x for g in grads)


_f32_kernel_products.defvjp(_f32_kernel_products_fwd, _f32_kernel_products_bwd)


def quantize_activations(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """x [tokens, K] -> (int8 [tokens, groups, group], float32 scales [tokens, groups, 1]):
    symmetric, one scale per token and group of `group` consecutive inputs."""
    x3 = x.astype(jnp.float32).reshape(x.shape[0], -1, group)
    scale = jnp.max(jnp.abs(x3), axis=-1, keepdims=True) / QMAX
    q = jnp.round(x3 / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -QMAX, QMAX).astype(jnp.int8), scale


def _kernel_applies(tokens: int, groups: int, contract: int) -> bool:
    """Whether the CPU kernel computes this product's int32 sums: per-channel rows `[out, in]`
    of a few tokens, on one CPU device (the SPMD partitioner cannot split a custom call;
    module docstring), where the kernel is built."""
    return (contract == 1 and groups == 1 and tokens <= KERNEL_MAX_TOKENS
            and jax.default_backend() == "cpu" and active_num_devices() == 1
            and cpu_kernels.available())


def _kernel_products(x, weights) -> list[jax.Array]:
    """x [tokens, K] float and per-channel int8 rows `[out.., in..]` with their scales, as
    (values, scale) pairs -> float32 [tokens, N] each: the CPU kernel quantizes x as
    `quantize_activations` does and sums in int32; the scaling is `_int8_dot`'s."""
    k = x.shape[-1]
    xs, sums = cpu_kernels.int8_products(x.astype(jnp.float32),
                                         [values.reshape(-1, k) for values, _ in weights])
    return [acc.astype(jnp.float32) * xs[:, None] * scale.reshape(1, -1)
            for acc, (_, scale) in zip(sums, weights)]


def _int8_dot(x, values, scale, contract: int, k: int, group: int,
              kernel: bool = False) -> jax.Array:
    """x [tokens, K] float, values int8 with K elements of inputs (leading when `contract` is
    0, trailing when 1), scale [groups, outputs] or [outputs, groups] -> float32 [tokens, N].
    `kernel`: the int32 sums from the CPU kernel where it applies (the same integers)."""
    tokens = x.shape[0]
    groups = k // group
    if kernel and _kernel_applies(tokens, groups, contract):
        return _kernel_products(x, [(values, scale)])[0]
    if tokens == 1 and groups == 1 and contract == 1:
        # One token, [out, in] rows: the rounded activations times the widened rows, one fused
        # multiply-reduce loop over the int8 bytes (XLA:CPU), the int8 dot's numbers (integer
        # products, sums exact in float32 below 2^24).
        xq, xs = quantize_activations(x, group)
        acc = xq.reshape(1, k).astype(jnp.float32) @ values.reshape(-1, k).astype(jnp.float32).T
        return acc * xs[:, 0] * scale.reshape(1, -1)
    if tokens == 1:  # XLA:CPU's one-row integer dot is a slow matrix-vector loop
        x = jnp.concatenate([x, jnp.zeros_like(x)])
    xq, xs = quantize_activations(x, group)  # [t, g, s], [t, g, 1]
    if groups == 1:  # per channel: one plain [t, K] x [K, n] (or [n, K]) dot
        w2 = values.reshape((k, -1)) if contract == 0 else values.reshape((-1, k))
        acc = jax.lax.dot_general(xq.reshape(x.shape[0], k), w2, (((1,), (contract,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * xs[:, 0] * scale.reshape(1, -1))[:tokens]
    if contract == 0:
        wq = values.reshape(groups, group, -1)  # [g, s, n]
        ws = scale.reshape(groups, 1, -1)  # [g, 1, n]
        dims = (((2,), (1,)), ((1,), (0,)))
    else:
        wq = values.reshape(-1, groups, group)  # [n, g, s]
        ws = scale.reshape(-1, groups).T[:, None, :]  # [g, 1, n]
        dims = (((2,), (2,)), ((1,), (1,)))
    acc = jax.lax.dot_general(xq, wq, dims, preferred_element_type=jnp.int32)  # [g, t, n]
    out = jnp.sum(acc.astype(jnp.float32) * (jnp.swapaxes(xs, 0, 1) * ws), axis=0)
    return out[:tokens]
