"""Scoring (`LLM.score`, `jaxserve score`, the Score RPC): HF log-softmax is the oracle.

A candidate's token j scores log_softmax(HF logits of prompt + candidate)[len(prompt) - 1 + j]
at candidate[j]; top_n is HF's top-k of the log-softmax after the prompt.
"""

import json
import re

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from tests.hf_models import hf_logits

# prompts around the block size (4): one token, a whole number of blocks, a shared prefix of
# several blocks; candidates of 1, 3, 2 and 20 tokens (crossing blocks) in one call
PROMPTS = [[1, 5, 9, 200, 3, 77, 400, 12, 8, 8, 8, 31], [7], [2, 4, 6, 8], list(range(2, 30))]
CANDIDATES = [[5], [7, 8, 9], [100, 3], list(range(300, 320))]
SMALL = dict(dtype="float32", block_size=4, max_model_len=128)


def hf_log_softmax(hf_dir, token_ids) -> np.ndarray:
    logits = hf_logits(hf_dir, token_ids).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)), np.abs(logits).max()


def assert_scores_match_hf(hf_dir, prompts, candidates, outputs, top_n):
    for prompt, out in zip(prompts, outputs):
        assert out.prompt_token_ids == prompt
        for candidate, scored in zip(candidates, out.candidates):
            ref, scale = hf_log_softmax(hf_dir, prompt + candidate)
            want = [ref[len(prompt) - 1 + j, t] for j, t in enumerate(candidate)]
            assert scored.token_ids == candidate
            np.testing.assert_allclose(scored.token_logprobs, want, rtol=0, atol=1e-4 * scale)
            assert scored.logprob == pytest.approx(sum(scored.token_logprobs))
        ref, scale = hf_log_softmax(hf_dir, prompt)
        top = np.argsort(-ref[-1])[:top_n]
        assert [t.token_id for t in out.top] == top.tolist()
        np.testing.assert_allclose([t.logprob for t in out.top], ref[-1, top], rtol=0,
                                   atol=1e-4 * scale)


@pytest.fixture(scope="module")
def llama(hf_model_dir):
    hf_dir, model_dir = hf_model_dir("llama")
    return hf_dir, LLM(model_dir, **SMALL)


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "mixtral"])
def test_score_is_hf_log_softmax_for_candidates_of_different_lengths(hf_model_dir, family):
    hf_dir, model_dir = hf_model_dir(family)
    llm = LLM(model_dir, **SMALL)
    outputs = llm.score(PROMPTS, CANDIDATES, top_n=5)
    assert [len(o.candidates) for o in outputs] == [len(CANDIDATES)] * len(PROMPTS)
    assert_scores_match_hf(hf_dir, PROMPTS, CANDIDATES, outputs, top_n=5)
    assert llm.engine.kv_blocks_used == 0


def test_long_inputs_split_over_steps_and_a_small_pool(hf_model_dir):
    """A step budget of 16 tokens and a pool of 13 blocks (the longest prompt + candidate needs
    12): pieces wait for blocks and for steps, and the scores do not change."""
    hf_dir, model_dir = hf_model_dir("llama")
    llm = LLM(model_dir, **{**SMALL, "max_model_len": 48}, kv_blocks=14,
              max_num_batched_tokens=16, max_prefill_chunk=16)
    steps = []
    score = llm.runner.score
    llm.runner.score = lambda inputs: steps.append(inputs) or score(inputs)
    outputs = llm.score(PROMPTS, CANDIDATES, top_n=3)
    assert len(steps) > 2 * len(PROMPTS)
    assert max(len(i.tokens) for i in steps) == 16
    assert_scores_match_hf(hf_dir, PROMPTS, CANDIDATES, outputs, top_n=3)
    assert llm.engine.kv_blocks_used == 0


@pytest.mark.parametrize("mesh,rules", [("tp=2", "tp"), ("dp=2", "dp")])
def test_a_mesh_scores_like_one_device(hf_model_dir, llama, mesh, rules):
    _, one = llama
    _, model_dir = hf_model_dir("llama")
    meshed = LLM(model_dir, mesh=mesh, rules=rules, **SMALL)
    for ours, ref in zip(meshed.score(PROMPTS, CANDIDATES, top_n=4),
                         one.score(PROMPTS, CANDIDATES, top_n=4)):
        for a, b in zip(ours.candidates, ref.candidates):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)
        assert [t.token_id for t in ours.top] == [t.token_id for t in ref.top]
    assert meshed.engine.kv_blocks_used == 0


