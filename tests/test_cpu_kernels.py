"""The CPU int8 kernel (`jaxserve.ops.cpu_kernels`): its activation scales are exactly
`quant.quantize_activations`' and its int32 sums exactly XLA's int8 x int8 -> int32 dot of those
rounded activations, for row counts around its 8-token passes, K with and without a 64-byte
tail, the extreme values (-128 in the weights too) and several weights in one call, in every
inner loop this CPU can run (AVX-512 VNNI, AVX2, portable), with its threads waiting for the next
call or not; the model with it gives bit for bit the
logits of XLA's int8 dot, in one call per layer for q/k/v and one for gate/up, and a dp x tp
mesh (which keeps XLA's dot) the single-device ones; without a compiler the product rule says
"int8_dot", one warning says why, and the products are XLA's. The block-copy kernel gives the
bytes and the gradient of XLA's gather, and the model's logits with it are bit for bit those
with XLA's gather."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve import LLM
from jaxserve.ops import attention, cpu_kernels, quant

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"the CPU kernel is not built here: "
                                       f"{cpu_kernels.unavailable_reason()}")

PROMPT = [[1, 5, 9, 2, 7, 3]]  # a 16-token step: the kernel's rows
# (tokens, K, the row counts of the weights of one call)
CALLS = [(t, k, ns) for t in (1, 2, 5, 16, 17) for k in (64, 100, 512)
         for ns in ((1,), (37, 1024), (1024, 37, 1))]


def int8_rows(rng, shape):
    """Random int8 rows with the extremes planted: a row of 127s, one of -128s (which
    `quant.quantize` never writes, but a product must still take)."""
    a = rng.integers(-128, 128, shape).astype(np.int8)
    a[0] = 127
    a[-1] = -128
    return a


def float_activations(rng, tokens, k):
    """Random activations; token 0 all ones (it rounds to 127 everywhere), the last token with
    both signs' extremes, a token of zeros (scale 0) when there are 3 or more."""
    x = rng.normal(size=(tokens, k)).astype(np.float32)
    x[0] = 1.0
    x[-1, :2] = (5.0, -5.0)
    if tokens >= 3:
        x[1] = 0.0
    return x


def test_the_kernel_gives_xlas_activation_scales_and_int8_dot_sums_for_every_call():
    rng = np.random.default_rng(0)
    calls = [(float_activations(rng, t, k), [int8_rows(rng, (n, k)) for n in ns])
             for t, k, ns in CALLS]

    @jax.jit  # every call in one program: one compile
    def both(calls):
        ours = [cpu_kernels.int8_products(x, rows) for x, rows in calls]
        xla = []
        for x, rows in calls:
            xq, xs = quant.quantize_activations(x, x.shape[1])
            xq = xq.reshape(x.shape)
            xla.append((xs[:, 0, 0], [jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())),
                                                         preferred_element_type=jnp.int32)
                                     for w in rows]))
        return ours, xla

    ours, xla = jax.block_until_ready(both(calls))
    flags = open("/proc/cpuinfo").read().split()
    best = ("avx512_vnni" if "avx512_vnni" in flags and "avx512bw" in flags
            else "avx2" if "avx2" in flags else "portable")
    assert cpu_kernels.inner_loop() == best
    slower = {}  # the loops of CPUs without this one's instructions, same program
    cpu_kernels.set_spin(0)  # and threads that sleep between calls
    try:
        for loop in cpu_kernels.LOOPS[:cpu_kernels.LOOPS.index(best)]:
            cpu_kernels.limit_loop(loop)
            assert cpu_kernels.inner_loop() == loop
            slower[loop] = jax.block_until_ready(both(calls)[0])  # run before it is undone
    finally:
        cpu_kernels.limit_loop(cpu_kernels.LOOPS[-1])
        cpu_kernels.set_spin(cpu_kernels.DEFAULT_SPIN_MICROS)
    assert cpu_kernels.inner_loop() == best
    for loop, results in [(best, ours)] + list(slower.items()):
        for (t, k, ns), (xs, sums), (ref_xs, ref_sums) in zip(CALLS, results, xla):
            assert xs.dtype == jnp.float32 and xs.shape == (t,)
            np.testing.assert_array_equal(np.asarray(xs), np.asarray(ref_xs),
                                          err_msg=f"{loop} {(t, k)}")
            for n, a, b in zip(ns, sums, ref_sums):
                assert a.dtype == jnp.int32 and a.shape == (t, n)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                              err_msg=f"{loop} {(t, k, n)}")
    # the extremes reach the int32 sums: a token of ones rounds to 127s, against a row of 127s
    t, k, ns = CALLS[-1]
    assert int(np.asarray(ours[-1][1][0])[0, 0]) == 127 * 127 * k
    assert float(np.asarray(ours[-1][0])[1]) == 0.0  # a token of zeros has scale 0


