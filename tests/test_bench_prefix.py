"""Fast test of the prefix caching benchmark (jaxserve.bench.prefix, scripts/bench_prefix.py):
the seeded workload, argument checks, and both parts end to end on the tiny model at a tiny size."""

import json

import pytest

from jaxserve.bench import prefix as bp

TINY = ["--prefixes", "2", "--prefix-len", "24", "--requests", "6", "--suffix-min", "2",
        "--suffix-max", "9", "--max-tokens", "3", "--no-warmup"]


def test_workload_is_seeded_and_shares_prefixes():
    args = bp.parse_args(TINY)
    prompts = bp.workload(args, 512)
    assert prompts == bp.workload(args, 512)
    assert len(prompts) == 6 and all(26 <= len(p) <= 33 for p in prompts)
    assert len({tuple(p[:24]) for p in prompts}) <= 2
    assert all(3 <= t < 512 for p in prompts for t in p)


@pytest.mark.parametrize("argv,error", [
    (["--parts", "caching,nope"], "--parts: \\['nope'\\]"),
    (["--policies", "random"], "--policies: \\['random'\\]"),
    (["--requests", "0"], "--requests must be >= 1, got 0"),
    (["--suffix-min", "9", "--suffix-max", "3"], "--suffix-max \\(3\\) is below"),
])
def test_bad_arguments_are_refused(argv, error, capsys):
    with pytest.raises(SystemExit):
        bp.parse_args(argv)
    assert any(__import__("re").search(error, line) for line in
               capsys.readouterr().err.splitlines())


def test_both_parts_end_to_end(hf_model_dir, tmp_path):
    _, ours = hf_model_dir("llama")
    out = tmp_path / "bench.json"
    results = bp.main(TINY + ["--model-dir", str(ours.parent), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["requests"] == 6 and saved["machine"]["cpu_count"]
    caching = results["parts"]["caching"]
    on, off = caching["runs"]["prefix caching"], caching["runs"]["no prefix caching"]
    assert caching["same_tokens"] == 6
    assert on["hit_rate"] > 0 == off["hit_rate"]
    assert on["prefill_tokens"] < off["prefill_tokens"] and on["true_flops"] < off["true_flops"]
    routing = results["parts"]["routing"]["runs"]
    assert set(routing) == {"prefix", "round_robin"}
    for run in routing.values():
        assert sum(run["replica_prefill_tokens"]) == run["prefill_tokens"]
    assert routing["prefix"]["hit_rate"] >= routing["round_robin"]["hit_rate"]
