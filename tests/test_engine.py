"""The engine against HF greedy generate, under continuous batching, preemption and sampling."""

import numpy as np
import pytest
import torch

from jaxserve import LLM, SamplingParams
from jaxserve.runtime import compile_cache
from tests.hf_models import _load, hf_logits

LENGTHS = [5, 17, 40, 64, 90, 120, 150, 200]
ENGINE = dict(max_model_len=256, block_size=8, max_num_batched_tokens=64, max_prefill_chunk=32,
              max_num_seqs=8)


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in lengths]


def hf_greedy(hf_dir, prompt, max_new_tokens):
    model = _load(hf_dir)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0)[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    return out[:out.index(eos) + 1] if eos in out else out


@pytest.fixture(scope="module")
def llama(hf_model_dir):
    return hf_model_dir("llama")


def test_no_compilation_after_warmup_for_any_request_mix(llama):
    _, model_dir = llama
    llm = _shared_llm(model_dir)  # first user of the shared engine: later tests reuse programs
    assert llm.warmup() > 0
    compiled, xla = llm.stats()["compilations"], compile_cache.xla_compiles()
    waited = llm.stats()["steps_waiting_for_compile"]
    rng = np.random.default_rng(3)
    for round_ in range(3):
        n = int(rng.integers(1, 12))
        batch = [rng.integers(3, 512, size=int(rng.integers(1, 200))).tolist() for _ in range(n)]
        params = [SamplingParams(temperature=float(rng.choice([0, 0.8])), top_k=int(rng.integers(0, 5)),
                                 max_tokens=int(rng.integers(1, 40)), logprobs=int(rng.integers(0, 3)),
                                 seed=round_) for _ in batch]
        llm.generate(batch, params, use_tqdm=False)
        llm.generate(batch[:1], params[:1], use_tqdm=False)  # a prefix cache hit: fewer tokens
    assert llm.stats()["compilations"] == compiled
    assert compile_cache.xla_compiles() == xla
    assert llm.stats()["steps_waiting_for_compile"] == waited


@pytest.mark.parametrize("mesh", [None, "tp=2"])
def test_greedy_tokens_match_hf_generate(llama, mesh):
    hf_dir, model_dir = llama
    llm = _shared_llm(model_dir) if mesh is None else LLM(model_dir, mesh=mesh, rules="tp",
                                                           **ENGINE)
    batch = prompts()
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_dir, prompt, 20)
        assert out.outputs[0].finish_reason in ("stop", "length")
        m = out.metrics
        assert 0 <= m.queue_time <= m.ttft <= m.e2e_latency


def test_staggered_arrivals_match_one_at_a_time(llama):
    _, model_dir = llama
    llm = _shared_llm(model_dir)
    batch = prompts([7, 33, 80, 12, 150, 60], seed=1)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in batch]
    engine = llm.engine
    done = {}
    for step in range(1000):
        if step % 3 == 0 and step // 3 < len(batch):  # a new request every third step
            i = step // 3
            engine.add_request(f"s{i}", batch[i], params)
        for request in engine.step():
            done[request.request_id] = request.output().outputs[0].token_ids
        if len(done) == len(batch):
            break
    assert [done[f"s{i}"] for i in range(len(batch))] == alone


