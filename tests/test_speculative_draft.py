"""Speculative decoding with a draft model: a second, smaller model proposes, the target verifies.

Oracles: greedy tokens are the plain engine's whatever the draft proposes, and seeded ones the
same alone and in a batch; a draft identical to the target proposes exactly the target's greedy
tokens, so every proposal is kept (which fails if the draft's KV, positions or catch-up were
wrong), and samples from q = p for a sampling request, so every proposal is kept too (which
fails if the draft stayed greedy or processed its logits otherwise); a draft of another
vocabulary is refused at load.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.checkpoint import convert_hf
from tests.hf_models import make_hf_model

VOCAB = 12
# 20 blocks of 8: four sequences of 60 tokens do not fit at once (preemption)
ENGINE = dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=64,
              max_prefill_chunk=32, kv_blocks=20)
PROMPTS = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [7, 8, 9, 7, 8, 9, 7], [5, 5, 5, 5, 5],
           [10, 3, 11, 4, 9, 6, 10, 3]]


def _convert(root, name, **overrides):
    hf_dir = make_hf_model("llama", root / f"{name}_hf", vocab_size=VOCAB, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, **overrides)
    convert_hf(hf_dir, root / name, dtype="float32")
    return root / name


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    return {"target": _convert(root, "target"),
            # another random model of the same shape: its programs are the target's
            "other": _convert(root, "other", seed=1)}


@pytest.fixture(scope="module")
def plain(dirs):
    return LLM(dirs["target"], **ENGINE)


def _draft(model_dir, k=3):
    return {"method": "draft", "model": str(model_dir), "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def self_draft(dirs):
    """The target drafts for itself."""
    return LLM(dirs["target"], speculative_config=_draft(dirs["target"]), **ENGINE)


@pytest.fixture(scope="module")
def other_draft(dirs):
    """Another random model of the same vocabulary drafts."""
    return LLM(dirs["target"], speculative_config=_draft(dirs["other"]), **ENGINE)


def _tokens(llm, prompts, params):
    return [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, params,
                                                                   use_tqdm=False)]


def _spec_counts(llm, before):
    after = llm.stats()
    return (after["spec_proposed_tokens"] - before["spec_proposed_tokens"],
            after["spec_accepted_tokens"] - before["spec_accepted_tokens"], after)


def test_a_draft_equal_to_the_target_is_always_right_and_gives_the_plain_tokens(plain,
                                                                                self_draft):
    """Preempted sequences included: their draft catches up from scratch when they resume."""
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    want = _tokens(plain, PROMPTS, params)
    before = self_draft.stats()
    assert _tokens(self_draft, PROMPTS, params) == want
    proposed, accepted, after = _spec_counts(self_draft, before)
    assert after["preemptions"] > before["preemptions"]
    assert proposed > 0 and accepted == proposed
    assert after["spec_acceptance_rate"] == 1.0
    assert after["spec_tokens_per_step"] > 3  # k = 3 kept, plus the target's own token
    # the finished sequences give their draft blocks back at the next round
    self_draft.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2),
                        use_tqdm=False)
    assert self_draft.engine.proposer.num_blocks_used == 0


def test_a_different_draft_proposes_its_own_greedy_tokens_and_keeps_the_plain_ones(
        dirs, plain, other_draft):
    """Every round's proposals are what the draft model alone decodes greedily from the same
    tokens, rounds after rejections included; the target keeps the plain tokens. Checked to
    fail when the draft's catch-up is wrong: a new sequence's draft starting at its last token
    instead of its first proposes other tokens."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    proposer = other_draft.engine.proposer
    rounds, fill_step = [], proposer.fill_step

    def recording(rows, verify):  # the proposals stay on the device: read them afterwards
        out = fill_step(rows, verify)
        rounds.extend((s.request.prompt_ids + s.output_ids, out.draft, r)
                      for s, r in rows.items())
        return out

    proposer.fill_step = recording
    before = other_draft.stats()
    try:
        assert _tokens(other_draft, PROMPTS, params) == _tokens(plain, PROMPTS, params)
    finally:
        del proposer.fill_step
    proposed, accepted, after = _spec_counts(other_draft, before)
    assert proposed > 0 and accepted < proposed  # it is not the target: some are rejected
    assert after["spec_acceptance_rate"] is not None
    checked = [(tokens, np.asarray(draft)[rows].tolist()) for tokens, draft, rows in rounds]
    assert len(checked) >= 4 and all(len(p) for _, p in checked)
    alone = LLM(dirs["other"], **ENGINE).generate(
        [tokens for tokens, _ in checked],
        [SamplingParams(temperature=0, max_tokens=len(p), ignore_eos=True) for _, p in checked],
        use_tqdm=False)
    assert [r.outputs[0].token_ids for r in alone] == [p for _, p in checked]


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=6, max_tokens=12, seed=11),
    dict(temperature=0.9, top_p=0.8, presence_penalty=0.5, max_tokens=12, seed=5),
], ids=["top_k", "top_p_penalty"])
def test_seeded_sampling_with_a_sampled_draft_gives_the_same_tokens_alone_and_in_a_batch(
        other_draft, params):
    """The draft samples its proposals (its own seed per round) and the target accepts by
    rejection sampling against their q: a seeded request's tokens do not depend on the batch."""
    seeded = SamplingParams(**params)
    before = other_draft.stats()
    want = _tokens(other_draft, [PROMPTS[0]], seeded)[0]
    proposed, accepted, _ = _spec_counts(other_draft, before)
    assert proposed > 0 and accepted < proposed
    others = SamplingParams(temperature=0.8, max_tokens=10)
    batch = other_draft.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, seeded, others],
                                 use_tqdm=False)
    assert [o.token_ids for o in batch[1].outputs] == want


