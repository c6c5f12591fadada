"""What the hardware allows, measured in the same run as the engine: read bandwidth, matmul
peaks, and the bare stack of a decode step's weight products; and what a decode step must
move and compute (bytes and FLOPs), so that floor = max(bytes / bandwidth, FLOPs / peak)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from jaxserve.bench.timing import median, readback_loop


def read_bandwidth(nbytes: int, threads: int, repeats: int) -> float:
    """Bytes/s of np.sum over an nbytes float32 array split over `threads` Python threads."""
    a = np.ones(nbytes // 4, np.float32)  # written once: every page is really there
    parts = np.array_split(a, threads)
    sums = [0.0] * threads
    times = []
    for _ in range(max(repeats, 3)):
        if threads == 1:
            t0 = time.perf_counter()
            sums[0] = float(a.sum())
        else:
            barrier = threading.Barrier(threads + 1)

            def work(i):
                barrier.wait()
                sums[i] = float(parts[i].sum())
            pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for t in pool:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in pool:
                t.join()
        times.append(time.perf_counter() - t0)
    assert abs(sum(sums) - a.size) < 1e-3 * a.size
    return nbytes / min(times)


def numpy_sgemm(n: int, repeats: int) -> float:
    """FLOP/s of numpy's float32 n x n matmul."""
    from jaxserve.perf.calibrate import best_time

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    return 2 * n**3 / best_time(lambda: a @ b, max(repeats, 3))


def jax_dot(n: int, repeats: int) -> float:
    """FLOP/s of `jax.jit(jnp.dot)` on float32 n x n matrices on the default device."""
    import jax
    import jax.numpy as jnp

    from jaxserve.perf.calibrate import best_time

    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
    y = jax.device_put(np.random.default_rng(1).standard_normal((n, n), np.float32))
    f = jax.jit(jnp.dot)
    return 2 * n**3 / best_time(lambda: f(x, y).block_until_ready(), max(repeats, 3))


def matmul_params(shape: dict) -> int:
    """Parameters that take part in a decode step's matmuls (all but the embedding and norms)."""
    e, d, m = shape["hidden_size"], shape["head_dim"], shape["intermediate_size"]
    attn = e * d * (2 * shape["num_heads"] + 2 * shape["num_kv_heads"])
    return shape["num_layers"] * (attn + 3 * e * m) + shape["vocab_size"] * e


def step_cost(config, batch: int, context: int, itemsize: int, kv_itemsize: int) -> dict:
    """What a dense decode step reads (weights, then each sequence's KV context) and computes."""
    e, d, m = config.hidden_size, config.head_dim, config.intermediate_size
    layers, h, kv, v = config.num_layers, config.num_heads, config.num_kv_heads, config.vocab_size
    layer_params = e * d * (2 * h + 2 * kv) + 3 * e * m + 2 * e
    weight_bytes = (layers * layer_params + e + v * e) * itemsize
    kv_bytes = layers * context * 2 * kv * d * kv_itemsize * batch
    mm = layers * (e * d * (2 * h + 2 * kv) + 3 * e * m) + v * e
    flops = 2 * mm * batch + 4 * layers * h * d * context * batch
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "bytes": weight_bytes + kv_bytes, "flops": flops}


def time_matmul_stack(shape: dict, batch: int, iters: int, repeats: int) -> dict:
    """Exactly the decode step's weight products, float32, layers unrolled, chained calls."""
    import jax
    import jax.numpy as jnp
    e, d, m, v = (shape[k] for k in ("hidden_size", "head_dim", "intermediate_size",
                                     "vocab_size"))
    h, kv = shape["num_heads"], shape["num_kv_heads"]
    rng = np.random.default_rng(0)

    def w(rows, cols):
        return jax.device_put((rng.standard_normal((rows, cols), np.float32)
                               / np.float32(math.sqrt(rows))))
    layers = [(w(e, h * d), w(e, kv * d), w(e, kv * d), w(h * d, e), w(e, m), w(e, m), w(m, e))
              for _ in range(shape["num_layers"])]
    head = w(v, e)  # [vocab, embed], as the model stores it

    @jax.jit
    def stack(layers, head, x):
        b = x.shape[0]
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, vv = x @ wq, x @ wk, x @ wv
            a = (q.reshape(b, kv, h // kv, d) + (k + vv).reshape(b, kv, 1, d)).reshape(b, h * d)
            x = x + a @ wo
            x = x + (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
        logits = jnp.einsum("be,ve->bv", x, head)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return x, jnp.argmax(logits, axis=-1)

    state = {"x": jax.device_put(rng.standard_normal((batch, e), np.float32))}

    def dispatch():
        state["x"], ids = stack(layers, head, state["x"])
        return ids
    for _ in range(3):
        np.asarray(dispatch())
    runs = [readback_loop(dispatch, iters) for _ in range(repeats)]
    return {"batch": batch, "ms_per_step": median([r["ms_per_step"] for r in runs]),
            "runs": runs}
