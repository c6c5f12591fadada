"""Speculative decoding: prompt-lookup proposals verified in the step, losslessly.

Oracles: greedy speculative decoding gives the plain engine's tokens (and logprobs) for every
request, whatever stops it; sampled speculative decoding follows the target's distribution,
checked against the exact probabilities the target's logits give, for point-mass proposals
and for proposals drawn from a draft distribution q that disagrees with the target.
"""

import numpy as np
import pytest
from scipy import stats

from jaxserve import LLM, SamplingParams
from jaxserve.engine.speculative.ngram import lookup
from jaxserve.package_data import embedded_draft
from jaxserve.settings import Settings, SpeculativeSettings
from tests.hf_models import small_vocab_llama

VOCAB = 12
# 20 blocks of 8: four sequences of 60 tokens do not fit at once (preemption). 32-token steps
# have one prefill bucket: 4 step shapes to compile for plain decoding, 6 with speculation.
ENGINE = dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
              max_prefill_chunk=32, kv_blocks=20)
# The auto fallback judges by measured step times: off here, so which steps speculate (and so
# the schedule, preemptions and what stays in the prefix cache) does not depend on the load.
# The fallback's own tests turn it on.
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "auto_fallback": False}
# Repetitive prompts: prompt lookup finds what to propose in them.
PROMPTS = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [7, 8, 9, 7, 8, 9, 7], [5, 5, 5, 5, 5],
           [10, 3, 11, 4, 9, 6, 10, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return small_vocab_llama(tmp_path_factory.mktemp("speculative"), VOCAB)


@pytest.fixture(scope="module")
def plain(model_dir):
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def spec(model_dir):
    return LLM(model_dir, speculative_config=NGRAM, **ENGINE)


def _tokens(llm, prompts, params):
    return [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, params,
                                                                   use_tqdm=False)]


# ---- prompt lookup ----

def test_lookup_proposes_what_followed_the_latest_earlier_match_of_the_longest_suffix():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3])
    assert lookup(tokens, 2, 1, 3) == [7, 8]  # "2 3" last seen at 5..6, then 7 8
    assert lookup(tokens, 5, 1, 3) == [7, 8, 2, 3]  # as much as follows
    assert lookup(np.array([1, 2, 3, 4]), 3, 1, 3) == []  # nothing repeats
    assert lookup(np.array([5, 6, 5]), 3, 2, 3) == []  # only a 1-gram matches, below min_n


# ---- greedy: the plain engine's tokens ----

def test_greedy_speculation_gives_the_plain_tokens_and_logprobs_and_accepts_some(plain, spec):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    before = spec.stats()
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lw.keys() == lg.keys()
            np.testing.assert_allclose(list(lg.values()), list(lw.values()), atol=1e-5)
    after = spec.stats()
    proposed = after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert proposed > 0 and 0 < accepted <= proposed
    # fewer steps than tokens: some steps kept proposals
    assert after["steps"] - before.get("steps", 0) < sum(len(r.outputs[0].token_ids) for r in got)
    assert 0 < after["spec_acceptance_rate"] <= 1 and after["spec_tokens_per_step"] > 1


@pytest.mark.parametrize("params", [
    dict(max_tokens=7),  # max_tokens inside a run of kept proposals
    dict(max_tokens=20, min_tokens=6, stop_token_ids=[5, 6]),  # stops in the middle of a run
    dict(max_tokens=12, n=3, seed=0, temperature=0),  # n > 1 shares the prompt's blocks
    dict(max_tokens=16, repetition_penalty=1.3, frequency_penalty=0.4),  # penalties count
    # the run's earlier proposals as generated
], ids=["max_tokens", "stop_tokens_min_tokens", "n3", "penalties"])
def test_greedy_speculation_stops_and_penalises_as_plain_decoding(plain, spec, params):
    sp = SamplingParams(**{"temperature": 0, **params})
    assert _tokens(spec, PROMPTS, sp) == _tokens(plain, PROMPTS, sp)


def test_preemption_and_prefix_cache_hits_keep_the_plain_tokens(plain, spec):
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    want = _tokens(plain, PROMPTS, params)
    preempted = spec.stats()["preemptions"]
    assert _tokens(spec, PROMPTS, params) == want
    assert spec.stats()["preemptions"] > preempted
    # Which blocks the preempting run left cached depends on what ran before it: two prompts
    # that fit the pool together, then again, from the prefix cache
    assert _tokens(spec, PROMPTS[:2], params) == want[:2]
    hits = spec.stats()["prefix_cache_hits"]
    assert _tokens(spec, PROMPTS[:2], params) == want[:2]
    assert spec.stats()["prefix_cache_hits"] > hits