def test_a_sampled_draft_equal_to_the_target_is_kept_with_penalties_and_filters(self_draft):
    """q = p when the draft is the target and both apply the same SamplingParams (penalties
    counting the outputs and the round's earlier proposals, top_p, min_p): every proposal is
    kept (min(1, p / q) = 1, up to rounding). Fails when q's rows, counts or filters are not
    p's."""
    params = SamplingParams(temperature=0.9, top_p=0.8, min_p=0.05, presence_penalty=0.5,
                            frequency_penalty=0.3, max_tokens=24, ignore_eos=True)
    before = self_draft.stats()
    self_draft.generate(PROMPTS, [dataclasses.replace(params, seed=i) for i in range(4)],
                        use_tqdm=False)
    proposed, accepted, _ = _spec_counts(self_draft, before)
    assert proposed > 20 and accepted >= 0.99 * proposed


def test_a_draft_of_another_vocabulary_is_refused_naming_both_sizes(dirs, tmp_path):
    other = tmp_path / "other_vocab"
    shutil.copytree(dirs["other"], other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = VOCAB + 4
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not share the target's vocabulary: its "
                                         r"vocab_size is 16, the target's 12"):
        LLM(dirs["target"], speculative_config=_draft(other), **ENGINE)
    with pytest.raises(ValueError, match="no jaxserve checkpoint there"):
        LLM(dirs["target"], speculative_config=_draft(tmp_path / "missing"), **ENGINE)


def test_a_draft_tokenizer_with_other_special_ids_is_refused_naming_both(tmp_path):
    """The embedded model's own tokenizer passes; the same tokens with another EOS do not."""
    from jaxserve.config import ModelConfig
    from jaxserve.engine.speculative.draft import check_vocabulary
    from jaxserve.package_data import embedded_model
    from jaxserve.text.load import load_tokenizer

    source = embedded_model()
    config = ModelConfig.load(source / "config.json")
    target = load_tokenizer(source, config)
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(source / "tokenizer.model", same)
    check_vocabulary(config, target, config, load_tokenizer(same, config), same)
    other = tmp_path / "other_eos"
    other.mkdir()
    shutil.copy(source / "tokenizer.model", other)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    with pytest.raises(ValueError, match=r"'.*other_eos' does not share the target's "
                                         r"vocabulary: its tokenizer's eos_ids is \(3, 2\), "
                                         r"the target's \(2,\)"):
        check_vocabulary(config, target, config, load_tokenizer(other, config), other)


def test_a_speculative_model_alone_means_the_draft_method():
    from jaxserve import cli
    from jaxserve.settings import SpeculativeSettings

    args = cli.build_parser().parse_args(["generate", "--prompt", "x",
                                          "--speculative-model", "some/dir"])
    assert cli._settings(args).speculative == SpeculativeSettings(method="draft",
                                                                  model="some/dir")


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0.9, top_k=6, seed=3)],
                         ids=["greedy", "sampled"])
def test_each_round_of_proposals_is_one_dispatch_of_the_draft(self_draft, params):
    """After a sequence's first round (whose prompt the draft prefills), a round is ONE draft
    program: the catch-up and the k - 1 iterations (greedy or sampled) run in a loop on the
    device. Fails with a round of k separate draft steps, or with a catch-up that prefills what
    the draft already wrote (the kept proposals)."""
    runner = self_draft.engine.proposer.runner
    calls = {"propose": 0, "step": 0}
    propose, step = runner.propose, runner.step

    def counting(kind, fn):
        def call(inputs):
            calls[kind] += 1
            return fn(inputs)
        return call

    runner.propose, runner.step = counting("propose", propose), counting("step", step)
    before = self_draft.stats()
    try:
        _tokens(self_draft, [PROMPTS[0]], SamplingParams(**params, max_tokens=21,
                                                         ignore_eos=True))
    finally:
        del runner.propose, runner.step
    after = self_draft.stats()
    rounds = after["spec_verify_runs"] - before["spec_verify_runs"]
    if not params["temperature"]:
        assert rounds == 5  # 1 + 5 x (3 kept + 1): every proposal kept
    assert rounds >= 5
    assert calls == {"propose": rounds, "step": 1}  # one prefill of the prompt, then rounds


