"""The TPLA context benchmark (jaxserve.bench.tpla_contexts, `scripts/bench_tpla.py --part
contexts`): its quick run end to end on simulated devices, and the random KV pool it times."""

import json

import numpy as np

from jaxserve.bench import tpla, tpla_contexts


def test_a_random_pool_keeps_every_buffers_shape_dtype_and_sharding():
    import jax.numpy as jnp

    from jaxserve.kv_cache import CacheBuffer, CacheSpec, KVPool
    from jaxserve.sharding import Layout

    spec = CacheSpec({"c_kv": CacheBuffer((8,), ("latent",), jnp.dtype("float32")),
                      "k_pe": CacheBuffer((4,), (None,), jnp.dtype("bfloat16"))}, num_layers=2)
    pool = KVPool.create(spec, 6, 4, Layout.create("tp=2", "tpla"))
    filled = tpla_contexts.random_pool(pool, seed=1)
    for name, arrays in pool.buffers.items():
        for zeros, random in zip(arrays, filled.buffers[name]):
            assert (random.shape, random.dtype, random.sharding) == (
                zeros.shape, zeros.dtype, zeros.sharding)
            values = np.asarray(random, np.float32)
            assert 0.5 < values.std() < 2 and np.unique(values).size > values.size // 2
    c_kv = filled.buffers["c_kv"]
    assert not np.array_equal(np.asarray(c_kv[0]), np.asarray(c_kv[1]))  # each layer its own
    # a replicated buffer counts once per device, a split one once in all
    assert tpla_contexts.device_bytes(filled) == 2 * 6 * 4 * (8 * 4 + 2 * 4 * 2)


def test_the_quick_contexts_run_sizes_each_split_and_times_its_step(tmp_path):
    args = tpla.parse_args(["--part", "contexts", "--quick", "--json", str(tmp_path / "c.json")])
    out = tpla_contexts.main(args)
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == out["rows"]
    rows = {(r["model"], r["attention"], r["context"]): r for r in out["rows"]}
    assert sorted(rows) == [(m, a, c) for m, a in [("gqa", "mla"), ("mla", "mla"), ("mla", "tpla")]
                            for c in (64, 256)]
    # one layer of float32 at tp=2: GQA's 4 KV heads (K and V, 32 each) split in two; MLA's
    # latent 128 and rope key 16 whole on each device; TPLA's latent split, its rope key whole
    assert {k[:2]: r["kv_bytes_per_token_per_device"] for k, r in rows.items()} == {
        ("gqa", "mla"): 2 * 4 * 32 * 4 / 2, ("mla", "mla"): (128 + 16) * 4,
        ("mla", "tpla"): (64 + 16) * 4}
    for (_, _, context), r in rows.items():
        assert r["kv_bytes_per_device"] == r["kv_bytes_per_token_per_device"] * 2 * context
        assert r["bytes_read_per_step"] > 2 * r["kv_bytes_per_device"]  # 2 devices + weights
        assert r["byte_floor_ms"] == r["bytes_read_per_step"] / out["read_bandwidth_Bps"] * 1e3
        assert r["step_ms"] > 0
