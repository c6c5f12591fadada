"""A model whose vocabulary is smaller than the top-N the step computes (20) still samples."""

import math

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.checkpoint import convert_hf
from tests.hf_models import make_hf_model
from tests.test_engine import hf_greedy

VOCAB = 12


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_vocab")
    hf_dir = make_hf_model("llama", root / "hf", vocab_size=VOCAB, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0)
    convert_hf(hf_dir, root / "jaxserve", dtype="float32")
    return hf_dir, LLM(root / "jaxserve", max_model_len=64, max_num_seqs=4)


def test_greedy_equals_hf_and_logprobs_cover_the_vocabulary(small_vocab):
    hf_dir, llm = small_vocab
    prompt = [3, 7, 5, 11, 4]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=VOCAB),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(hf_dir, prompt, 8)
    for token, top in zip(out.token_ids, out.logprobs):
        assert set(top) == set(range(VOCAB))  # every token, none of the padding entries
        assert math.isclose(sum(math.exp(lp) for lp in top.values()), 1.0, rel_tol=1e-4)
        assert max(top, key=top.get) == token  # greedy picks the most likely


def test_seeded_sampling_gives_in_vocabulary_tokens(small_vocab):
    _, llm = small_vocab
    params = SamplingParams(temperature=1.0, top_k=5, max_tokens=16, seed=7, logprobs=3)
    a = llm.generate([[3, 4, 5]], params, use_tqdm=False)[0].outputs[0]
    b = llm.generate([[3, 4, 5]], params, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids
    assert all(0 <= t < VOCAB for t in a.token_ids)
    assert all(len(top) in (3, 4) for top in a.logprobs)  # top 3 plus the chosen token


def test_more_logprobs_than_the_vocabulary_is_refused(small_vocab):
    _, llm = small_vocab
    with pytest.raises(ValueError, match=rf"logprobs must be <= vocab_size \({VOCAB}\), got 13"):
        llm.generate([[3, 4]], SamplingParams(max_tokens=2, logprobs=13), use_tqdm=False)


def test_top_n_scores_over_a_small_vocabulary(small_vocab):
    hf_dir, llm = small_vocab
    from tests.hf_models import hf_logits

    [result] = llm.score([[3, 7, 5]], top_n=VOCAB)
    expected = hf_logits(hf_dir, [3, 7, 5])[-1]
    expected = expected - np.logaddexp.reduce(expected)
    assert [t.token_id for t in result.top] == np.argsort(-expected, kind="stable").tolist()
    np.testing.assert_allclose([t.logprob for t in result.top], np.sort(expected)[::-1],
                               atol=1e-4)