# ---- sampling: the target's distribution ----

def _kept_probs(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The sampler's distribution at temperature 1 with top_p (jaxserve/runtime/sampling.py)."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def _chi_square_p(seen: np.ndarray, expected: np.ndarray) -> float:
    counts = np.bincount(seen, minlength=len(expected))
    assert counts[expected == 0].sum() == 0, "a token the filters drop was drawn"
    support = expected > 0
    wanted = expected[support] * len(seen)
    statistic = ((counts[support] - wanted) ** 2 / wanted).sum()
    return float(stats.chi2.sf(statistic, support.sum() - 1))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_rejection_sampling_follows_the_target_distribution(top_p):
    """4000 seeded runs of the device's acceptance (the step's own function) on one proposal
    d, the target's second most likely token: the run's first token must follow p1 (d kept
    with probability p1(d), else a draw from the residual), and its second, emitted only after
    d was kept, p2. Chi-square against the exact filtered distributions, false-alarm rate 1e-3
    per comparison. Checked to fail when the rule is wrong (both top_p cases), by editing
    `verify_rows`: keeping every proposal (tokens = d where there is one) gives the first
    token's p = 0.0 (underflow); keeping d with an independent draw u < p(d) and drawing a
    rejected row's token from p itself (which may give d back), p < 1e-100."""
    import jax
    import jax.numpy as jnp

    from jaxserve.runtime import verify
    from jaxserve.runtime.sampling import SamplingInputs

    rng = np.random.default_rng(0)
    first, second = rng.normal(0, 1.5, VOCAB), rng.normal(0, 1.5, VOCAB)
    p1, p2 = _kept_probs(first, top_p), _kept_probs(second, top_p)
    d = int(np.argsort(-p1)[1])
    num = 4000
    logits = np.tile(np.stack([first, second]), (num, 1)).astype(np.float32)
    draft = np.tile([d, -1], num).astype(np.int32)
    run_start = np.repeat(np.arange(0, 2 * num, 2), 2).astype(np.int32)
    sampling = SamplingInputs.from_params([SamplingParams(temperature=1.0, top_p=top_p)] * 2 * num,
                                          np.repeat(np.arange(num), 2).tolist(),
                                          [5, 6] * num, 2 * num)
    rows = 2 * num
    no_state = jnp.zeros((1, VOCAB), bool), jnp.zeros((1, VOCAB), jnp.int32)
    tokens, emitted, *_ = jax.jit(verify.verify_rows, static_argnums=(10,))(
        logits, *no_state, np.zeros(rows, np.int32), np.full((rows, 1), VOCAB, np.int32),
        np.zeros(rows, bool), sampling, draft, run_start, np.ones(rows, bool), 0)
    tokens, emitted = np.asarray(tokens).reshape(num, 2), np.asarray(emitted).reshape(num, 2)
    assert 0.05 < p1[d] < 0.95  # both branches are taken often
    p_value = _chi_square_p(tokens[:, 0], p1)
    assert p_value > 1e-3, f"first token: chi-square p = {p_value:.2e}"
    kept = tokens[:, 0] == d
    assert emitted[:, 0].all() and (emitted[:, 1] == kept).all()
    p_value = _chi_square_p(tokens[kept, 1], p2)
    assert p_value > 1e-3, f"second token: chi-square p = {p_value:.2e}"


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_drafts_verified_follow_the_target_distribution(top_p):
    """4000 seeds, one batch row each of a run of three rows: two proposals d1 ~ q1, d2 ~ q2
    from a draft that disagrees with the target (other logits), then the bonus row. The run's
    first token must follow p1 and, given d1 was kept, its second p2 (chi-square against the
    exact filtered distributions; false-alarm rate 1e-3 per comparison, 4e-3 over the four).
    Checked by hand to fail when the rule is wrong, by editing `_accept_sampled` in
    jaxserve/runtime/verify.py: keeping every proposal gives first-token p = 0.0 (top_p 1)
    or draws a token top_p drops (0.8); drawing a rejected row's token from p instead of the
    residual, p = 5e-100 and 6e-160."""
    import jax
    import jax.numpy as jnp

    from jaxserve.runtime import verify
    from jaxserve.runtime.sampling import SamplingInputs

    rng = np.random.default_rng(0)
    target = rng.normal(0, 1.5, (3, VOCAB))
    drafter = target[:2] + rng.normal(0, 1.5, (2, VOCAB))  # disagrees
    p = np.stack([_kept_probs(row, top_p) for row in target])
    q = np.stack([_kept_probs(row, top_p) for row in drafter])
    num, rows = 4000, 3
    proposals = np.stack([rng.choice(VOCAB, num, p=q[j]) for j in range(2)], axis=1)
    draft = np.concatenate([proposals, np.full((num, 1), -1)], axis=1).reshape(-1)
    draft_probs = np.tile(np.concatenate([q, np.zeros((1, VOCAB))]), (num, 1))
    run_start = np.repeat(np.arange(0, rows * num, rows), rows)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    sampling = SamplingInputs.from_params([params] * rows * num,
                                          np.repeat(np.arange(num), rows).tolist(),
                                          [5, 6, 7] * num, rows * num)
    n = rows * num
    no_state = jnp.zeros((1, VOCAB), bool), jnp.zeros((1, VOCAB), jnp.int32)
    tokens, emitted, *_ = jax.jit(verify.verify_rows, static_argnums=(10,))(
        np.tile(target, (num, 1)).astype(np.float32), *no_state, np.zeros(n, np.int32),
        np.full((n, 1), VOCAB, np.int32), np.zeros(n, bool), sampling,
        draft.astype(np.int32), run_start.astype(np.int32), np.ones(n, bool), 0,
        draft_probs.astype(np.float32))
    tokens, emitted = np.asarray(tokens).reshape(num, rows), np.asarray(emitted).reshape(num, 3)
    p_value = _chi_square_p(tokens[:, 0], p[0])
    assert p_value > 1e-3, f"first token: chi-square p = {p_value:.2e}"
    kept = emitted[:, 1]  # the second row emits iff the first kept its proposal
    assert 0.2 < kept.mean() < 0.9  # both branches are taken often
    assert emitted[:, 0].all() and (tokens[kept, 0] == proposals[kept, 0]).all()
    p_value = _chi_square_p(tokens[kept, 1], p[1])
    assert p_value > 1e-3, f"second token: chi-square p = {p_value:.2e}"


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=6, max_tokens=12),
    dict(temperature=0.9, top_p=0.8, min_p=0.05, presence_penalty=0.5, max_tokens=12),
], ids=["top_k", "top_p_min_p_penalty"])
def test_seeded_sampling_gives_the_plain_tokens_alone_and_in_a_batch(plain, spec, params):
    """A kept proposal is the token the plain step draws with the same seed and index, so a
    seeded request's tokens are plain decoding's, whatever was proposed and batched beside."""
    seeded = SamplingParams(**params, seed=11)
    want = _tokens(plain, [PROMPTS[0]], seeded)[0]
    assert _tokens(spec, [PROMPTS[0]], seeded)[0] == want
    others = SamplingParams(temperature=0.8, max_tokens=10)
    batch = spec.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, seeded, others],
                          use_tqdm=False)
    assert [o.token_ids for o in batch[1].outputs] == want