@pytest.mark.parametrize("moe_strategy", ["alltoall", "allgather"])
def test_an_expert_parallel_mesh_scores_like_hf(hf_model_dir, moe_strategy):
    hf_dir, model_dir = hf_model_dir("qwen3_moe")
    llm = LLM(model_dir, mesh="ep=2", rules="ep", moe_strategy=moe_strategy, **SMALL)
    outputs = llm.score(PROMPTS, CANDIDATES, top_n=3)
    assert_scores_match_hf(hf_dir, PROMPTS, CANDIDATES, outputs, top_n=3)


def test_candidates_per_prompt_and_top_n_alone(llama):
    hf_dir, llm = llama
    per_prompt = [[[5], [9, 9]], [], [[100, 3, 4]], [[1]]]
    outputs = llm.score(PROMPTS, per_prompt, top_n=2)
    for prompt, candidates, out in zip(PROMPTS, per_prompt, outputs):
        assert_scores_match_hf(hf_dir, [prompt], candidates, [out], top_n=2)
        assert [c.token_ids for c in out.candidates] == candidates
    top_only = llm.score([PROMPTS[0]], top_n=3)[0]
    assert top_only.candidates == [] and len(top_only.top) == 3
    assert [t.token_id for t in top_only.top[:2]] == [t.token_id for t in outputs[0].top]


def test_scoring_keeps_no_kv_and_generation_is_unchanged(llama):
    _, llm = llama
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    stream = llm.score_stream(PROMPTS, CANDIDATES)
    next(stream)
    stream.close()  # abandoned half-way: its blocks come back too
    assert llm.engine.kv_blocks_used == 0
    llm.score(PROMPTS, CANDIDATES, top_n=1)
    assert llm.engine.kv_blocks_used == 0
    after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert after == before


def test_score_refuses_while_requests_run(llama):
    _, llm = llama
    llm.engine.add_request("running", [4, 5], SamplingParams(max_tokens=4))
    try:
        with pytest.raises(RuntimeError, match="1 requests are running"):
            llm.score([[1, 2]], [[3]])
    finally:
        llm.engine.abort("running")
    assert llm.engine.kv_blocks_used == 0


# ---- the prefix cache: scoring looks up and leaves its full blocks cached ----

BS = SMALL["block_size"]
SCORE_COUNTERS = ("score_prefix_cache_queries", "score_prefix_cache_hits", "score_prefill_tokens")


def random_ids(rng, n):
    return rng.integers(3, 512, size=n).tolist()


def counted(llm, run):
    """run()'s result and how much it moved the scoring counters."""
    before = llm.stats()
    result = run()
    after = llm.stats()
    return result, {k.split("_")[-1]: after.get(k, 0) - before.get(k, 0) for k in SCORE_COUNTERS}


def branch_tokens(prompt, candidates):
    """Tokens a job's branches compute: the prompt after its prefix, each candidate but its last."""
    b = (len(prompt) - 1) // BS * BS
    return sum(len(prompt) - b + len(c) - 1 for c in candidates)


def assert_pools_clean(llm):
    for pool in llm.engine.pools:
        pool.check()
    assert llm.engine.kv_blocks_used == 0


def test_a_second_score_of_a_prompt_computes_only_its_branches(llama):
    hf_dir, llm = llama
    prompt = random_ids(np.random.default_rng(20), 23)  # prefix: 5 blocks (20 tokens)
    candidates = [[5], [7, 8, 9, 10, 11, 12], [100, 3]]
    first, one = counted(llm, lambda: llm.score([prompt], candidates, top_n=3))
    second, two = counted(llm, lambda: llm.score([prompt], candidates, top_n=3))
    assert one == dict(queries=23, hits=0, tokens=20 + branch_tokens(prompt, candidates))
    assert two == dict(queries=23, hits=20, tokens=branch_tokens(prompt, candidates))
    assert_scores_match_hf(hf_dir, [prompt], candidates, second, top_n=3)
    for a, b in zip(first[0].candidates, second[0].candidates):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-6)
    assert [t.token_id for t in first[0].top] == [t.token_id for t in second[0].top]
    assert_pools_clean(llm)


