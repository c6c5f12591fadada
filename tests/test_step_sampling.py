"""Sequence-parallel sampling: the same tokens and logprobs as replicated sampling, with the
collectives the design says (one all-to-all of the logits, gathers of the results only).

Oracle: the same LLM with sampling="replicated" (every device samples every row from the whole
vocabulary), on the same prompts and seeds.
"""

import re

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.runtime.runner import MAX_LOGPROBS

ENGINE = dict(max_model_len=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=64,
              max_prefill_rows=4)
MESHES = [("tp=2", "tp"), ("tp=4", "tp"), ("dp=2,tp=2", "dp_tp")]

PARAMS = [  # greedy, and seeded sampling with every parameter, with and without logprobs
    SamplingParams(temperature=0, max_tokens=10, logprobs=3),
    SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=10, repetition_penalty=1.3,
                   logprobs=2),
    SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=2, max_tokens=10,
                   presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=0.7, seed=3, max_tokens=10, min_tokens=4, stop_token_ids=[7]),
    SamplingParams(temperature=1.2, top_k=5, top_p=0.8, seed=4, max_tokens=10, n=2,
                   logprobs=5, repetition_penalty=0.9),
    SamplingParams(temperature=0, max_tokens=10, frequency_penalty=1.5, logprobs=MAX_LOGPROBS),
]


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in (5, 17, 9, 30, 3, 12)]


def outputs(llm):
    # every run prefills in full: a prefix-cache hit would split the prompt's attention
    # differently and move logprobs in their last bits
    llm.engine.clear_prefix_cache()
    return [[(c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason)
             for c in out.outputs] for out in llm.generate(prompts(), PARAMS, use_tqdm=False)]


@pytest.fixture(scope="module")
def tp2(hf_model_dir):
    """The tp=2 engine; each test sets the sampling mode it starts from."""
    return LLM(hf_model_dir("llama")[1], mesh="tp=2", rules="tp", sampling="replicated",
               **ENGINE)


@pytest.mark.parametrize("mesh,rules", MESHES, ids=[m for m, _ in MESHES])
def test_sequence_parallel_sampling_gives_the_tokens_and_logprobs_of_replicated(
        hf_model_dir, request, mesh, rules):
    if (mesh, rules) == ("tp=2", "tp"):
        llm = request.getfixturevalue("tp2")
        llm.runner.set_sampling("replicated")
    else:
        llm = LLM(hf_model_dir("llama")[1], mesh=mesh, rules=rules, sampling="replicated",
                  **ENGINE)
    replicated = outputs(llm)
    llm.runner.set_sampling("sequence_parallel")
    sequence_parallel = outputs(llm)
    assert sequence_parallel == replicated  # tokens, every logprob, bit for bit
    assert any(lps for req in replicated for _, lps, _, _ in req)


def _collectives(llm) -> dict[str, list[str]]:
    text = llm.runner.compiled_step(llm.engine.builder.idle(8, 0)).as_text()
    found = {}
    for op in ("all-gather", "all-to-all"):
        found[op] = [line for line in text.splitlines()
                     if re.search(rf"\s{op}(-start)?\(", line)]
    return found


def test_the_compiled_step_gathers_results_not_the_vocabulary(tp2):
    llm = tp2
    llm.runner.set_sampling("replicated")
    vocab = llm.config.vocab_rows
    whole_rows = re.compile(rf"\[\d+,{vocab}\]")  # [rows, vocab]: the whole vocabulary

    replicated = _collectives(llm)
    assert not replicated["all-to-all"]
    assert [line for line in replicated["all-gather"] if whole_rows.search(line)]

    llm.runner.set_sampling("sequence_parallel")
    sequence_parallel = _collectives(llm)
    assert not [line for line in sequence_parallel["all-gather"] if whole_rows.search(line)]
    (exchange,) = sequence_parallel["all-to-all"]  # the logits, once: [rows / 2, vocab / 2] x 2
    assert f",{vocab // 2}]" in exchange
    results = re.compile(rf"\[\d+,{1 + MAX_LOGPROBS}\]")  # tokens + top ids, chosen + top lps
    gathered = [line for line in sequence_parallel["all-gather"] if results.search(line)]
    assert len(gathered) == 2


def test_an_unknown_sampling_mode_is_refused_by_name(hf_model_dir):
    with pytest.raises(ValueError, match="'gather_all'"):
        LLM(hf_model_dir("llama")[1], sampling="gather_all")
    with pytest.raises(ValueError, match="'process'"):
        LLM(hf_model_dir("llama")[1], output_processing="process")


COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|reduce-scatter|"
                        r"collective-permute)(-start)?\(")


def _collective_shapes(hlo: str) -> list[tuple[str, str]]:
    """(collective, result shape) of every collective in a compiled program's text."""
    return [(m.group(2), m.group(1)) for line in hlo.splitlines()
            if (m := COLLECTIVE.search(line))]


@pytest.fixture(scope="module")
def dp8(hf_model_dir):
    return LLM(hf_model_dir("llama")[1], mesh="dp=8", rules="dp", **ENGINE)


def _assert_no_slot_state_moves(llm, replicas):
    """No collective of the compiled decode step carries a [slots, vocab] array (replicated
    state is all-reduced there), and each device holds its own replica's slots only."""
    vocab = llm.config.vocab_rows
    for decodes in (1, ENGINE["max_num_seqs"]):
        hlo = llm.runner.compiled_step(llm.engine.builder.idle(decodes, 0)).as_text()
        moved = [(op, shape) for op, shape in _collective_shapes(hlo) if f",{vocab}]" in shape]
        assert not moved, moved
    counts = llm.runner.slot_state.output_counts
    assert counts.shape == (replicas * (ENGINE["max_num_seqs"] + 1), vocab)
    # per device: its replica's slots and a trash row of its own
    assert {s.data.shape for s in counts.addressable_shards} == \
        {(ENGINE["max_num_seqs"] + 1, vocab)}


def test_dp8_decode_step_moves_no_slot_state_between_replicas(dp8):
    _assert_no_slot_state_moves(dp8, 8)


def test_ep4_decode_step_moves_no_slot_state_between_replicas(hf_model_dir):
    """Expert parallelism runs attention data-parallel: each device along ep is a replica."""
    _assert_no_slot_state_moves(LLM(hf_model_dir("qwen3_moe")[1], mesh="ep=4", rules="ep",
                                    **ENGINE), 4)


def test_dp8_penalised_tokens_match_one_device(hf_model_dir, dp8):
    """Penalties, min_tokens and n > 1 with each replica's slots on it: the tokens of one
    device (logprobs to rounding: a replica's batch vectorizes differently)."""
    got, want = outputs(dp8), outputs(LLM(hf_model_dir("llama")[1], **ENGINE))
    assert [[(ids, reason) for ids, _, _, reason in req] for req in got] == \
        [[(ids, reason) for ids, _, _, reason in req] for req in want]
    for got_req, want_req in zip(got, want):
        for (_, got_lps, got_cum, _), (_, want_lps, want_cum, _) in zip(got_req, want_req):
            assert (got_lps is None) == (want_lps is None)
            for a, b in zip(got_lps or [], want_lps or []):
                assert a.keys() == b.keys()
                np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-4)
