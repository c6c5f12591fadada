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


@pytest.mark.parametrize("mesh,rules", MESHES, ids=[m for m, _ in MESHES])
def test_sequence_parallel_sampling_gives_the_tokens_and_logprobs_of_replicated(
        hf_model_dir, mesh, rules):
    llm = LLM(hf_model_dir("llama")[1], mesh=mesh, rules=rules, sampling="replicated", **ENGINE)
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


def test_the_compiled_step_gathers_results_not_the_vocabulary(hf_model_dir):
    llm = LLM(hf_model_dir("llama")[1], mesh="tp=2", rules="tp", sampling="replicated",
              **ENGINE)
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
