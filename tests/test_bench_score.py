"""scripts/bench_score.py (jaxserve/bench/score_prefix.py): the seeded workload, argument checks,
and both settings end to end on the embedded model at a tiny size, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

from jaxserve.bench import score_prefix

REPO = Path(__file__).resolve().parent.parent


def bench_score(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "bench_score.py"),
                           *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_workload_is_seeded_and_shares_prefixes():
    kwargs = dict(requests=6, prefixes=2, prefix_len=24, suffix_min=2, suffix_max=9,
                  candidates=3, candidate_max=4)
    prompts, candidates = score_prefix.make_workload(512, **kwargs)
    assert (prompts, candidates) == score_prefix.make_workload(512, **kwargs)
    assert len(prompts) == 6 and all(26 <= len(p) <= 33 for p in prompts)
    assert [p[:24] for p in prompts[2:]] == [p[:24] for p in prompts[:2]] * 2
    assert all(len(c) == 3 and all(1 <= len(x) <= 4 for x in c) for c in candidates)


def test_bad_arguments_are_refused_by_name():
    result = bench_score("--requests", "0")
    assert result.returncode == 2 and "--requests must be at least 1, got 0" in result.stderr
    result = bench_score("--suffix-min", "9", "--suffix-max", "3")
    assert result.returncode == 2 and "--suffix-max (3) is below --suffix-min (9)" in result.stderr


def test_both_settings_score_alike_and_the_cache_saves_its_hits(tmp_path):
    out = tmp_path / "score.json"
    result = bench_score("--requests", 6, "--prefixes", 2, "--prefix-len", 40, "--repeats", 1,
                         "--json", out)
    assert result.returncode == 0, result.stderr
    assert "| prefix cache hit rate |" in result.stdout
    data = json.loads(out.read_text())
    on, off = data["runs"]["prefix caching"], data["runs"]["no prefix caching"]
    assert on["score_prefix_cache_hits"] > 0 and off["score_prefix_cache_hits"] == 0
    # every cached token is a token not computed again, and nothing else changes
    assert off["score_prefill_tokens"] - on["score_prefill_tokens"] == \
        on["score_prefix_cache_hits"]
    assert on["true_flops"] < off["true_flops"]
    assert data["max_logprob_difference"] < 1e-4
