"""The prefix cache: outputs equal to computing every prompt in full, hits counted exactly, no
block shared across continuations, eviction without leaks, n > 1 prefilling its prompt once."""

import dataclasses

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

ENGINE = dict(max_model_len=256, block_size=8, max_num_batched_tokens=64, max_prefill_chunk=32,
              max_num_seqs=8)
BS = ENGINE["block_size"]

PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=11, repetition_penalty=1.5, presence_penalty=0.7,
                   frequency_penalty=0.6, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=12, min_tokens=4),
    SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=5, n=4, repetition_penalty=1.3, max_tokens=10,
                   ignore_eos=True, logprobs=1),
]


def tokens(rng, n):
    return rng.integers(3, 512, size=n).tolist()


def waves(seed=0):
    """Two waves of prompts over two shared prefixes (40 tokens: 5 full blocks; 27: 3 full and
    a partial one); the second wave repeats prompts of the first and extends others."""
    rng = np.random.default_rng(seed)
    prefixes = [tokens(rng, 40), tokens(rng, 27)]
    first = [prefixes[i % 2] + tokens(rng, int(rng.integers(1, 20))) for i in range(6)]
    second = [first[0], first[3], first[4] + tokens(rng, 9), prefixes[1][:20] + tokens(rng, 12),
              prefixes[0] + tokens(rng, 2), first[5]]
    return first, second


def run_waves(llm, seed=0):
    """Every completion of both waves, in order, with the engine's stats after them."""
    out = []
    for wave in waves(seed):
        params = [PARAMS[i % len(PARAMS)] for i in range(len(wave))]
        for request in llm.generate(wave, params, use_tqdm=False):
            out += request.outputs
    return out, llm.stats()


def assert_same_outputs(got, want):
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        assert (g.logprobs is None) == (w.logprobs is None)
        for a, b in zip(g.logprobs or [], w.logprobs or []):
            assert a.keys() == b.keys()
            np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-4)


@pytest.fixture(scope="module")
def model_dir(hf_model_dir):
    return hf_model_dir("llama")[1]


@pytest.fixture(scope="module")
def cached(model_dir):
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def uncached(model_dir):
    return LLM(model_dir, enable_prefix_caching=False, **ENGINE)


def check_pools(llm):
    """No block lost: every block free, cached or held; none held once the engine is idle."""
    for pool in llm.engine.pools:
        pool.check()
    if not llm.engine.has_unfinished():
        assert llm.stats()["kv_blocks_used"] == 0


def test_outputs_equal_with_and_without_prefix_caching(cached, uncached):
    want, off = run_waves(uncached)
    got, on = run_waves(cached)
    assert_same_outputs(got, want)
    assert off["prefix_cache_hits"] == 0 and on["prefix_cache_hits"] > 0
    assert on["prefill_tokens"] < off["prefill_tokens"]
    check_pools(cached)
    check_pools(uncached)


def test_outputs_equal_with_and_without_prefix_caching_under_preemption(model_dir, uncached):
    settings = {**ENGINE, "kv_blocks": 1 + 20}  # 160 tokens: a few sequences at a time
    runs = [run_waves(LLM(model_dir, enable_prefix_caching=caching, **settings), seed=1)
            for caching in (False, True)]
    (want, off), (got, on) = runs
    assert off["preemptions"] > 0 and on["preemptions"] > 0
    assert on["prefix_cache_hits"] > 0
    assert_same_outputs(got, want)
    assert_same_outputs(want, run_waves(uncached, seed=1)[0])  # preemption changes nothing


def test_outputs_equal_with_and_without_prefix_caching_on_dp2_tp2(model_dir, uncached):
    want, _ = run_waves(uncached, seed=2)
    llm = LLM(model_dir, mesh="dp=2,tp=2", rules="dp_tp", max_steps_in_flight=1, **ENGINE)
    got, on = run_waves(llm, seed=2)
    assert on["prefix_cache_hits"] > 0
    assert_same_outputs(got, want)
    check_pools(llm)