def test_jobs_of_one_call_sharing_a_prefix_compute_it_once(llama):
    hf_dir, llm = llama
    rng = np.random.default_rng(21)
    system = random_ids(rng, 4 * BS)
    prompts = [system + random_ids(rng, 3) for _ in range(4)]  # each prefix: the system prompt
    outputs, moved = counted(llm, lambda: llm.score(prompts, CANDIDATES[:2]))
    assert moved["hits"] == 3 * 4 * BS
    assert moved["tokens"] == 4 * BS + sum(branch_tokens(p, CANDIDATES[:2]) for p in prompts)
    assert_scores_match_hf(hf_dir, prompts, CANDIDATES[:2], outputs, top_n=0)
    assert_pools_clean(llm)


def test_scoring_and_generation_hit_each_others_blocks(llama):
    hf_dir, llm = llama
    rng = np.random.default_rng(22)
    prompt = random_ids(rng, 26)  # generation names 6 full blocks; the score prefix needs 6
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([prompt], greedy, use_tqdm=False)
    outputs, moved = counted(llm, lambda: llm.score([prompt], CANDIDATES, top_n=2))
    assert moved["hits"] == 24
    assert_scores_match_hf(hf_dir, [prompt], CANDIDATES, outputs, top_n=2)
    # the branch of candidate 1 computed positions 24..30: its full block 24..27 is cached
    extended = prompt + CANDIDATES[1]
    out = llm.generate([extended], greedy, use_tqdm=False)[0]
    assert out.num_cached_tokens == 28
    ref = np.argmax(hf_log_softmax(hf_dir, extended + out.outputs[0].token_ids[:-1])[0], -1)
    assert out.outputs[0].token_ids == ref[len(extended) - 1:].tolist()
    assert_pools_clean(llm)


def test_dp2_routes_score_jobs_to_the_replica_holding_their_prefix(hf_model_dir):
    from jaxserve.engine.scoring import ScoreRun

    hf_dir, model_dir = hf_model_dir("llama")
    llm = LLM(model_dir, mesh="dp=2", rules="dp", **SMALL)
    rng = np.random.default_rng(23)
    a, b, c = (random_ids(rng, 4 * BS) for _ in range(3))

    def run(prompts):
        jobs = [llm.prepare_score(p, CANDIDATES[:2], 1) for p in prompts]
        scoring = ScoreRun(llm.engine, jobs)
        try:
            while not scoring.done:
                assert scoring.step() is not None
        finally:
            scoring.release()
        return scoring.replica_of, [llm.score_output(j, s) for j, s in zip(jobs, scoring.scores)]

    # Within a run: same-prefix jobs gather where the first of them went (least-loaded routing
    # would alternate them).
    prompts = [p + random_ids(rng, 2) for p in (a, a, b, b, a, a, b, b)]
    (replicas, outputs), moved = counted(llm, lambda: run(prompts))
    assert replicas == [0, 0, 1, 1, 0, 0, 1, 1]
    assert moved["hits"] == 6 * 4 * BS
    assert_scores_match_hf(hf_dir, prompts, CANDIDATES[:2], outputs, top_n=1)
    # Across runs: the replica holding the prefix from an earlier call takes its jobs.
    (replicas, _), _ = counted(llm, lambda: run([b + [7], c + [7]]))
    assert replicas == [1, 0]
    prompts = [c + random_ids(rng, 3), c + random_ids(rng, 1)]
    (replicas, outputs), moved = counted(llm, lambda: run(prompts))
    assert replicas == [0, 0] and moved["hits"] == 2 * 4 * BS
    assert_scores_match_hf(hf_dir, prompts, CANDIDATES[:2], outputs, top_n=1)
    assert_pools_clean(llm)


@pytest.mark.parametrize("prompts,candidates,top_n,message", [
    ([[1, 2]], [[3], []], 0, "candidate 1 is empty"),
    ([[1, 2]], [[3], [4, 512]], 0, r"candidate 1: token id 512 at index 1 is not in \[0, 512\)"),
    ([[1, 2]], [[-1]], 0, "candidate 0: token id -1"),
    ([[1, 2], [3]], [[[1]], [[2], [5, 999]]], 0, "prompt 1 candidate 1: token id 999"),
    ([[1, 2]], None, 0, "prompt 0: nothing to score"),
    ([[1, 2]], [], 0, "nothing to score"),
    ([[1, 2]], [[3]], -1, r"top_n must be an integer in \[0, 20\], got -1"),
    ([[1, 2]], [[3]], 21, r"top_n must be an integer in \[0, 20\], got 21"),
    ([[1, 2]], [[3]], 2.0, "top_n must be an integer"),
    ([list(range(1, 120))], [[3] * 10], 0, r"prompt 0 \(119 tokens\) \+ candidate 0 \(10 "
                                           r"tokens\) is more than max_model_len \(128\)"),
    ([[]], [[3]], 0, "prompt 0 is empty"),
    ([[1, 2]], ["text"], 0, "candidate 0 is text but the model has no tokenizer"),
    ([[1, 2]], "text", 0, "candidates must be a list"),
])
def test_bad_input_is_rejected_by_name(llama, prompts, candidates, top_n, message):
    _, llm = llama
    with pytest.raises((ValueError, TypeError), match=message):
        llm.score(prompts, candidates, top_n=top_n)
    assert llm.engine.kv_blocks_used == 0