def test_the_draft_on_devices_of_its_own_gives_the_plain_tokens_at_tp2(dirs, plain):
    """Target tp=2 on devices 0-1, the draft (the target's checkpoint) alone on device 2,
    proposing each step's tokens while the target verifies the step before. Such a draft is
    always right, so the round dispatched ahead holds for nearly every step (it fails if the
    ahead round's positions or KV were wrong: its proposals would be rejected)."""
    llm = LLM(dirs["target"], mesh="tp=2", rules="tp",
              speculative_config={**_draft(dirs["target"]), "mesh": "tp=1@2"},
              compilation="on_use", **ENGINE)  # only the shapes it runs
    proposer = llm.engine.proposer
    assert [d.id for d in proposer.runner.layout.mesh.devices.flat] == [2]
    assert {d.id for leaf in proposer.runner.param_leaves for d in leaf.devices()} == {2}
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    assert _tokens(llm, PROMPTS[:1], params) == _tokens(plain, PROMPTS[:1], params)
    stats = llm.stats()
    rounds = stats["spec_verify_runs"]
    assert stats["spec_acceptance_rate"] == 1.0 and rounds >= 3
    # every round after the first finds its proposals ready (all of them kept, above), but
    # one whose proposals max_tokens cut short: the round ahead assumed all k
    assert proposer.ahead_rounds >= rounds - 1 and proposer.ahead_hits >= rounds - 2


def test_a_draft_sharing_the_targets_tp2_mesh_feeds_its_proposals_on_the_device(dirs, plain):
    """Target and draft both tp=2 on devices 0-1: the round's proposals go from the draft's
    program into the target's verify step without the host. The draft is the target, so every
    proposal is kept (it fails if a proposal reached the wrong row or position)."""
    llm = LLM(dirs["target"], mesh="tp=2", rules="tp", speculative_config=_draft(dirs["target"]),
              compilation="on_use", **ENGINE)
    assert llm.engine.proposer.on_device
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    assert _tokens(llm, PROMPTS[:1], params) == _tokens(plain, PROMPTS[:1], params)
    stats = llm.stats()
    assert stats["spec_acceptance_rate"] == 1.0 and stats["spec_verify_runs"] == 3


def test_a_draft_mesh_out_of_range_or_on_the_targets_devices_is_refused_naming_it():
    from jaxserve.engine.speculative.draft import draft_layout
    from jaxserve.sharding import Layout

    target = Layout.create("tp=2", "tp")
    with pytest.raises(ValueError, match=r"speculative mesh 'tp=1@1' overlaps the target's "
                                         r"devices \[0, 1\] \(device 1\)"):
        draft_layout("tp=1@1", target, "tp")
    with pytest.raises(ValueError, match=r"speculative mesh 'tp=2@7' needs devices 7..8 but "
                                         r"there are 8"):
        draft_layout("tp=2@7", target, "tp")
    assert [d.id for d in draft_layout("tp=2@4", target, "tp").mesh.devices.flat] == [4, 5]


def test_a_useless_draft_falls_back_to_plain_decoding_with_the_plain_tokens(plain, other_draft,
                                                                           monkeypatch):
    """A random draft as costly as the target gains far fewer tokens per step than its
    measured break-even ((draft + verify) / plain step time, about k + 1 here): every sequence
    stops speculating once judged (after MIN_RUNS verifying steps), and the tokens stay the
    plain ones."""
    from jaxserve.engine.speculative.fallback import MIN_RUNS

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # every new sequence is tried, whatever earlier tests on this engine left the fallback's
    # memory at (their sequences may have fallen back too, under load)
    monkeypatch.setattr(other_draft.engine.fallback, "trial_every", 1)
    monkeypatch.setattr(other_draft.engine.fallback, "since_trial", 0)
    before = other_draft.stats()
    assert _tokens(other_draft, PROMPTS[:3], params) == _tokens(plain, PROMPTS[:3], params)
    after = other_draft.stats()
    assert after["spec_fallback_sequences"] - before["spec_fallback_sequences"] == 3
    assert after["spec_break_even_tokens_per_step"] > 1 and after["spec_plain_step_s"] > 0
    # each sequence verified proposals in MIN_RUNS steps, and none after it fell back
    assert after["spec_verify_runs"] - before["spec_verify_runs"] == 3 * MIN_RUNS