def test_small_kv_pool_preempts_and_still_gives_identical_tokens(llama):
    _, model_dir = llama
    batch = prompts([30, 45, 60, 20, 70, 25], seed=2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = _shared_llm(model_dir).generate(batch, params, use_tqdm=False)
    tight = LLM(model_dir, **{**ENGINE, "kv_blocks": 1 + 15})  # 15 blocks = 120 tokens
    outs = tight.generate(batch, params, use_tqdm=False)
    assert tight.stats()["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tight.stats()["kv_blocks_used"] == 0


def test_seeded_request_is_the_same_alone_and_in_a_batch(llama):
    _, model_dir = llama
    llm = _shared_llm(model_dir)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    target = prompts([30], seed=4)[0]
    alone = llm.generate([target], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = prompts([10, 50, 90], seed=5)
    batch = [others[0], target, others[1], others[2]]
    params = [SamplingParams(temperature=0.7, max_tokens=30), seeded,
              SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=1.2)]
    in_batch = llm.generate(batch, params, use_tqdm=False)[1].outputs[0].token_ids
    assert in_batch == alone
    assert llm.generate([target], seeded, use_tqdm=False)[0].outputs[0].token_ids == alone


def test_logprobs_equal_log_softmax_of_reference_logits_and_top_k_holds(llama):
    hf_dir, model_dir = llama
    llm = _shared_llm(model_dir)
    prompt = prompts([25], seed=6)[0]
    out = llm.generate([prompt], SamplingParams(temperature=1.0, top_k=3, logprobs=5, seed=7,
                                                max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ref = torch.log_softmax(torch.tensor(hf_logits(hf_dir, prompt + out.token_ids)), -1).numpy()
    for i, (token, top) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert abs(top[token] - row[token]) < 1e-4
        best5 = np.argsort(-row)[:5]
        assert set(top) >= set(best5.tolist()) and len(top) <= 6
        for t, lp in top.items():
            assert abs(lp - row[t]) < 1e-4
        assert token in np.argsort(-row)[:3]  # top-k=3 never leaves the top 3
    assert abs(out.cumulative_logprob - sum(t[k] for t, k in zip(out.logprobs, out.token_ids))) < 1e-3


def test_max_tokens_and_stop_token_ids_are_honoured(llama):
    _, model_dir = llama
    llm = _shared_llm(model_dir)
    prompt = prompts([20], seed=8)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(free.token_ids) == 30 and free.finish_reason == "length"
    stop_at = free.token_ids[10]
    first = free.token_ids.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == free.token_ids[:first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                min_tokens=first + 2,
                                                stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= first + 2
    assert stop_at not in out.outputs[0].token_ids[:first + 2]


@pytest.mark.parametrize("prompt,named", [
    ([], "prompt 1 is empty"), ([1, 2, 512], "token id 512"), ([1, -1], "token id -1"),
    ([1] * 300, "300 tokens, more than max_model_len 256"), ([1, 2.5], "token id 2.5"),
])
def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(llama, prompt, named):
    _, model_dir = llama
    llm = _shared_llm(model_dir)
    with pytest.raises(ValueError, match=named):
        llm.generate([[5, 6, 7], prompt], SamplingParams(temperature=0, max_tokens=3),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished()
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("params,named", [
    (dict(max_tokens=300), "max_tokens"), (dict(stop_token_ids=[999]), "999"),
])
def test_params_invalid_for_the_model_are_rejected(llama, params, named):
    _, model_dir = llama
    llm = _shared_llm(model_dir)
    with pytest.raises(ValueError, match=named):
        llm.generate([[5, 6, 7]], SamplingParams(**params), use_tqdm=False)
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_n_sequences_per_request_are_returned_together(llama):
    _, model_dir = llama
    llm = _shared_llm(model_dir)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8,
                                                      ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


_LLMS = {}


def _shared_llm(model_dir):
    if model_dir not in _LLMS:
        _LLMS[model_dir] = LLM(model_dir, **ENGINE)
    return _LLMS[model_dir]


def test_stop_strings_end_generation_and_are_trimmed_from_the_text():
    from jaxserve.package_data import embedded_model

    llm = LLM(embedded_model(), max_model_len=256, max_num_seqs=4)
    params = dict(temperature=0, max_tokens=40, ignore_eos=True)
    free = llm.generate(["def main("], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    assert len(free.text) > 20
    stop = free.text[8:11]  # a string that first appears somewhere after the start
    first = free.text.find(stop)
    out = llm.generate(["def main("], SamplingParams(**params, stop=[stop, "\x00never"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == free.text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) < len(free.token_ids)


def test_kv_pool_settings_are_validated(llama):
    _, model_dir = llama
    with pytest.raises(ValueError, match="kv_blocks must be an integer >= 2, got 1"):
        LLM(model_dir, kv_blocks=1)
    with pytest.raises(ValueError, match="less than one sequence of max_model_len 256 needs"):
        LLM(model_dir, kv_memory_fraction=1e-9, max_model_len=256)
    with pytest.raises(ValueError, match="kv_memory_fraction must be in \\(0, 1\\), got 1.5"):
        LLM(model_dir, kv_memory_fraction=1.5)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer, got 0"):
        LLM(model_dir, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least 16 .*got 8"):
        LLM(model_dir, max_num_batched_tokens=8)


def test_default_pool_follows_memory_and_lowers_max_model_len_to_fit(llama):
    """No KV settings: room for max_num_seqs full sequences unless memory says less; then
    max_model_len (when the user left it open) shrinks to what the pool holds."""
    from jaxserve.engine import sizing

    _, model_dir = llama
    llm = LLM(model_dir, max_num_seqs=4, block_size=8)
    limit = llm.config.max_position_embeddings
    assert llm.max_model_len == limit
    assert llm.stats()["kv_blocks_total"] == 4 * limit // 8  # 1 + 4 full sequences, minus null
    per_block = sizing.bytes_per_block_per_device(llm.cache_spec, 8, llm.layout)
    budget = sizing.kv_budget_bytes(llm.layout, None)
    blocks, max_len = sizing.pool_blocks(int(per_block * 11), per_block, 8, 4, limit, False)
    assert (blocks, max_len) == (11, 80)  # a 10-block pool serves 80 tokens
    assert budget > 0