# ---- the Score RPC, on a real server over 127.0.0.1 ----

TEXT_PROMPT = "def f(x):"
TEXT_CANDIDATES = ["\n    return x", " pass", [5, 6, 7]]


@pytest.fixture(scope="module")
def served(hf_model_dir, tmp_path_factory):
    """A Server over a Llama with a tokenizer; offline scores computed before it takes the
    engine."""
    import types

    from jaxserve.serving.client import Client
    from jaxserve.serving.server import Server
    from tests.serving_helpers import make_model_dir

    model_dir = make_model_dir(hf_model_dir("llama")[1],
                               tmp_path_factory.mktemp("score") / "model")
    llm = LLM(model_dir, max_model_len=128, block_size=8, max_num_batched_tokens=64,
              max_prefill_chunk=32, max_num_seqs=8)
    offline = {"text": llm.score(TEXT_PROMPT, TEXT_CANDIDATES, top_n=5)[0],
               "ids": [llm.score(p, CANDIDATES, top_n=3)[0] for p in PROMPTS]}
    server = Server("127.0.0.1", 0, metrics_port=None, max_queue=16).start()
    server.attach(llm)
    client = Client(f"127.0.0.1:{server.port}")
    yield types.SimpleNamespace(server=server, llm=llm, client=client, offline=offline,
                                model_dir=model_dir)
    client.close()
    server.drain(0)
    server.stop()


def assert_same_scores(response, offline):
    """The RPC carries llm.score's numbers: float32 per token, the sum as a double."""
    assert list(response.prompt_token_ids) == offline.prompt_token_ids
    assert len(response.candidates) == len(offline.candidates)
    for got, want in zip(response.candidates, offline.candidates):
        assert list(got.token_ids) == want.token_ids
        np.testing.assert_allclose(got.token_logprobs, want.token_logprobs, rtol=1e-6)
        assert got.logprob == pytest.approx(want.logprob, rel=1e-6)
    assert [t.token_id for t in response.top] == [t.token_id for t in offline.top]
    np.testing.assert_allclose([t.logprob for t in response.top],
                               [t.logprob for t in offline.top], rtol=1e-6)


def test_text_candidates_are_encoded_without_special_tokens(served):
    out, tokenizer = served.offline["text"], served.llm.tokenizer
    assert out.prompt == TEXT_PROMPT and out.prompt_token_ids == tokenizer.encode(TEXT_PROMPT)
    assert out.candidates[0].token_ids == tokenizer.encode(TEXT_CANDIDATES[0], add_bos=False)
    assert [c.text for c in out.candidates] == TEXT_CANDIDATES[:2] + [None]
    assert [t.text for t in out.top] == [tokenizer.decode([t.token_id], skip_special_tokens=False)
                                         for t in out.top]


def test_score_rpc_returns_llm_score_numbers(served):
    assert_same_scores(served.client.score(TEXT_PROMPT, TEXT_CANDIDATES, top_n=5, timeout=30),
                       served.offline["text"])
    for prompt, offline in zip(PROMPTS, served.offline["ids"]):
        response = served.client.score(prompt, CANDIDATES, top_n=3, timeout=30)
        assert response.request_id.startswith("score-")
        assert_same_scores(response, offline)
    assert served.llm.engine.kv_blocks_used == 0


def test_score_rpc_beside_running_generation(served):
    """Scoring steps interleave with generation steps and share the pool: same numbers."""
    from tests.serving_helpers import wait_until

    params = dict(temperature=0, max_tokens=40, ignore_eos=True)
    streams = [served.client.generate(p, **params) for p in PROMPTS]
    for stream in streams:
        next(stream)
    for prompt, offline in zip(PROMPTS, served.offline["ids"]):
        assert_same_scores(served.client.score(prompt, CANDIDATES, top_n=3, timeout=30), offline)
    for stream in streams:
        assert list(stream)[-1].final.finish_reason == "length"
    wait_until(lambda: served.llm.engine.kv_blocks_used == 0, 10, "every KV block to be free")


