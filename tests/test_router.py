"""Routing across DP replicas: the policies on their own, then prefix-aware routing at dp=2."""

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams, flops
from jaxserve.engine.router import (LeastLoaded, PrefixAware, ReplicaView, RoundRobin,
                                    remaining_flops)

GFLOP = 10**9


def views(*replicas):
    """(cached tokens, load in GFLOP[, free slots]) per replica."""
    return [ReplicaView(r, cached, int(load * GFLOP), 100, free[0] if free else 1)
            for r, (cached, load, *free) in enumerate(replicas)]


def test_prefix_aware_takes_the_replica_with_the_longest_prefix():
    policy = PrefixAware(threshold_flops=10 * GFLOP)
    assert policy.choose(views((0, 0), (48, 5), (16, 0))) == 1
    assert policy.choose(views((32, 3), (32, 1))) == 1  # equal prefixes: the lighter one
    assert policy.choose(views((0, 2), (0, 1))) == 1  # no prefix anywhere: the least loaded
    assert policy.choose(views((0, 1), (0, 1))) == 0  # all equal: the lowest id
    # a replica with the prefix but no free slot: the sequence waits for it ...
    assert policy.choose(views((48, 5, 0), (0, 4))) == 0
    # ... but without a prefix anywhere it goes where it can start now
    assert policy.choose(views((0, 1, 0), (0, 4))) == 1


def test_prefix_aware_falls_back_to_the_least_loaded_when_overloaded():
    policy = PrefixAware(threshold_flops=10 * GFLOP, max_ratio=1.5)
    assert policy.choose(views((64, 10), (0, 0))) == 0  # exactly the threshold: keep the prefix
    assert policy.choose(views((64, 10.5), (0, 0))) == 1
    assert policy.choose(views((64, 32), (0, 21), (0, 25))) == 1  # 11 more and 1.52 times
    # a gap past the threshold is not enough while the ratio is small (a busy burst) ...
    assert policy.choose(views((64, 130), (0, 100))) == 0
    # ... nor a large ratio with a small gap (a nearly idle engine)
    assert policy.choose(views((64, 9), (0, 1))) == 0
    assert policy.choose(views((64, 160), (0, 100))) == 1
    assert PrefixAware(0).choose(views((64, 1), (0, 0))) == 1
    with pytest.raises(ValueError, match="threshold_flops must be >= 0, got -1"):
        PrefixAware(-1)
    with pytest.raises(ValueError, match="max_ratio must be >= 1, got 0.5"):
        PrefixAware(0, max_ratio=0.5)


def test_least_loaded_and_round_robin_ignore_caches_and_full_replicas():
    assert LeastLoaded().choose(views((64, 3), (0, 2), (0, 2))) == 1
    assert LeastLoaded().choose(views((0, 1, 0), (0, 2))) == 1
    rr = RoundRobin()
    picks = [rr.choose(views((64, 0), (0, 0), (0, 0))) for _ in range(4)]
    assert picks == [0, 1, 2, 0]
    full_first = views((0, 0, 0), (0, 0), (0, 0))  # replica 0 has no free slot
    assert [rr.choose(full_first) for _ in range(3)] == [1, 2, 1]


def test_remaining_flops_is_the_true_flops_of_the_work_left(hf_model_dir):
    from jaxserve.config import ModelConfig

    config = ModelConfig.load(hf_model_dir("llama")[1] / "config.json")
    # a 100-token prompt with 40 cached, 10 tokens to generate: positions 40..108 run
    assert remaining_flops(config, 40, 100, 10, 0) == flops.chunk_flops(config, 40, 109, 10)
    # half way through decoding: 4 tokens sampled, positions 103..108 left
    assert remaining_flops(config, 103, 100, 10, 4) == flops.chunk_flops(config, 103, 109, 6)
    # longer context costs more for the same number of tokens (attention's quadratic term)
    assert remaining_flops(config, 900, 1000, 1, 0) > remaining_flops(config, 0, 100, 1, 0)


# ---- end to end at dp=2 ----

ENGINE = dict(max_model_len=256, block_size=8, max_num_batched_tokens=64, max_prefill_chunk=32,
              max_num_seqs=8, max_steps_in_flight=1)


@pytest.fixture(scope="module")
def dp2(hf_model_dir):
    return LLM(hf_model_dir("llama")[1], mesh="dp=2", rules="dp",
               routing=PrefixAware(threshold_flops=0), **ENGINE)


def admit(engine, request_id, prompt, max_tokens):
    """Add a request and step until it runs; returns its first sequence."""
    request = engine.add_request(request_id, prompt, SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True))
    seq = request.sequences[0]
    while seq.replica is None:
        engine.step()
    return seq


def finish(engine):
    while engine.has_unfinished():
        engine.step()


def test_a_request_goes_to_the_replica_with_its_prefix_unless_that_one_is_overloaded(dp2):
    engine, router = dp2.engine, dp2.engine.router
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 512, size=48).tolist()
    router.threshold_flops = 10**15  # the prefix decides alone
    home = admit(engine, "first", prefix + [1], 2).replica
    finish(engine)
    # A long request: no prefix anywhere, equal (zero) loads, so the lowest id, home.
    busy = admit(engine, "busy", rng.integers(3, 512, size=100).tolist(), 100)
    assert busy.replica == home == 0
    again = admit(engine, "again", prefix + [2, 3], 2)
    assert again.replica == home and again.request.cached_prompt_tokens == 48
    while engine.requests.get("again"):
        engine.step()
    # Past the threshold the least loaded replica wins, though it lacks the prefix.
    router.threshold_flops = 0
    loads = dp2.stats()["replica_load_flops"]
    assert loads[home] > loads[1 - home] == 0
    moved = admit(engine, "moved", prefix + [4, 5], 2)
    assert moved.replica == 1 - home and moved.request.cached_prompt_tokens == 0
    finish(engine)
    for pool in engine.pools:
        pool.check()


def test_round_robin_alternates_and_misses_the_prefix(hf_model_dir):
    llm = LLM(hf_model_dir("llama")[1], mesh="dp=2", rules="dp", routing="round_robin",
              **ENGINE)
    prefix = np.random.default_rng(1).integers(3, 512, size=48).tolist()
    outs = [llm.generate([prefix + [i]], SamplingParams(temperature=0, max_tokens=2),
                         use_tqdm=False)[0] for i in range(4)]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 48, 48]
    assert llm.stats()["routing"] == "round_robin"