def test_hits_are_counted_in_whole_blocks(cached):
    rng = np.random.default_rng(10)
    shared = tokens(rng, 3 * BS)
    first, second = shared + tokens(rng, 5), shared + tokens(rng, 6)
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert cached.generate([first], greedy, use_tqdm=False)[0].num_cached_tokens == 0
    before = cached.stats()
    out = cached.generate([second], greedy, use_tqdm=False)[0]
    after = cached.stats()
    assert out.num_cached_tokens == 3 * BS
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 3 * BS
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(second)
    assert after["prefill_tokens"] - before["prefill_tokens"] == len(second) - 3 * BS
    # the same prompt again: every block but the last is a hit (its last token must run)
    again = cached.generate([second], greedy, use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(second) - 1) // BS * BS
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_a_partly_filled_block_is_never_shared(cached):
    rng = np.random.default_rng(11)
    prompt = tokens(rng, 2 * BS + 4)  # two full blocks and half of a third
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def hit(ids):
        return cached.generate([ids], SamplingParams(temperature=0, max_tokens=1),
                               use_tqdm=False)[0].num_cached_tokens

    cached.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert hit(prompt + tokens(rng, 9)) == 2 * BS  # the third block was partly filled
    generated = cached.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    # Its generation filled the third block: the same tokens hit it, other ones do not.
    assert hit(prompt + generated[:4] + tokens(rng, 3)) == 3 * BS
    other = [t + 1 if t < 511 else 3 for t in generated[:4]]
    assert hit(prompt + other + tokens(rng, 3)) == 2 * BS
    check_pools(cached)


def test_slot_state_comes_from_the_prompt_ids_after_a_hit(cached):
    rng = np.random.default_rng(12)
    shared = tokens(rng, 4 * BS)
    cached.generate([shared + [7]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    engine = cached.engine
    prompt = shared + tokens(rng, 5)
    request = engine.add_request("penalised", prompt, SamplingParams(
        temperature=0, repetition_penalty=1.5, max_tokens=4, ignore_eos=True))
    engine.step()
    seq = request.sequences[0]
    assert request.cached_prompt_tokens == 4 * BS and seq.slot is not None
    mask = np.asarray(cached.runner.read_slot(seq.slot)["prompt_mask"])
    np.testing.assert_array_equal(np.flatnonzero(mask), sorted(set(prompt)))
    while engine.has_unfinished():
        engine.step()


def reference_penalised_greedy(llm, prompt, n, repetition, presence, frequency):
    """Greedy tokens under vLLM's penalties, from full-sequence logits of each prefix."""
    out = []
    for _ in range(n):
        logits = llm.logits([prompt + out])[0][-1].astype(np.float64)
        counts = np.bincount(out, minlength=len(logits))
        seen = counts > 0
        seen[prompt] = True
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition),
                          logits)
        out.append(int(np.argmax(logits - frequency * counts - presence * (counts > 0))))
    return out