def test_score_rpc_deadline_aborts_the_run_and_frees_its_blocks(served):
    import grpc

    from tests.serving_helpers import wait_until

    served.server.step_delay = 0.2  # each scoring step then takes at least 0.2 s
    try:
        with pytest.raises(grpc.RpcError) as info:
            served.client.score(list(range(1, 60)), [[i] * 8 for i in range(1, 60)], timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: served.llm.engine.kv_blocks_used == 0, 10, "every KV block to be free")
    finally:
        served.server.step_delay = 0.0
    assert served.client.health() == "SERVING"


def test_abort_rpc_stops_a_score_with_aborted(served):
    import threading

    import grpc

    from tests.serving_helpers import wait_until

    errors = []

    def score():
        try:
            served.client.score(list(range(1, 60)), [[i] * 8 for i in range(1, 60)],
                                request_id="long-score", timeout=30)
        except grpc.RpcError as e:
            errors.append(e)

    served.server.step_delay = 0.2
    try:
        thread = threading.Thread(target=score)
        thread.start()
        wait_until(lambda: served.llm.engine.kv_blocks_used > 0, 10, "the run to hold blocks")
        served.client.abort("long-score")
        thread.join(10)
    finally:
        served.server.step_delay = 0.0
    assert errors[0].code() == grpc.StatusCode.ABORTED
    assert "'long-score' was aborted" in errors[0].details()
    wait_until(lambda: served.llm.engine.kv_blocks_used == 0, 10, "every KV block to be free")


def rpc_error(served, *args, **kwargs):
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        served.client.score(*args, timeout=10, **kwargs)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("prompt,candidates,top_n,pattern", [
    ([1, 2], [[3], []], 0, r"^candidates\[1\] is empty"),
    ([1, 2], [[3], ""], 0, r"^candidates\[1\] is empty"),
    ([1, 2], [[3, 512]], 0, r"^candidates\[0\]: token id 512 at index 1 is not in \[0, 512\)"),
    ([1, 2], [b"\xff\xfe"], 0, r"^candidates\[0\]\.text is not valid UTF-8"),
    ([1, 2], [], 0, r"^token_ids: nothing to score"),
    ([1, 2], [[3]], -1, r"^top_n must be an integer in \[0, 20\], got -1"),
    ([1, 2], [[3]], 21, r"^top_n must be"),
    ("", [[3]], 0, r"^text is empty"),
    ([], [[3]], 0, r"^token_ids is empty"),
    ([5] * 120, [[3] * 9], 0, r"^token_ids \(120 tokens\) \+ candidates\[0\] \(9 tokens\) is "
                              r"more than max_model_len \(128\)"),
])
def test_score_rpc_rejects_bad_input_naming_the_field(served, prompt, candidates, top_n,
                                                      pattern):
    import grpc

    code, details = rpc_error(served, prompt, candidates, top_n=top_n)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert re.search(pattern, details), details


