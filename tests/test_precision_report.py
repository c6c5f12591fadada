"""The precision accuracy report (jaxserve.bench.accuracy) and the precision part of the offline
benchmark (jaxserve.bench.offline_precision, peers.py's llama.cpp peer).

The accuracy report runs on the embedded model with few tokens. Tolerances: a fresh float32
engine must reproduce the reference exactly (same programs, same inputs: CPU XLA is
deterministic), so its error is 0 and its agreement 1.0; int8 weights (per-channel scales) must
move the logits (error > 0, or the format did not apply) and stay within 3 % of max |logit|,
the bound tests/test_quantization.py uses for int8 on the HF-parity configs (measured here
0.3 %); its greedy agreement is asserted >= 0.75, as there (measured 1.0)."""

import json
import math
import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest

from jaxserve.bench import accuracy, formats, offline, offline_precision, peers
from jaxserve.bench.floors import step_cost
from jaxserve.package_data import embedded_model

NEW_TOKENS = 8
FUTURE = {"not_a_setting_yet": "int8"}


@pytest.fixture(scope="module")
def report():
    names = ["fp32", "int8", "future"]
    return accuracy.measure_model(embedded_model(), names, {**formats.FORMATS, "future": FUTURE},
                                  prompts=2, prompt_len=8, new_tokens=NEW_TOKENS, windows=1,
                                  window_len=32)


def test_a_fresh_float32_engine_matches_the_reference_exactly(report):
    row = report["formats"]["fp32"]
    assert row["max_abs_logit_error"] == 0 and row["mean_abs_logit_error"] == 0
    assert row["greedy_agreement"] == 1.0 and row["prompts_equal"] == 2
    assert row["perplexity"] == report["reference"]["perplexity"]


def test_int8_weights_move_the_logits_within_the_stated_tolerance(report):
    row = report["formats"]["int8"]
    assert row["overrides"]["quantization"] == "int8"
    assert 0 < row["max_rel_logit_error"] < 0.03
    assert 0 < row["mean_abs_logit_error"] < row["max_abs_logit_error"]
    assert row["greedy_agreement"] >= 0.75
    assert row["perplexity"] == pytest.approx(report["reference"]["perplexity"], rel=0.05)


def test_the_embedded_model_predicts_its_held_text_far_better_than_chance(report):
    assert report["reference"]["perplexity"] < 2048 / 10  # vocabulary 2048


def test_a_format_whose_setting_does_not_exist_is_skipped_naming_it(report):
    row = report["formats"]["future"]
    assert "not_a_setting_yet" in row["skipped"] and "'future'" in row["skipped"]
    assert "future" in accuracy.table("embedded", report)


def test_the_held_text_is_the_split_the_embedded_model_did_not_train_on(report):
    from jaxserve.bench.training import split_files, stdlib_files

    train, held = split_files(stdlib_files())
    assert report["held_text"]["files"] == [f.name for f in held]
    assert not set(report["held_text"]["files"]) & {f.name for f in train}


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    ids = [3, 1, 4, 1, 5]
    assert accuracy.perplexity([np.zeros((5, 7), np.float32)], [ids]) == pytest.approx(7.0)
    sure = np.full((5, 7), -30.0, np.float32)
    sure[np.arange(4), ids[1:]] = 30.0  # every next token predicted with certainty
    assert accuracy.perplexity([sure], [ids]) == pytest.approx(1.0)


def test_formats_and_arguments_are_checked():
    assert formats.overrides_of("int8") == {"dtype": "float32", "quantization": "int8"}
    assert formats.skip_reason("int8", formats.overrides_of("int8")) is None
    with pytest.raises(ValueError, match="int9"):
        formats.parse_formats("fp32,int9")
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--formats", "int9"])
    with pytest.raises(SystemExit):
        offline.parse_args(["--peer", "vllm"])
    with pytest.raises(SystemExit):
        offline.parse_args(["--gguf-types", "q4_0"])
    args = offline.parse_args(["--parts", "precision", "--peer", "llama.cpp"])
    assert args.parts == ["precision"] and args.peer == ["llama.cpp"]


# ---- the llama.cpp peer ----