def test_a_nan_activation_makes_its_tokens_products_nan_as_in_xla():
    x = np.ones((2, 64), np.float32)
    x[1, 3] = np.nan
    w = lm_head_rows()
    ours = np.asarray(jax.jit(lambda x: quant.project(x, w, product="int8_kernel"))(x))
    xla = np.asarray(jax.jit(lambda x: quant.project(x, w, product="int8_dot"))(x))
    assert np.isnan(ours[1]).all() and np.isnan(xla[1]).all()
    np.testing.assert_array_equal(ours[0], xla[0])


def test_bad_operands_are_refused_with_their_shapes():
    with pytest.raises(ValueError, match=r"float32\[2, 64\] and int8\[3, 32\]"):
        cpu_kernels.int8_products(jnp.zeros((2, 64)), [jnp.zeros((3, 32), jnp.int8)])
    with pytest.raises(ValueError, match=r"int8\[2, 64\] and int8\[3, 64\]"):
        cpu_kernels.int8_products(jnp.zeros((2, 64), jnp.int8), [jnp.zeros((3, 64), jnp.int8)])
    with pytest.raises(ValueError, match=r"and none"):
        cpu_kernels.int8_products(jnp.zeros((2, 64)), [])
    with pytest.raises(ValueError, match=r"float32\[4, 2\] and float32\[3\]"):
        cpu_kernels.gather_blocks(jnp.zeros((4, 2)), jnp.zeros((3,)))


def lm_head_rows() -> quant.QuantizedWeight:
    """An int8 LM head: rows [vocab, embed] = [96, 64]."""
    with nnx.use_eager_sharding(False):
        return quant.declare_weight(nnx.Rngs(0), (96, 64), ("vocab", "embed"), jnp.float32,
                                    "int8", (1, 2))


def activations(tokens: int) -> jax.Array:
    return jax.random.normal(jax.random.key(tokens), (tokens, 64), jnp.float32)


@pytest.fixture()
def kernel_calls(monkeypatch):
    """The kernel's calls in the programs traced since (counted at trace): each call's
    weights' row counts."""
    calls = []
    real = cpu_kernels.int8_products
    monkeypatch.setattr(cpu_kernels, "int8_products",
                        lambda x, rows: calls.append(tuple(w.shape[0] for w in rows))
                        or real(x, rows))
    return calls


def test_the_model_with_the_kernel_gives_the_int8_dots_logits_bit_for_bit(hf_model_dir,
                                                                          monkeypatch,
                                                                          kernel_calls):
    _, model_dir = hf_model_dir("llama")
    settings = dict(quantization="int8", quantize_embeddings=True, compilation="on_use",
                    kv_blocks=16, max_num_seqs=2, max_model_len=64)
    assert quant.int8_product("cpu") == "int8_kernel"  # the default here, rows [out, in]
    kernel = LLM(model_dir, **settings)
    assert kernel.config.weight_layout == "out_in"
    with_kernel = kernel.logits(PROMPT)[0]
    # every projection of every layer and the LM head ran in the kernel: per layer one call
    # for q, k and v, one for o, one for gate and up, one for down
    c = kernel.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    mlp, embed = c.intermediate_size, c.hidden_size
    assert kernel_calls == [(q, kv, kv), (embed,), (mlp, mlp), (embed,)] * c.num_layers + [
        (c.vocab_size,)], kernel_calls
    used = len(kernel_calls)
    sharded = LLM(model_dir, mesh="dp=2,tp=2", rules="dp_tp", **settings).logits(PROMPT)[0]
    assert len(kernel_calls) == used  # a multi-device program keeps XLA's dot
    monkeypatch.setattr(quant, "int8_product", lambda platform: "int8_dot")
    xla = LLM(model_dir, weight_layout="out_in", **settings).logits(PROMPT)[0]
    assert len(kernel_calls) == used
    assert np.array_equal(with_kernel, xla)  # the int32 sums are exact, the scaling the same
    # the tolerance of every mesh test (tests/test_quantization.py): tp sums in another order
    np.testing.assert_allclose(sharded, with_kernel, rtol=0,
                               atol=1e-5 * np.abs(with_kernel).max())


