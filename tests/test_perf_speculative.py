"""Speculative decoding in the performance model (jaxserve.perf.speculative): tokens per step
from the acceptance rate, a round's time with and without a draft beside the verify, `jaxserve
plan --speculative-acceptance`, and SwiftSpec's published row. No jax, no device."""

import dataclasses
import json

import pytest

from jaxserve.bench import validate_published as vp
from jaxserve.cli import main
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import load_hardware
from jaxserve.perf.serving import colocated
from jaxserve.perf.speculative import Speculation
from jaxserve.perf.step import Deployment, decode_chunk
from jaxserve.perf.workload import Workload

LLAMA_70B = vp.MODELS["Llama-3-70B"]
# one request, as a latency-bound user sees it
ONE = Workload.from_dict({"prompt_len": 512, "output_len": 512, "concurrency": 1})


@pytest.fixture(scope="module")
def target():
    return Deployment(LLAMA_70B, "tp=4", "tp", load_hardware("h100"), Precision("bfloat16"))


def test_tokens_per_step_follow_the_acceptance_rate():
    assert Speculation(0.0, 4).tokens_per_step == 1  # every first proposal rejected
    assert Speculation(1.0, 4).tokens_per_step == 5  # all kept, plus the target's own
    assert Speculation(0.5, 2).tokens_per_step == pytest.approx(1 + 0.5 + 0.25)


def test_speculation_pays_only_when_proposals_are_kept(target):
    plain = colocated(target, ONE)
    useless, good = (colocated(target, ONE, speculation=Speculation(a, 4)) for a in (0.0, 0.8))
    assert useless.tpot_s > plain.tpot_s  # the verify runs 5 tokens, and keeps one
    assert good.tpot_s < plain.tpot_s / 2.5  # weight streaming is shared by tau = 3.36 tokens
    # a step verifies 1 + k tokens of the request (beside the steady state's prompt share)
    assert good.step.tokens == pytest.approx(5 + 512 * Speculation(0.8, 4).tokens_per_step / 512)
    assert good.output_tokens_per_s == pytest.approx(Speculation(0.8, 4).tokens_per_step
                                                     / good.step.total_s)


def test_a_draft_beside_the_verify_is_off_the_critical_path(target):
    draft_config = dataclasses.replace(LLAMA_70B, num_layers=8)  # a tenth of the target
    draft = Deployment(draft_config, "tp=4", "tp", load_hardware("h100"), Precision("bfloat16"))
    free = colocated(target, ONE, speculation=Speculation(0.8, 4))
    after = colocated(target, ONE, speculation=Speculation(0.8, 4, draft))
    beside = colocated(target, ONE, speculation=Speculation(0.8, 4, draft, asynchronous=True))
    draft_s = 4 * draft.step([decode_chunk(ONE.mean_decode_context, 1)]).total_s
    tau = Speculation(0.8, 4).tokens_per_step
    assert after.tpot_s == pytest.approx(free.tpot_s + draft_s / tau)
    assert beside.tpot_s == pytest.approx(max(free.tpot_s, draft_s / tau))
    assert beside.tpot_s < after.tpot_s


@pytest.mark.parametrize("acceptance, k, error", [
    (1.5, 4, "acceptance must be a number in \\[0, 1\\], got 1.5"),
    (0.5, 0, "num_speculative_tokens must be a positive integer, got 0"),
])
def test_bad_speculation_inputs_are_named(acceptance, k, error):
    with pytest.raises(ValueError, match=error):
        Speculation(acceptance, k)


def test_plan_takes_the_acceptance_rate(tmp_path, capsys):
    config = tmp_path / "config.json"
    LLAMA_70B.save(config)
    common = ["plan", "--model", str(config), "--devices", "8", "--hardware", "h100",
              "--workload", str(tmp_path / "w.json"), "--json", str(tmp_path / "out.json")]
    (tmp_path / "w.json").write_text('{"prompt_len": 512, "output_len": 512, "concurrency": 1}')
    assert main(common) == 0
    plain = {c["layout"]: c for c in json.loads(
        (tmp_path / "out.json").read_text())["layouts"] if c["kind"] == "colocated"}
    assert main(common + ["--speculative-acceptance", "0.8", "--num-speculative-tokens",
                          "4"]) == 0
    spec = {c["layout"]: c for c in json.loads(
        (tmp_path / "out.json").read_text())["layouts"]}
    assert {c["kind"] for c in spec.values()} == {"colocated"}  # no splits with speculation
    for label, c in spec.items():
        assert c["tpot_s"] < plain[label]["tpot_s"] / 2
    capsys.readouterr()
    assert main(common + ["--num-speculative-tokens", "4"]) != 0
    assert "need --speculative-acceptance" in capsys.readouterr().err
    assert main(common + ["--speculative-acceptance", "2"]) != 0
    assert "acceptance must be a number in [0, 1], got 2.0" in capsys.readouterr().err


def test_swiftspec_is_a_validation_row_with_its_source():
    row = next(r for r in vp.ROWS if r.source == "SWIFT")
    assert (row.model, row.published, row.kind) == ("Llama-3-70B", 348.0, "spec")
    assert "https://arxiv.org/abs/2506.11309" in row.citation and "348" in row.citation
    scored = vp.score([row])[0]
    assert scored["unit"] == "tok/s" and 100 < scored["predicted"] < 1000
