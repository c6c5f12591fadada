"""The CPU decode-attention kernel (`jaxserve.ops.cpu_kernels.decode_attention`): one query per
row reading its context straight from float32 pages. Against a float64 softmax over the same
keys it is within float32 rounding (positions around its 64-key tiles and the 4-key groups of
its vector loop, head_dim with and without the vector loop, one to eight query heads per KV
head, rows shorter than their position, rows with no keys); each row's result is its own (the
same bits alone, in a batch, on one thread or on the pool); the engine's decode steps run
through it (and keep XLA's loop for quantized KV) and give the logprobs of XLA's loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.ops import attention, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"the CPU kernels are not built here: "
                                       f"{cpu_kernels.unavailable_reason()}")

BLOCK, BLOCKS = 16, 48


def operands(rng, rows, heads, kv_heads, dim, width=12):
    q = rng.normal(size=(rows, heads, dim)).astype(np.float32)
    k = rng.normal(size=(BLOCKS, BLOCK, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(BLOCKS, BLOCK, kv_heads, dim)).astype(np.float32)
    k[3, 2] *= 30  # a few keys that dominate their softmax beside ones that barely count
    tables = np.stack([rng.permutation(BLOCKS)[:width] for _ in range(rows)]).astype(np.int32)
    return q, k, v, tables


def reference(q, k, v, tables, positions, lens, scale):
    """float64 softmax attention over keys 0 .. min(position + 1, len) - 1 of each row."""
    rows, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros((rows, heads, dim))
    for r in range(rows):
        n = min(positions[r] + 1, lens[r])
        if n <= 0:
            continue
        at = [(tables[r, t // BLOCK], t % BLOCK) for t in range(n)]
        keys = np.stack([k[b, o] for b, o in at]).astype(np.float64)  # [n, kv, dim]
        values = np.stack([v[b, o] for b, o in at]).astype(np.float64)
        for h in range(heads):
            s = keys[:, h // group] @ q[r, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[r, h] = p @ values[:, h // group] / p.sum()
    return out


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (4, 4, 16), (8, 1, 24), (2, 1, 128)])
def test_within_float32_rounding_of_a_float64_softmax_and_each_rows_result_is_its_own(
        heads, kv_heads, dim):
    rng = np.random.default_rng(dim + heads)
    # positions around the 64-key tiles and the 4-key groups; a row shorter than its position;
    # a padding row (no keys)
    positions = np.array([0, 2, 3, 62, 63, 64, 66, 129, 190, 100, 7], np.int32)
    lens = positions + 1
    lens[-2], lens[-1] = 50, 0
    q, k, v, tables = operands(rng, len(positions), heads, kv_heads, dim)
    scale = dim ** -0.5
    run = jax.jit(lambda *a, threads: cpu_kernels.decode_attention(*a, scale, threads=threads),
                  static_argnames="threads")
    got = np.asarray(run(q, k, v, tables, positions, lens, threads=True))
    assert got.dtype == np.float32 and got.shape == q.shape
    want = reference(q, k, v, tables, positions, lens, scale)
    # the output is a convex combination of values: its rounding error is bounded by the
    # values' size times a few hundred float32 ulps for a few hundred keys
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(v).max())
    assert (got[-1] == 0).all()  # no keys: zeros, not NaN
    np.testing.assert_array_equal(np.asarray(run(q, k, v, tables, positions, lens,
                                                 threads=False)), got)
    for r in range(len(positions)):  # each row alone: the same bits as in the batch
        alone = run(q[r:r + 1], k, v, tables[r:r + 1], positions[r:r + 1], lens[r:r + 1],
                    threads=True)
        np.testing.assert_array_equal(np.asarray(alone)[0], got[r], err_msg=f"row {r}")


def test_bad_operands_are_refused_with_their_shapes():
    rng = np.random.default_rng(0)
    q, k, v, tables = operands(rng, 2, 8, 2, 16)
    pos = np.array([3, 4], np.int32)
    with pytest.raises(ValueError, match=r"got q float32\[2, 8, 16\], k float32\[48, 16, 2, 16\], "
                                         r"v float32\[48, 16, 2, 8\]"):
        cpu_kernels.decode_attention(q, k, v[..., :8], tables, pos, pos + 1, 0.25)
    with pytest.raises(ValueError, match=r"q float32\[2, 6, 16\]"):  # 6 heads over 4 KV heads
        cpu_kernels.decode_attention(q[:, :6], k[:, :, :1].repeat(4, 2),
                                     v[:, :, :1].repeat(4, 2), tables, pos, pos + 1, 0.25)
    with pytest.raises(ValueError, match=r"positions float32\[2\]"):
        cpu_kernels.decode_attention(q, k, v, tables, pos.astype(np.float32), pos + 1, 0.25)


@pytest.fixture
def kernel_decisions(monkeypatch):
    """Every `_decode_kernel_applies` answer given while tracing, in order."""
    seen = []
    decide = attention._decode_kernel_applies

    def spy(*args):
        seen.append(decide(*args))
        return seen[-1]

    monkeypatch.setattr(attention, "_decode_kernel_applies", spy)
    return seen


def test_engine_decode_steps_run_in_the_kernel_and_give_xlas_logprobs(
        hf_model_dir, monkeypatch, kernel_decisions):
    _, model_dir = hf_model_dir("llama")
    settings = dict(compilation="on_use", kv_blocks=32, max_num_seqs=4, max_model_len=128)
    prompts = [[1, 5, 9, 2, 7, 3], [4, 8, 15, 16, 23, 42, 11, 3, 9, 1, 2]]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)

    def run(**extra):
        return [o.outputs[0] for o in LLM(model_dir, **settings, **extra).generate(
            prompts, params, use_tqdm=False)]

    kernel = run()
    assert True in kernel_decisions  # decode rows
    assert False in kernel_decisions  # prefill tiles keep XLA's loop
    kernel_decisions.clear()
    sharded = run(mesh="tp=2", rules="tp")  # per device, the kernel on the calling thread
    assert True in kernel_decisions
    kernel_decisions.clear()
    int8_kv = run(kv_cache_dtype="int8")
    assert True not in kernel_decisions  # quantized pages: XLA's loop decodes them
    monkeypatch.setattr(attention, "_decode_kernel_applies", lambda *args: False)
    xla = run()
    for ours, theirs in zip(kernel, xla):
        assert ours.token_ids == theirs.token_ids
        got = [lp[t] for lp, t in zip(ours.logprobs, ours.token_ids)]
        want = [lp[t] for lp, t in zip(theirs.logprobs, theirs.token_ids)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for ours, theirs in zip(kernel, sharded):
        assert ours.token_ids == theirs.token_ids
    assert all(len(o.token_ids) == 24 for o in int8_kv)
