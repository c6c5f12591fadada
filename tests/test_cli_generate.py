"""`jaxserve generate` end to end on the embedded model, as a user runs it (a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["def main():\n", "import os\n", "class Parser:\n", "    return "]


def jaxserve(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "jaxserve.cli", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


GREEDY_DEF = ["--prompt", "def ", "--max-tokens", "12", "--temperature", "0"]


@pytest.fixture(scope="module")
def default_run():
    """`jaxserve generate` of GREEDY_DEF with every setting at its default."""
    return jaxserve("generate", *GREEDY_DEF)


def test_generate_prompt_uses_the_embedded_model_by_default(default_run):
    assert default_run.stdout.startswith("def ") and len(default_run.stdout) > len("def ") + 10


def test_batch_generation_resumes_after_a_partial_output_file(tmp_path):
    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"id": i, "prompt": p, "max_tokens": 12}) + "\n"
                              for i, p in enumerate(PROMPTS))
                      + json.dumps({"id": "toks", "prompt": [1, 400, 401], "max_tokens": 5})
                      + "\n")
    full = tmp_path / "full.jsonl"
    jaxserve("generate", "--input", str(inputs), "--output", str(full), "--temperature", "0",
             "--no-progress")
    complete = {r["id"]: r for r in read_jsonl(full)}
    assert set(complete) == {0, 1, 2, 3, "toks"}
    for r in complete.values():
        assert r["finish_reason"] in ("stop", "length") and r["token_ids"]
    assert len(complete["toks"]["token_ids"]) <= 5

    # a job killed after writing one line and half of another
    partial = tmp_path / "partial.jsonl"
    first = json.dumps(complete[2]) + "\n"
    partial.write_text(first + json.dumps(complete[0])[:20])
    result = jaxserve("generate", "--input", str(inputs), "--output", str(partial),
                      "--temperature", "0", "--no-progress")
    assert "wrote 4 outputs" in result.stderr and "1 already there" in result.stderr
    assert partial.read_text().startswith(first)
    resumed = read_jsonl(partial)
    assert sorted(map(str, (r["id"] for r in resumed))) == sorted(map(str, complete))
    assert {r["id"]: r for r in resumed} == complete  # greedy: same as the uninterrupted run


def test_bad_input_file_fails_before_loading_with_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "x"}\n{"id": 2, "prompt": "y", "top_p": 0}\n')
    result = jaxserve("generate", "--input", str(bad), "--output", str(tmp_path / "o.jsonl"),
                      check=False)
    assert result.returncode == 2
    assert "bad.jsonl:2" in result.stderr and "top_p" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args,named", [
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--mesh", "tp=3x"], "tp=3x"),
    (["--input", "nope.jsonl", "--output", "o.jsonl"], "nope.jsonl"),
])
def test_bad_flags_are_reported_by_name(args, named):
    result = jaxserve("generate", *args, check=False)
    assert result.returncode == 2 and named in result.stderr


def test_engine_flags_reach_the_engine_and_bad_ones_are_named(default_run):
    tuned = jaxserve("generate", *GREEDY_DEF, "--max-num-batched-tokens", "32", "--block-size",
                     "8", "--kv-blocks", "70", "--max-num-seqs", "2", "--max-model-len", "256",
                     "--no-prefix-caching", "--routing", "round_robin")
    assert tuned.stdout == default_run.stdout  # settings change the schedule, never the tokens
    bad = jaxserve("generate", "--prompt", "def ", "--max-num-batched-tokens", "8", check=False)
    assert bad.returncode != 0 and "max_num_batched_tokens must be at least 16" in bad.stderr
    bad = jaxserve("generate", "--prompt", "def ", "--routing", "nearest", check=False)
    assert bad.returncode == 2 and "routing must be one of" in bad.stderr
    assert "'nearest'" in bad.stderr