def test_penalties_after_a_cache_hit_match_a_reference(cached):
    rng = np.random.default_rng(17)
    shared = tokens(rng, 5 * BS)
    prompt = shared + tokens(rng, 6)
    penalties = dict(repetition=1.6, presence=0.8, frequency=0.5)
    want = reference_penalised_greedy(cached, prompt, 8, **penalties)
    cached.generate([shared + [5]], SamplingParams(max_tokens=1), use_tqdm=False)
    out = cached.generate([prompt], SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.6,
        presence_penalty=0.8, frequency_penalty=0.5), use_tqdm=False)[0]
    assert out.num_cached_tokens == 5 * BS
    assert out.outputs[0].token_ids == want


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("prompt_len,max_tokens", [(37, 8), (32, 8), (37, 1)])
def test_n4_runs_the_prompt_through_the_model_once(cached, uncached, caching, prompt_len,
                                                   max_tokens):
    llm = cached if caching else uncached
    engine = llm.engine
    prompt = tokens(np.random.default_rng(prompt_len + max_tokens), prompt_len)
    before = llm.stats()
    params = SamplingParams(n=4, temperature=1.0, seed=3, repetition_penalty=1.3,
                            max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    request = engine.add_request(f"n4-{caching}-{prompt_len}-{max_tokens}", prompt, params)
    seqs = request.sequences
    while not all(s.num_scheduled_outputs for s in seqs):
        engine.step()
    full = prompt_len // BS
    assert len({tuple(s.blocks[:full]) for s in seqs}) == 1  # the full blocks are shared
    if prompt_len % BS and max_tokens > 1:  # each has its own copy of the partly filled one
        assert len({s.blocks[full] for s in seqs}) == 4
    while engine.has_unfinished():
        engine.step()
    after = llm.stats()
    assert after["prefill_tokens"] - before["prefill_tokens"] == prompt_len
    assert after["forked_sequences"] - before["forked_sequences"] == 3
    outs = request.output().outputs
    assert all(len(o.token_ids) == max_tokens for o in outs)
    if max_tokens > 1:
        assert len({tuple(o.token_ids) for o in outs}) > 1
    # Sibling i is what a request of its own with seed 3 + i gives.
    alone = llm.generate([prompt] * 4, [dataclasses.replace(params, n=1, seed=3 + i)
                                        for i in range(4)], use_tqdm=False)
    assert_same_outputs(outs, [a.outputs[0] for a in alone])
    check_pools(llm)


def test_siblings_past_the_free_rows_wait_and_take_the_cached_prompt(cached, uncached):
    prompt = tokens(np.random.default_rng(13), 29)
    params = SamplingParams(n=12, temperature=1.0, seed=9, max_tokens=6, ignore_eos=True)
    before = cached.stats()
    got = cached.generate([prompt], params, use_tqdm=False)[0]
    after = cached.stats()
    forked = after["forked_sequences"] - before["forked_sequences"]
    assert 0 < forked < 11  # max_prefill_rows (8) rows: some siblings were admitted later
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == (11 - forked) * 3 * BS
    want = uncached.generate([prompt], params, use_tqdm=False)[0]
    assert_same_outputs(got.outputs, want.outputs)
    check_pools(cached)


def test_a_small_pool_serves_a_long_stream_of_distinct_prompts_without_leaking(model_dir):
    llm = LLM(model_dir, **{**ENGINE, "kv_blocks": 1 + 24})  # 192 tokens
    rng = np.random.default_rng(14)
    prefixes = [tokens(rng, n) for n in (16, 24, 33)]
    prompts = [(prefixes[i % 3] if i % 2 else []) + tokens(rng, int(rng.integers(5, 60)))
               for i in range(60)]
    max_tokens = [int(rng.integers(1, 20)) for _ in prompts]
    for start in range(0, len(prompts), 12):
        outs = llm.generate(prompts[start:start + 12],
                            [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                             for m in max_tokens[start:start + 12]], use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens[start:start + 12]
        check_pools(llm)
    stats = llm.stats()
    assert sum(p.num_evictions for p in llm.engine.pools) > 0
    assert stats["prefix_cache_hits"] > 0
    assert stats["kv_blocks_used"] == 0 and 0 < stats["kv_blocks_cached"] <= 24


def test_abort_releases_shared_blocks(cached):
    engine = cached.engine
    rng = np.random.default_rng(15)
    shared = tokens(rng, 3 * BS + 2)
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=50, ignore_eos=True)
    engine.add_request("shared-a", shared, params)
    engine.add_request("shared-b", shared + tokens(rng, 7), SamplingParams(max_tokens=50))
    for _ in range(6):
        engine.step()
    assert engine.kv_blocks_used > 0
    engine.abort("shared-a")
    engine.abort("shared-b")
    engine.drain()
    check_pools(cached)
    out = cached.generate([shared + [9]], SamplingParams(temperature=0, max_tokens=2),
                          use_tqdm=False)[0]
    assert out.num_cached_tokens == 3 * BS


def test_logits_pass_forgets_the_cache(cached):
    rng = np.random.default_rng(16)
    prompt = tokens(rng, 3 * BS + 1)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = cached.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    cached.logits([tokens(rng, 200)])  # writes the pool's first blocks directly
    assert cached.stats()["kv_blocks_cached"] == 0
    out = cached.generate([prompt], greedy, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == want


def test_block_copies_update_the_pool_in_place(model_dir):
    llm = LLM(model_dir, **{**ENGINE, "kv_blocks": 20000})
    runner = llm.runner
    pairs = np.zeros((1, 8, 2), np.int32)  # max_prefill_rows copies per replica
    pairs[0, 0] = 3, 7
    temp = runner._aux_executable("copy_blocks", pairs).memory_analysis()
    assert temp.temp_size_in_bytes < runner.kv.nbytes() / 20
    blocks = {name: np.random.default_rng(0).standard_normal(a.shape).astype(a.dtype)
              for name, a in runner.gather_blocks([3]).items()}
    runner.scatter_blocks([3], blocks)
    before = runner.kv.buffers["k"][0].unsafe_buffer_pointer()
    runner.copy_blocks(pairs)
    assert runner.kv.buffers["k"][0].unsafe_buffer_pointer() == before
    copied = runner.gather_blocks([7])
    for name in blocks:
        np.testing.assert_array_equal(copied[name], blocks[name])


@pytest.mark.parametrize("kwargs,error", [
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching must be True or False, got 'yes'"),
    (dict(routing="nearest"), "routing must be one of .* got 'nearest'"),
    (dict(routing=42), "routing must be one of .* got int"),
])
def test_prefix_cache_settings_are_validated(model_dir, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        LLM(model_dir, **ENGINE, **kwargs)


# ---- scoring (prefill-only) through the same cache ----

def score_workload(seed, n=12):
    """Score jobs over two shared system prompts (24 and 43 tokens), suffixes of 1..12 ids."""
    rng = np.random.default_rng(seed)
    systems = [tokens(rng, 24), tokens(rng, 43)]
    prompts = [systems[i % 2] + tokens(rng, int(rng.integers(1, 13))) for i in range(n)]
    return prompts, [[5, 6, 7], tokens(rng, 11), [9]]


def assert_same_scores(got, want):
    for g, w in zip(got, want, strict=True):
        assert [t.token_id for t in g.top] == [t.token_id for t in w.top]
        for a, b in zip(g.candidates, w.candidates, strict=True):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)


def test_scores_equal_with_and_without_prefix_caching(cached, uncached):
    prompts, candidates = score_workload(30)
    want = uncached.score(prompts, candidates, top_n=2)
    off = uncached.stats()
    assert off.get("score_prefix_cache_hits", 0) == 0 and off["kv_blocks_cached"] == 0
    before = cached.stats()
    got = cached.score(prompts, candidates, top_n=2)
    again = cached.score(prompts[:4], candidates, top_n=2)
    after = cached.stats()
    assert_same_scores(got, want)
    assert_same_scores(again, want[:4])
    hits = after["score_prefix_cache_hits"] - before["score_prefix_cache_hits"]
    # first call: every job but the first of each system prompt hits it in whole blocks
    # (24 and 40 tokens); the second call hits every prefix of the first
    assert hits == 5 * 24 + 5 * 40 + sum((len(p) - 1) // BS * BS for p in prompts[:4])
    check_pools(cached)
    check_pools(uncached)


def test_scoring_under_a_small_pool_evicts_and_leaks_no_block(model_dir, uncached):
    llm = LLM(model_dir, **{**ENGINE, "kv_blocks": 1 + 12})  # 96 tokens: a few jobs at a time
    for seed in (31, 32, 33):
        prompts, candidates = score_workload(seed, n=8)
        assert_same_scores(llm.score(prompts, candidates, top_n=1),
                           uncached.score(prompts, candidates, top_n=1))
        check_pools(llm)
    stats = llm.stats()
    assert sum(p.num_evictions for p in llm.engine.pools) > 0
    assert stats["score_prefix_cache_hits"] > 0
    assert stats["kv_blocks_used"] == 0 and 0 < stats["kv_blocks_cached"] <= 12
