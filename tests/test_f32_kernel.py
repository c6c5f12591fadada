"""The CPU float32 kernel (`jaxserve.ops.cpu_kernels.f32_products`): it sums every element in
one order, so its AVX2 loop and its portable one give the same bits and a token's result does
not depend on the tokens beside it in the call; it is within the rounding bound of recursive
summation of the exact products; the model with it (`quant.float_product`, CPU without AVX-512)
runs q/k/v, o, gate/up, down and the LM head through it, one call each, and gives XLA's dot's
logits within float32 rounding, as a dp x tp mesh (which keeps XLA's dot) does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve import LLM
from jaxserve.ops import cpu_kernels, quant

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"the CPU kernels are not built here: "
                                       f"{cpu_kernels.unavailable_reason()}")

PROMPT = [[1, 5, 9, 2, 7, 3]]
# (tokens, K, the row counts of the weights of one call): tokens around the 4-token tiles and
# the 32-token blocks, K with and without a tail of K % 8, rows around the 3-row tiles
CALLS = [(t, k, ns) for t in (1, 3, 4, 33) for k in (8, 77, 512)
         for ns in ((1,), (5, 64), (64, 5, 2))]


def operands(rng, t, k, ns):
    x = rng.normal(size=(t, k)).astype(np.float32)
    x[-1, 0] = 1e4  # a large product beside small ones: rounding shows
    return x, [rng.normal(size=(n, k)).astype(np.float32) for n in ns]


def test_every_loop_sums_in_one_order_for_any_tokens_within_the_rounding_bound():
    rng = np.random.default_rng(0)
    calls = [operands(rng, *call) for call in CALLS]
    run = jax.jit(lambda calls: [cpu_kernels.f32_products(x, ws) for x, ws in calls])
    alone = jax.jit(lambda calls: [[cpu_kernels.f32_products(x[t:t + 1], ws)
                                    for t in range(x.shape[0])] for x, ws in calls])
    best = "avx2_fma" if {"avx2", "fma"} <= cpu_kernels.cpu_flags() else "portable"
    assert cpu_kernels.f32_loop() == best
    results = {best: jax.block_until_ready(run(calls))}
    token_by_token = jax.block_until_ready(alone(calls))
    try:
        cpu_kernels.limit_f32_loop("portable")  # the loop of CPUs without FMA, same program
        assert cpu_kernels.f32_loop() == "portable"
        results["portable"] = jax.block_until_ready(run(calls))
    finally:
        cpu_kernels.limit_f32_loop(cpu_kernels.F32_LOOPS[-1])
    assert cpu_kernels.f32_loop() == best
    u = 2.0 ** -24
    for (t, k, ns), (x, ws), ours, portable, one_by_one in zip(
            CALLS, calls, results[best], results["portable"], token_by_token):
        for n, w, a, b in zip(ns, ws, ours, portable):
            assert a.dtype == jnp.float32 and a.shape == (t, n)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{(t, k, n)}")
            exact = x.astype(np.float64) @ w.astype(np.float64).T
            bound = k * u / (1 - k * u) * (np.abs(x).astype(np.float64) @ np.abs(w).T)
            assert (np.abs(np.asarray(a) - exact) <= bound).all(), (t, k, n)
        for i in range(t):  # each token alone: the same bits as among the others
            for a, single in zip(ours, one_by_one[i]):
                np.testing.assert_array_equal(np.asarray(single)[0], np.asarray(a)[i])


def test_bad_operands_are_refused_with_their_shapes():
    with pytest.raises(ValueError, match=r"float32\[2, 64\] and float32\[3, 32\]"):
        cpu_kernels.f32_products(jnp.zeros((2, 64)), [jnp.zeros((3, 32))])
    with pytest.raises(ValueError, match=r"float32\[2, 64\] and bfloat16\[3, 64\]"):
        cpu_kernels.f32_products(jnp.zeros((2, 64)), [jnp.zeros((3, 64), jnp.bfloat16)])
    with pytest.raises(ValueError, match=r"and none"):
        cpu_kernels.f32_products(jnp.zeros((2, 64)), [])


@pytest.fixture()
def kernel_calls(monkeypatch):
    """The float32 kernel's calls in the programs traced since: each call's weights' rows."""
    calls = []
    real = cpu_kernels.f32_products
    monkeypatch.setattr(cpu_kernels, "f32_products",
                        lambda x, rows: calls.append(tuple(w.shape[0] for w in rows))
                        or real(x, rows))
    return calls