def _executable(path):
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_llama_cpp_is_skipped_with_a_message_when_no_binary_is_found(tmp_path):
    with pytest.raises(peers.PeerUnavailable, match="llama-batched-bench.*--llama-cpp-dir"):
        peers.find_llama_cpp(None, {"PATH": str(tmp_path)})
    with pytest.raises(peers.PeerUnavailable, match="does not exist"):
        peers.find_llama_cpp(tmp_path / "nowhere", {})
    ctx = SimpleNamespace(args=SimpleNamespace(llama_cpp_dir=None))
    old = dict(os.environ)
    try:
        os.environ.pop(peers.LLAMA_CPP_ENV, None)
        os.environ["PATH"] = str(tmp_path)
        assert "llama.cpp skipped" in offline_precision.run_llama_cpp(ctx)["skipped"]
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_llama_cpp_is_found_from_its_directory_or_the_environment(tmp_path):
    binary = _executable((tmp_path / "build" / "bin").mkdir(parents=True) or
                         tmp_path / "build" / "bin" / peers.LLAMA_CPP_BENCH)
    with pytest.raises(peers.PeerUnavailable, match="convert_hf_to_gguf.py"):
        peers.find_llama_cpp(tmp_path, {})
    convert = tmp_path / peers.LLAMA_CPP_CONVERT
    convert.write_text("")
    assert peers.find_llama_cpp(tmp_path, {}) == (binary, convert)
    assert peers.find_llama_cpp(None, {peers.LLAMA_CPP_ENV: str(tmp_path)}) == (binary, convert)
    # on PATH: the converter from the source tree above the binary
    assert peers.find_llama_cpp(None, {"PATH": str(binary.parent)}) == (binary, convert)


def test_batched_bench_results_are_read_per_batch():
    lines = [json.dumps({"pp": 128, "tg": 128, "pl": b, "t_pp": 0.1 * b, "t_tg": 2.0 + b,
                         "t": 2.0 + 1.1 * b}) for b in (1, 8)]
    text = "llama_model_load: ...\n" + "\n".join(lines) + "\nmain: done\n"
    rows = peers.parse_batched_bench(text)
    assert sorted(rows) == [1, 8] and rows[8]["t_tg"] == 10.0 and rows[1]["pl"] == 1


# ---- floors ----

LLAMA_55M = SimpleNamespace(hidden_size=512, head_dim=64, intermediate_size=1408, num_layers=8,
                            num_heads=8, num_kv_heads=2, vocab_size=32000)


def test_generate_floor_adds_the_prefill_and_each_decode_step():
    w, kv, bw, peak = 1e8, 2048.0, 1e10, 1e11
    f = offline_precision.generate_floor(LLAMA_55M, 8, w, kv, bw, peak, prompt=16, new=3)
    # one prefill (16 tokens' KV written) and decode steps at contexts 17 and 18
    assert f["byte_floor_s"] == pytest.approx((3 * w + kv * 8 * (16 + 17 + 18)) / bw)
    per_token = step_cost(LLAMA_55M, 1, 0, 1, 1)["flops"]
    head = 2 * 32000 * 512
    attn = 4 * 8 * 8 * 64
    prefill = 8 * ((per_token - head) * 16 + head + attn * 16 * 17 / 2)
    decode = sum(8 * (per_token + attn * c) for c in (17, 18))
    assert f["flop_floor_s"] == pytest.approx((prefill + decode) / peak)
    assert max(f["byte_floor_s"], f["flop_floor_s"]) <= f["floor_s"] <= \
        f["byte_floor_s"] + f["flop_floor_s"]


def test_a_float32_engine_reads_the_bytes_the_cost_model_counts():
    from jaxserve import LLM

    llm = LLM(embedded_model(), kv_blocks=8, compilation="on_use")
    weights, kv_token = offline_precision.engine_read_bytes(llm)
    cost = step_cost(llm.config, 1, 1, 4, 4)
    assert weights == cost["weight_bytes"] and kv_token == cost["kv_bytes"]
    assert math.isclose(kv_token, 4 * 2 * 2 * 16 * 4)  # layers x (k, v) x kv heads x head_dim
