"""The core step: one program per step, a pool updated in place, the cache spec, DP capacity."""

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.kv_cache import gather_blocks, scatter_blocks

ENGINE = dict(max_model_len=256, block_size=8, max_num_batched_tokens=64, max_prefill_chunk=32,
              max_num_seqs=8)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model_dir(hf_model_dir):
    return hf_model_dir("llama")[1]


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, **ENGINE)


def run_counting_programs(llm, arrivals, params):
    """Step the engine, adding arrivals[i] at step 3*i; per step: (plan kinds, programs run)."""
    engine, runner = llm.engine, llm.runner
    calls = []
    real_step = runner.step

    def counting_step(inputs):
        calls.append(1)
        return real_step(inputs)

    runner.step = counting_step
    log, done = [], {}
    try:
        for step in range(2000):
            if step % 3 == 0 and step // 3 < len(arrivals):
                engine.add_request(f"r{step // 3}", arrivals[step // 3], params)
            plan_counts = (engine.counters["prefill_steps"], engine.counters["decode_steps"])
            before = len(calls)
            for request in engine.step():
                done[request.request_id] = request.output().outputs[0].token_ids
            mixed = (engine.counters["prefill_steps"] > plan_counts[0]
                     and engine.counters["decode_steps"] > plan_counts[1])
            log.append((mixed, len(calls) - before))
            if len(done) == len(arrivals):
                break
    finally:
        runner.step = real_step
    return log, [done[f"r{i}"] for i in range(len(arrivals))]


def test_a_step_with_prefill_chunks_and_decodes_runs_one_program(llm):
    batch = prompts([7, 70, 12, 40], seed=1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in batch]
    log, together = run_counting_programs(llm, batch, params)
    assert together == alone
    mixed = [programs for is_mixed, programs in log if is_mixed]
    assert len(mixed) >= 2  # the workload does mix prefill chunks with decodes
    assert all(programs == 1 for programs in mixed)
    assert all(programs <= 1 for _, programs in log)


def _temp_bytes(llm, shape):
    runner = llm.runner
    inputs = llm.engine.builder.idle(*shape)
    return runner.compiled_step(inputs).memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def small_and_large_pool(model_dir):
    return [LLM(model_dir, max_model_len=256, block_size=8, kv_blocks=n, max_num_seqs=8)
            for n in (40, 20000)]


@pytest.mark.parametrize("shape", [(1, 0), (8, 0), (0, 32), (8, 32)])
def test_step_updates_the_pool_in_place_whatever_its_size(small_and_large_pool, shape):
    """A per-step copy of the pool shows up as pool-sized temporaries; none may exist, and the
    donated pool's buffer is the one the step returns."""
    small, large = small_and_large_pool
    pool_bytes = large.runner.kv.nbytes()
    temp_small, temp_large = _temp_bytes(small, shape), _temp_bytes(large, shape)
    assert temp_large == temp_small
    assert temp_large < pool_bytes / 20
    before = large.runner.kv.buffers["k"][0].unsafe_buffer_pointer()
    large.runner.step(large.engine.builder.idle(*shape))
    assert large.runner.kv.buffers["k"][0].unsafe_buffer_pointer() == before


def test_cache_spec_sizes_the_pool_and_blocks_round_trip_bitwise(llm):
    spec, kv = llm.cache_spec, llm.runner.kv
    assert set(spec.buffers) == {"k", "v"}
    assert spec.bytes_per_block(kv.block_size) * kv.num_blocks == kv.nbytes()
    llm.generate(prompts([40, 30]), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    src, dst = [1, 2, 3, 4], [20, 21, 22, 23]
    blocks = llm.runner.gather_blocks(src)
    assert {n: a.shape for n, a in blocks.items()} == {
        n: (kv.num_layers, 4, kv.block_size) + spec.buffers[n].shape for n in spec.buffers}
    assert np.abs(blocks["k"]).sum() > 0  # the prompts' KV really is there
    llm.runner.scatter_blocks(dst, blocks)
    moved = llm.runner.gather_blocks(dst)
    for name in spec.buffers:
        np.testing.assert_array_equal(moved[name].view(np.uint8), blocks[name].view(np.uint8))
    with pytest.raises(ValueError, match=r"lack cache buffer\(s\) \['v'\]"):
        scatter_blocks(llm.runner.kv, dst, {"k": blocks["k"]})
    assert set(gather_blocks(llm.runner.kv, [0])) == {"k", "v"}


def max_decoding(llm, batch, params):
    """Most sequences decoding at once (past their prefill, KV for their whole prompt held)."""
    engine, most = llm.engine, 0
    for i, p in enumerate(batch):
        engine.add_request(f"cap{i}", p, params)
    while engine.has_unfinished():
        engine.step()
        most = max(most, sum(not s.in_prefill for s in engine.scheduler.running))
    return most


def test_dp2_holds_twice_the_sequences_of_dp1_in_the_same_per_device_pool(model_dir):
    # Each full-length sequence needs 256 / 8 = 32 blocks; a replica's pool holds 2 of them.
    settings = dict(max_model_len=256, block_size=8, kv_blocks=65, max_num_seqs=8,
                    max_steps_in_flight=1)
    batch = prompts([200] * 8, seed=5)
    params = SamplingParams(temperature=0, max_tokens=56, ignore_eos=True)
    one = LLM(model_dir, mesh="dp=1", rules="dp", **settings)
    two = LLM(model_dir, mesh="dp=2", rules="dp", **settings)
    per_device = [one.runner.kv.buffers["k"][0].addressable_shards[0].data.nbytes,
                  two.runner.kv.buffers["k"][0].addressable_shards[0].data.nbytes]
    assert per_device[0] == per_device[1]
    assert max_decoding(one, batch, params) == 2
    assert max_decoding(two, batch, params) == 4


@pytest.mark.parametrize("mesh,rules", [("dp=2", "dp"), ("dp=2,tp=2", "dp_tp")])
def test_dp_tokens_equal_one_device(model_dir, llm, mesh, rules):
    batch = prompts([5, 17, 40, 64, 90, 33], seed=2)
    params = [SamplingParams(temperature=0, max_tokens=10),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, logprobs=2)] * 3
    want = [o.outputs[0] for o in llm.generate(batch, params, use_tqdm=False)]
    dp = LLM(model_dir, mesh=mesh, rules=rules, max_steps_in_flight=1, **ENGINE)
    got = [o.outputs[0] for o in dp.generate(batch, params, use_tqdm=False)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got[1::2], want[1::2]):
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.keys() == b.keys()
            np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-4)
    # the replicas really share the work
    assert dp.stats()["kv_blocks_total"] == 2 * llm.stats()["kv_blocks_total"]
