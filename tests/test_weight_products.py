"""A linear weight's product (`jaxserve.ops.quant.project`): the float product, where XLA's dot
computes it, is bit-for-bit the expression the layers wrote before (the CPU's float32 kernel,
which sums in its own order, is tested in tests/test_cpu_kernels.py); the int8 x int8 dot (the CPU choice) stays within the
exact bound its activation rounding allows of the dequantize-then-dot product, for every weight
shape the models use, per channel and per group, for one token (padded) and several."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.ops import cpu_kernels, quant
from jaxserve.ops.quant import (INT8_PRODUCTS, declare_weight, dequantize, int8_product, project,
                                quantize_activations)

# (shape, the dims it contracts): q_proj [embed, heads, head_dim], o_proj [heads, head_dim,
# embed], gate_proj [embed, mlp], lm_head [vocab, embed]
WEIGHTS = {"q_proj": ((64, 4, 16), (0, 1)), "o_proj": ((4, 16, 64), (0, 2)),
           "gate_proj": ((64, 96), (0, 1)), "lm_head": ((96, 64), (1, 2))}


def declared(shape, inputs, quantization, layout="in_out"):
    with nnx.use_eager_sharding(False):
        return declare_weight(nnx.Rngs(0), shape, ("a",) * len(shape), jnp.float32,
                              quantization, inputs, layout=layout)


def activations(tokens, k, seed=1):
    x = jax.random.normal(jax.random.key(seed), (tokens, k), jnp.float32)
    return x.at[0, 3].set(6.0)  # an outlier: its token's scale is coarse


@pytest.mark.parametrize("name", WEIGHTS)
def test_the_float_product_is_bit_for_bit_the_layers_former_expression(name, monkeypatch):
    monkeypatch.setattr(quant, "float_product", lambda platform: "xla_dot")
    shape, inputs = WEIGHTS[name]
    w = declared(shape, inputs, None)
    x = activations(5, int(np.prod(shape[inputs[0]:inputs[1]])))
    former = {"q_proj": lambda x, w: jnp.einsum("te,ehd->thd", x, w),
              "o_proj": lambda x, w: x @ w.reshape(-1, w.shape[-1]),
              "gate_proj": lambda x, w: x @ w,
              "lm_head": lambda x, w: jnp.einsum("...e,ve->...v", x, w)}[name]
    ours = jax.jit(lambda x: project(x, w))(x)
    assert np.array_equal(np.asarray(ours), np.asarray(jax.jit(former)(x, w[...])))


@pytest.mark.parametrize("layout", ["in_out", "out_in"])  # out_in, one token: the widened rows
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("quantization", ["int8", "int8-g32"])
@pytest.mark.parametrize("name", WEIGHTS)
def test_the_int8_dot_is_within_its_activation_rounding_of_dequantize_then_dot(name,
                                                                              quantization,
                                                                              tokens, layout):
    shape, inputs = WEIGHTS[name]
    w = declared(shape, inputs, quantization, layout)
    shape, inputs = w.values.shape, w.inputs  # as stored
    k = int(np.prod(shape[inputs[0]:inputs[1]]))
    x = activations(tokens, k)
    reference = project(x, w, product="dequantize")
    ours = jax.jit(lambda x: project(x, w, product="int8_dot"))(x)
    assert ours.shape == reference.shape == (tokens,) + tuple(
        s for i, s in enumerate(shape) if not inputs[0] <= i < inputs[1])
    # Each activation is off by at most half its (token, group) scale step sx / 2, so output n
    # moves by at most sum over inputs i of sx(i) / 2 * |w[i, n]| (float32 sums add ~1e-6).
    group = w.group or k
    _, xs = quantize_activations(x, group)  # [tokens, groups, 1]
    wf = np.asarray(dequantize(w.values[...], w.scale[...], w.inputs, w.group, jnp.float32),
                    np.float64)
    w2 = wf.reshape(k, -1) if inputs[0] == 0 else wf.reshape(-1, k).T  # [K, outputs]
    step = np.repeat(np.asarray(xs, np.float64)[:, :, 0], group, axis=1)  # [tokens, K]
    bound = (step / 2) @ np.abs(w2) + 1e-5 * (np.abs(np.asarray(x, np.float64)) @ np.abs(w2))
    error = np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))
    error = error.reshape(tokens, -1)
    assert np.all(error <= bound), float((error / bound).max())
    assert error.max() > 0  # the activations really were rounded


def test_one_place_chooses_the_int8_product_per_platform_and_refuses_others_by_name():
    # CPU: the int8 kernel where it builds (this machine has g++), else XLA's int8 dot
    assert int8_product("cpu") == ("int8_kernel" if cpu_kernels.available() else "int8_dot")
    assert int8_product("gpu") == int8_product("tpu") == "dequantize"
    assert set(INT8_PRODUCTS) == {"int8_kernel", "int8_dot", "dequantize"}
    w = declared(*WEIGHTS["gate_proj"], "int8")
    with pytest.raises(ValueError, match="'fast'"):
        project(activations(2, 64), w, product="fast")
    with pytest.raises(ValueError, match="x has 32 inputs, the weight 64"):
        project(activations(2, 32), w)