def test_score_rpc_names_a_missing_prompt_or_candidate(served):
    import grpc

    from jaxserve.serving import jaxserve_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        served.client.stub.Score(pb.ScoreRequest(top_n=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt: set text or token_ids")
    with pytest.raises(grpc.RpcError) as info:
        served.client.stub.Score(pb.ScoreRequest(top_n=1, candidates=[pb.Candidate()]),
                                 timeout=10)
    assert info.value.details().startswith("prompt")
    request = pb.ScoreRequest(token_ids=pb.TokenIds(ids=[1]), candidates=[pb.Candidate()])
    with pytest.raises(grpc.RpcError) as info:
        served.client.stub.Score(request, timeout=10)
    assert info.value.details().startswith("candidates[0]: set text or token_ids")


# ---- `jaxserve score`: the batch job, as a user runs it ----

def jaxserve_score(*args):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "jaxserve.cli", "score", *map(str, args)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                          text=True, timeout=600)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_scores_a_jsonl_file_and_resumes(served, tmp_path):
    lines = [{"id": "text", "prompt": TEXT_PROMPT, "candidates": TEXT_CANDIDATES, "top_n": 5}]
    lines += [{"id": i, "prompt": p, "candidates": CANDIDATES} for i, p in enumerate(PROMPTS)]
    lines += [{"id": "top only", "prompt": PROMPTS[0]}]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    full = tmp_path / "full.jsonl"
    engine = ["--model", served.model_dir, "--max-model-len", 128, "--block-size", 8]
    result = jaxserve_score("--input", inputs, "--output", full, "--top-n", 3, "--no-progress",
                            *engine)
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in read_jsonl(full)}
    assert set(records) == {line["id"] for line in lines}

    def assert_matches(record, offline):
        assert record["prompt_tokens"] == len(offline.prompt_token_ids)
        for got, want in zip(record["candidates"], offline.candidates, strict=True):
            assert got.get("text") == want.text and got["token_ids"] == want.token_ids
            np.testing.assert_allclose(got["token_logprobs"], want.token_logprobs, atol=1e-5)
        assert [t["token_id"] for t in record["top"]] == [t.token_id for t in offline.top]
        assert [t["text"] for t in record["top"]] == [t.text for t in offline.top]

    assert_matches(records["text"], served.offline["text"])
    for i, offline in enumerate(served.offline["ids"]):
        assert_matches(records[i], offline)
    assert records["top only"]["candidates"] == [] and len(records["top only"]["top"]) == 3

    # a job killed after writing two lines and half of a third
    partial = tmp_path / "partial.jsonl"
    kept = "".join(json.dumps(records[k]) + "\n" for k in ("text", 2))
    partial.write_text(kept + json.dumps(records[0])[:30])
    result = jaxserve_score("--input", inputs, "--output", partial, "--top-n", 3, *engine)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 scores" in result.stderr and "2 already there" in result.stderr
    assert "score: 100%" in result.stderr  # the progress bar
    assert partial.read_text().startswith(kept)
    resumed = {r["id"]: r for r in read_jsonl(partial)}
    assert set(resumed) == set(records)
    for key, record in resumed.items():
        for got, want in zip(record["candidates"], records[key]["candidates"]):
            np.testing.assert_allclose(got["token_logprobs"], want["token_logprobs"], atol=1e-5)


@pytest.mark.parametrize("line,message", [
    ({"id": 1, "prompt": "x", "candidates": [3]}, r"in\.jsonl:2: candidates\[0\] must be text "
                                                  r"or a list of token ids, got 3"),
    ({"id": 1, "prompt": "x", "candidates": "y"}, r"in\.jsonl:2: candidates must be a list"),
    ({"id": 1, "prompt": "x", "top_n": -2}, r"in\.jsonl:2: top_n must be a non-negative"),
    ({"id": 1, "prompt": "x", "max_tokens": 2},
     r"in\.jsonl:2: unknown field\(s\) \['max_tokens'\]"),
    ({"id": 1, "prompt": [1, 2], "candidates": [[3, 999]]},
     r"in\.jsonl:2: candidates\[0\]: token id 999 at index 1 is not in \[0, 512\)"),
    ({"id": 1, "prompt": [1, 2]}, r"in\.jsonl:2: prompt: nothing to score"),
])
def test_cli_rejects_a_bad_line_by_line_and_field(served, tmp_path, line, message):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": 0, "prompt": "x", "candidates": ["y"]}) + "\n"
                      + json.dumps(line) + "\n")
    result = jaxserve_score("--input", inputs, "--output", tmp_path / "out.jsonl",
                            "--model", served.model_dir, "--max-model-len", 128)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_top_n_above_the_limit_is_refused_before_loading_naming_file_line_and_value(
        tmp_path):
    """The up-front check (no model is loaded: the model path does not exist, so a check made
    only after loading would fail on the model instead) names the line, or the flag."""
    from jaxserve.offline.score import MAX_TOP_N, read_score_items

    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": 0, "prompt": "x", "top_n": 3}) + "\n"
                      + json.dumps({"id": 1, "prompt": "x", "top_n": MAX_TOP_N + 1}) + "\n")
    message = rf"in\.jsonl:2: top_n must be at most {MAX_TOP_N} .*, got {MAX_TOP_N + 1}"
    with pytest.raises(ValueError, match=message):
        read_score_items(inputs)
    missing = tmp_path / "no-such-model"
    result = jaxserve_score("--input", inputs, "--output", tmp_path / "out.jsonl",
                            "--model", missing)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": 0, "prompt": "x"}) + "\n")
    result = jaxserve_score("--input", good, "--output", tmp_path / "out.jsonl",
                            "--model", missing, "--top-n", 50)
    assert result.returncode == 2, result.stderr
    assert f"--top-n must be at most {MAX_TOP_N}" in result.stderr and "got 50" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