def test_sequences_without_proposals_decode_plainly_beside_verifying_ones(plain, spec,
                                                                          monkeypatch):
    """Two of four sequences are proposed for, the others decode as plain ones in the same
    steps (one row each, their token from the slot, counted when the step is planned): every
    request keeps the plain engine's tokens, greedy and seeded-sampled. Fails if a plain row
    in a verifying step were settled like a run, or fed a stale token."""
    chosen = {tuple(PROMPTS[0]), tuple(PROMPTS[2])}
    monkeypatch.setattr(spec.engine.fallback, "proposing", lambda seqs, running=None: [
        s for s in seqs if tuple(s.request.prompt_ids) in chosen])
    for params in (SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                   SamplingParams(temperature=0.9, top_p=0.8, max_tokens=16, seed=5,
                                  ignore_eos=True)):
        before = spec.stats()
        assert _tokens(spec, PROMPTS, params) == _tokens(plain, PROMPTS, params)
        assert spec.stats()["spec_verify_runs"] > before["spec_verify_runs"]


# ---- bad input ----

@pytest.mark.parametrize("config, error", [
    ({"method": "medusa"}, "speculative method must be one of ngram, draft, got 'medusa'"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer, got 0"),
    ({"num_speculative_tokens": 99}, "num_speculative_tokens must be at most 15, got 99"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, r"prompt_lookup_min \(4\) must not"),
    ({"method": "ngram", "mesh": "tp=1@4"}, "speculative mesh 'tp=1@4' places a draft model"),
    ({"method": "draft", "mesh": "tp=1"}, "speculative mesh must be AXES@FIRST_DEVICE, e.g. "
                                          "'tp=1@4', got 'tp=1'"),
    ({"method": "draft", "mesh": "xp=1@4"}, "unknown mesh axis 'xp'"),
    ({"method": "ngram", "model": "x"}, "speculative method 'ngram' takes no model, got 'x'"),
    ({"k": 4}, "speculative_config: unknown key 'k'"),
])
def test_bad_speculative_configs_are_refused_naming_the_value(config, error):
    with pytest.raises(ValueError, match=error):
        SpeculativeSettings.from_config(config)


def test_speculative_flags_build_the_speculative_settings():
    from jaxserve import cli

    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--num-speculative-tokens", "3"])
    assert cli._settings(args).speculative == SpeculativeSettings(num_speculative_tokens=3)
    assert cli._settings(parser.parse_args(["serve"])).speculative is None
    args = parser.parse_args(["serve", "--speculative-method", "draft",
                              "--speculative-mesh", "tp=1@4"])
    assert cli._settings(args).speculative == SpeculativeSettings(
        method="draft", model=str(embedded_draft()), mesh="tp=1@4")  # the embedded draft


def test_settings_take_speculative_settings_only():
    assert Settings(speculative=SpeculativeSettings()).speculative.method == "ngram"
    with pytest.raises(TypeError, match="settings.speculative must be a SpeculativeSettings"):
        Settings(speculative={"method": "ngram"})


def test_too_many_proposals_for_the_context_and_dp_are_refused(model_dir):
    with pytest.raises(ValueError, match=r"num_speculative_tokens \(8\) must be less than "
                                         r"max_model_len \(8\)"):
        LLM(model_dir, speculative_config={"num_speculative_tokens": 8}, max_model_len=8)
    with pytest.raises(ValueError, match="speculative decoding runs on one DP replica; the "
                                         "mesh has 2"):
        LLM(model_dir, speculative_config=NGRAM, mesh="dp=2", rules="dp", **ENGINE)


# ---- metrics ----

def test_speculative_stats_reach_the_prometheus_metrics(spec):
    """After a speculative run, a real metrics server on 127.0.0.1 serves the engine's
    acceptance rate, tokens per step, proposal counts and draft / verify time."""
    import types
    import urllib.request

    from jaxserve.serving.metrics import ServingMetrics, start_metrics_server

    metrics = ServingMetrics()
    metrics.start_from({"kv_blocks_total": 1})  # count from zero: the engine ran before
    spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                  use_tqdm=False)
    stats = spec.stats()
    assert stats["spec_verify_s"] > 0 and stats["spec_draft_s"] > 0
    assert stats["spec_verify_s"] <= stats["readback_wait_s"] + stats["dispatch_s"] + \
        stats["schedule_s"] + stats["process_s"] + stats["propose_s"] + 60
    metrics.on_step(types.SimpleNamespace(engine=spec.engine), 0.0)
    httpd = start_metrics_server(metrics.registry, "127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_port}/").read().decode()
    finally:
        httpd.shutdown()
        httpd.server_close()
    served = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert served["jaxserve_spec_acceptance_rate"] == stats["spec_acceptance_rate"]
    assert served["jaxserve_spec_tokens_per_step"] == stats["spec_tokens_per_step"]
    assert served["jaxserve_spec_proposed_tokens_total"] == stats["spec_proposed_tokens"] > 0
    assert served["jaxserve_spec_accepted_tokens_total"] == stats["spec_accepted_tokens"]
    assert served["jaxserve_spec_draft_seconds_total"] == pytest.approx(stats["spec_draft_s"])
    assert served["jaxserve_spec_verify_seconds_total"] == pytest.approx(stats["spec_verify_s"])