def test_sequences_that_fell_back_step_as_the_plain_engine_with_steps_in_flight(plain,
                                                                                other_draft,
                                                                                monkeypatch):
    """New greedy requests turned away untried (the fallback's memory) run no proposer at
    all: the engine steps as the plain one does, the next step dispatched before the last is
    read back (max_steps_in_flight = 2), in the plain programs (no verify rows), with the
    plain tokens. Fails if a speculative engine reads every step back before planning the
    next, as it did, or runs its verify program for them."""
    engine = other_draft.engine
    monkeypatch.setattr(engine.fallback, "trial_every", 64)  # as after six fall-backs
    monkeypatch.setattr(engine.fallback, "since_trial", 0)
    in_flight, plain_steps = [], []  # per step: steps in flight at its dispatch; no verify
    step = engine.runner.step

    def dispatch(inputs):
        in_flight.append(len(engine.inflight))
        plain_steps.append(inputs.verify is None)
        return step(inputs)
    monkeypatch.setattr(engine.runner, "step", dispatch)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    before = other_draft.stats()
    assert _tokens(other_draft, PROMPTS[:3], params) == _tokens(plain, PROMPTS[:3], params)
    after = other_draft.stats()
    assert after["spec_fallback_untried"] - before["spec_fallback_untried"] == 3
    assert after["spec_verify_runs"] == before["spec_verify_runs"]
    assert max(in_flight) == 1 and in_flight.count(1) >= 25  # one ahead, step after step
    assert all(plain for plain, ahead in zip(plain_steps, in_flight) if ahead)
    assert sum(plain_steps) >= 29  # every decode-only step (the first one prefills)


def test_a_round_reads_back_only_the_verify_step_and_never_the_drafts_proposals(self_draft,
                                                                               monkeypatch):
    """The draft's round writes its proposals and q into the verify step's inputs on the
    device: per round one draft program and one target step are dispatched, and the only
    arrays the host reads are the target steps' outputs (tokens and which rows emitted), once
    each. Fails when the host reads the draft's proposals or q back before planning the verify
    step (as rounds did before: two readbacks each)."""
    import jax
    from jax._src.array import ArrayImpl

    engine = self_draft.engine
    made = {"propose": [], "step": []}  # each program's outputs, in dispatch order

    def recording(runner, kind):
        program = getattr(runner, kind)

        def call(inputs):
            made[kind].append(program(inputs))
            return made[kind][-1]
        monkeypatch.setattr(runner, kind, call)

    recording(engine.runner, "step")
    recording(engine.proposer.runner, "propose")
    fetched = []  # every device array whose value the host read (np.asarray, np.array, tolist)
    value, asarray, array = ArrayImpl._value, np.asarray, np.array

    def reading(convert):
        def read(a, *args, **kwargs):
            if isinstance(a, jax.Array):
                fetched.append(a)
            return convert(a, *args, **kwargs)
        return read

    before = self_draft.stats()
    with monkeypatch.context() as patched:
        patched.setattr(ArrayImpl, "_value", property(reading(value.fget)))
        patched.setattr(np, "asarray", reading(asarray))
        patched.setattr(np, "array", reading(array))
        _tokens(self_draft, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=21,
                                                         ignore_eos=True))
    rounds = self_draft.stats()["spec_verify_runs"] - before["spec_verify_runs"]
    assert rounds == 5  # every proposal kept: 1 + 5 x (3 + 1) tokens
    assert len(made["propose"]) == rounds and len(made["step"]) == rounds + 1  # + the prefill
    read = {id(a) for a in fetched}
    drafts = {id(a) for out in made["propose"] for a in jax.tree.leaves(out)}
    assert not read & drafts
    steps = [{id(out.tokens), id(out.emitted)} for out in made["step"]]
    assert all(step <= read for step in steps)  # each step's tokens and emitted rows, read once
    assert read == set().union(*steps)  # and nothing else


def test_after_useless_drafts_new_greedy_requests_start_plain(plain, other_draft):
    """Once sequences fell back, the engine stops paying each new request's judgement: after
    three fall-backs at most one new greedy sequence in 8 tries (a trial), the others decode
    plainly from their first step, with the plain tokens."""
    from jaxserve.engine.speculative.fallback import MIN_RUNS

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    _tokens(other_draft, PROMPTS[:3], params)  # three fall-backs, whatever ran before
    before = other_draft.stats()
    assert _tokens(other_draft, PROMPTS[:3], params) == _tokens(plain, PROMPTS[:3], params)
    after = other_draft.stats()
    assert after["spec_trial_every"] >= 8
    assert after["spec_fallback_untried"] - before["spec_fallback_untried"] >= 2
    assert after["spec_verify_runs"] - before["spec_verify_runs"] <= MIN_RUNS