@pytest.mark.skipif(quant.float_product("cpu") != "f32_kernel",
                    reason="XLA's dot computes float32 products on this CPU")
def test_the_model_with_the_kernel_gives_xlas_dot_logits_within_rounding(hf_model_dir,
                                                                         monkeypatch,
                                                                         kernel_calls):
    _, model_dir = hf_model_dir("llama")
    settings = dict(compilation="on_use", kv_blocks=16, max_num_seqs=2, max_model_len=64)
    kernel = LLM(model_dir, **settings)
    assert kernel.config.weight_layout == "out_in"  # rows, where the kernel reads them
    with_kernel = kernel.logits(PROMPT)[0]
    c = kernel.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    mlp, embed = c.intermediate_size, c.hidden_size
    assert kernel_calls == [(q, kv, kv), (embed,), (mlp, mlp), (embed,)] * c.num_layers + [
        (c.vocab_size,)], kernel_calls
    used = len(kernel_calls)
    sharded = LLM(model_dir, mesh="dp=2,tp=2", rules="dp_tp", **settings).logits(PROMPT)[0]
    assert len(kernel_calls) == used  # a multi-device program keeps XLA's dot
    monkeypatch.setattr(quant, "float_product", lambda platform: "xla_dot")
    xla = LLM(model_dir, **settings)
    assert xla.config.weight_layout == "in_out"
    xla_logits = xla.logits(PROMPT)[0]
    assert len(kernel_calls) == used
    assert not np.array_equal(with_kernel, xla_logits)  # another order of sums ...
    # ... within the tolerance of every mesh test (tests/test_quantization.py)
    for other in (xla_logits, sharded):
        np.testing.assert_allclose(other, with_kernel, rtol=0,
                                   atol=1e-5 * np.abs(with_kernel).max())


def test_any_number_of_tokens_runs_in_the_kernel_and_a_tokens_result_is_its_own(kernel_calls):
    with nnx.use_eager_sharding(False):
        w = quant.declare_weight(nnx.Rngs(0), (96, 64), ("vocab", "embed"), jnp.float32, None,
                                 (1, 2))
    x = jax.random.normal(jax.random.key(0), (300, 64), jnp.float32)
    kernel = quant.float_product("cpu") == "f32_kernel"
    first = None
    for tokens in (1, 33, 300):  # decode, a short chunk, a prefill chunk of several blocks
        ours = np.asarray(jax.jit(lambda x: quant.project(x, w))(x[:tokens]))
        np.testing.assert_allclose(ours, np.asarray(x[:tokens] @ w[...].T), rtol=1e-5,
                                   atol=1e-5)
        first = ours[0] if first is None else first
        if kernel:  # token 0's logits whatever the chunk
            np.testing.assert_array_equal(ours[0], first)
    assert len(kernel_calls) == (3 if kernel else 0)


@pytest.mark.skipif(quant.float_product("cpu") != "f32_kernel",
                    reason="XLA's dot computes float32 products on this CPU")
def test_training_differentiates_through_the_kernels_products(monkeypatch, kernel_calls):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
    values = [jnp.asarray(rng.normal(size=(n, 64)), jnp.float32) for n in (48, 96)]
    cotangents = [jnp.asarray(rng.normal(size=(5, n)), jnp.float32) for n in (48, 96)]

    def loss(x, values):  # two rows [out, in] sharing their input, as gate and up
        ws = [nnx.Param(v, inputs=(1, 2)) for v in values]
        return sum(jnp.sum(out * c) for out, c in zip(quant.project_all(x, ws), cotangents))

    ours = jax.grad(loss, argnums=(0, 1))(x, values)
    assert kernel_calls == [(48, 96)]
    monkeypatch.setattr(quant, "float_product", lambda platform: "xla_dot")
    xla = jax.grad(loss, argnums=(0, 1))(x, values)
    assert kernel_calls == [(48, 96)]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