# ---- auto fallback ----

def test_the_break_even_is_draft_plus_verify_over_plain_and_judges_each_sequence():
    from jaxserve.engine.speculative.fallback import MIN_PLAIN, MIN_RUNS, Fallback

    fallback = Fallback(enabled=True)
    good, poor, new = object(), object(), object()
    for _ in range(MIN_RUNS):
        fallback.record_run(good, 2)  # 3 tokens per verifying step
        fallback.record_run(poor, 1)  # 2
    fallback.record_run(new, 0)
    assert fallback.break_even is None and fallback.wants_probe([good, poor, new])
    fallback.record_draft(0.010)
    fallback.record_step(0.015, verified=True)
    for _ in range(MIN_PLAIN - 1):
        fallback.record_step(0.010, verified=False)
    assert fallback.break_even is None and fallback.wants_probe([good])  # too few plain steps
    fallback.record_step(0.010, verified=False)
    assert fallback.break_even == pytest.approx(2.5)  # (10 + 15) / 10 ms: poor's 2 < 0.9 x 2.5
    assert not fallback.wants_probe([good, poor])
    assert fallback.proposing([good, poor, new]) == [good, new]
    assert fallback.stats([good, poor])["spec_fallback_sequences"] == 1
    assert fallback.stats([good, poor])["spec_fallback_running"] == 1
    assert fallback.proposing([good]) == [good]  # the finished ones are forgotten
    assert fallback.stats([good])["spec_fallback_running"] == 0
    off = Fallback(enabled=False)
    for _ in range(MIN_RUNS):
        off.record_run(poor, 0)
    assert off.proposing([poor]) == [poor] and not off.wants_probe([poor])