def test_one_token_and_several_through_the_kernel_equal_the_int8_dot(kernel_calls):
    w = lm_head_rows()
    for tokens in (1, 3, quant.KERNEL_MAX_TOKENS + 1):
        x = activations(tokens)
        ours = jax.jit(lambda x: quant.project(x, w, product="int8_kernel"))(x)
        xla = jax.jit(lambda x: quant.project(x, w, product="int8_dot"))(x)
        assert np.array_equal(np.asarray(ours), np.asarray(xla)), tokens
    assert len(kernel_calls) == 2  # beyond KERNEL_MAX_TOKENS tokens: XLA's int8 dot


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])  # missing; a failed build
def test_without_a_build_the_product_is_xlas_int8_dot_and_one_warning_says_why(
        compiler, monkeypatch, tmp_path, caplog, kernel_calls):
    monkeypatch.setenv(cpu_kernels.COMPILER_ENV, compiler)
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(cpu_kernels, "_state", {})
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert quant.int8_product("cpu") == "int8_dot"
        assert quant.int8_weight_layout("cpu") == "in_out"
        assert not cpu_kernels.available()
        w, x = lm_head_rows(), activations(2)
        asked = jax.jit(lambda x: quant.project(x, w, product="int8_kernel"))(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and compiler in warnings[0].getMessage()
    assert compiler in cpu_kernels.unavailable_reason()
    assert kernel_calls == []
    np.testing.assert_array_equal(np.asarray(asked),
                                  np.asarray(quant.project(x, w, product="int8_dot")))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_block_copies_are_xlas_gather_bytes_and_gradient(dtype):
    rng = np.random.default_rng(1)
    pages = jnp.asarray(rng.normal(size=(12, 16, 2, 8)) * 50).astype(dtype)  # [blocks, ...]
    ids = jnp.asarray([[3, 0, 11, 3], [-1, 12, -13, 7]], jnp.int32)  # repeats; out of range
    ours = jax.jit(cpu_kernels.gather_blocks)(pages, ids)
    assert ours.dtype == pages.dtype and ours.shape == (2, 4, 16, 2, 8)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.jit(lambda p, i: p[i])(pages,
                                                                                       ids)))
    if dtype == jnp.float32:  # training differentiates through the pool's reads
        weights = jnp.asarray(rng.normal(size=ours.shape), jnp.float32)
        in_range = ids % 12
        grad = jax.grad(lambda p: jnp.sum(attention.gather_blocks(p, in_range) * weights))
        ref = jax.grad(lambda p: jnp.sum(p[in_range] * weights))
        np.testing.assert_array_equal(np.asarray(grad(pages)), np.asarray(ref(pages)))


def test_the_model_reading_blocks_by_copies_gives_the_logits_of_xlas_gather(hf_model_dir,
                                                                           monkeypatch):
    _, model_dir = hf_model_dir("llama")
    settings = dict(compilation="on_use", kv_blocks=16, max_num_seqs=2, max_model_len=64,
                    block_size=4)  # a 6-token prompt reads two blocks per chunk
    prompts = [[1, 5, 9, 2, 7, 3], [4, 4, 8]]
    copied = []  # block reads traced through the kernel
    real = cpu_kernels.gather_blocks
    monkeypatch.setattr(cpu_kernels, "gather_blocks",
                        lambda pages, ids: copied.append(ids.shape) or real(pages, ids))
    llm = LLM(model_dir, **settings)
    copies = [llm.logits([p])[0] for p in prompts]
    assert copied and len(copied) % 2 == 0  # each layer's k and v
    traced = len(copied)
    monkeypatch.setattr(attention, "_copied_blocks", lambda pages, ids: pages[ids])
    llm = LLM(model_dir, **settings)
    xla = [llm.logits([p])[0] for p in prompts]
    assert len(copied) == traced
    for a, b in zip(copies, xla):
        assert np.array_equal(a, b)