def test_after_fall_backs_new_greedy_sequences_start_plain_but_for_fewer_and_fewer_trials():
    """The engine remembers its verdicts: after a fall-back only every trial_every-th new
    greedy sequence speculates, trial_every doubling per fall-back up to MAX_TRIAL_EVERY; a
    trial that passes its judgement brings every new sequence back; sampled ones always try."""
    from jaxserve.engine.speculative.fallback import MAX_TRIAL_EVERY, MIN_PLAIN, MIN_RUNS, \
        MIN_TRIAL_RUNS, Fallback

    class Seq:  # what the fallback reads of a sequence; hashed by identity, as sequences are
        def __init__(self, greedy):
            self.params = SamplingParams(temperature=0 if greedy else 1)

    def seq(greedy=True):
        return Seq(greedy)

    fallback = Fallback(enabled=True)
    fallback.record_draft(0.010)
    fallback.record_step(0.015, verified=True)
    for _ in range(MIN_PLAIN):
        fallback.record_step(0.010, verified=False)  # break-even 2.5 tokens per step

    def still_proposing_after_judgement(s, kept_per_run):
        for _ in range(MIN_RUNS):
            fallback.record_run(s, kept_per_run)
        return fallback.proposing([s]) == [s]

    first = seq()
    assert fallback.proposing([first]) == [first]  # nothing judged yet: it tries
    assert not still_proposing_after_judgement(first, 0) and fallback.trial_every == 2
    fresh = [seq() for _ in range(4)]
    assert fallback.proposing(fresh) == fresh[1::2]  # every 2nd new greedy sequence tries
    for _ in range(MIN_TRIAL_RUNS - 1):  # a trial is judged sooner than a first sequence
        fallback.record_run(fresh[1], 0)
    assert fallback.proposing([fresh[1]]) == [fresh[1]]
    fallback.record_run(fresh[1], 0)
    assert fallback.proposing([fresh[1]]) == [] and fallback.trial_every == 4
    sampled = seq(greedy=False)
    assert fallback.proposing([sampled]) == [sampled]
    for _ in range(8):  # the trials keep failing: fewer and fewer of them
        trial = next(s for s in iter(seq, None) if fallback.proposing([s]))
        assert not still_proposing_after_judgement(trial, 0)
    assert fallback.trial_every == MAX_TRIAL_EVERY
    stats = fallback.stats([])
    assert stats["spec_trial_every"] == MAX_TRIAL_EVERY
    assert stats["spec_fallback_sequences"] == 10 + stats["spec_fallback_untried"]
    assert stats["spec_fallback_untried"] == 2 + 3 + 7 + 15 + 31 + 63 + 63 + 63 + 63
    marginal = next(s for s in iter(seq, None) if fallback.proposing([s]))
    assert still_proposing_after_judgement(marginal, 1.5)  # 2.5 tokens: not below 0.9 x 2.5,
    assert fallback.trial_every == MAX_TRIAL_EVERY  # but not clearly above it (2.5 / 0.9)
    good = next(s for s in iter(seq, None) if fallback.proposing([s]))
    assert still_proposing_after_judgement(good, 2)  # 3 tokens per step > 2.5 / 0.9
    assert fallback.trial_every == 1
    everyone = [seq() for _ in range(3)]
    assert fallback.proposing(everyone + [good]) == everyone + [good]
