"""Orbax round trips, restores onto other meshes, and checkpoints that do not match the model."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxserve import LLM
from jaxserve.checkpoint import (CheckpointError, convert_hf, flat_params, restore_model,
                                 save_params)
from jaxserve.cli import main as cli_main
from jaxserve.sharding import Layout
from jaxserve.package_data import embedded_model

PROMPT = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


def leaves_by_name(state):
    return {name: np.asarray(leaf) for name, leaf in flat_params(state).items()}


def test_save_restore_is_bitwise_equal(hf_model_dir, tmp_path):
    _, model_dir = hf_model_dir("qwen3")
    layout = Layout.create(None, "tp")
    _, _, params = restore_model(model_dir, layout)
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("params"))
    save_params(copy / "params", params)
    _, _, again = restore_model(copy, layout)
    a, b = leaves_by_name(params), leaves_by_name(again)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_restore_places_each_array_in_its_sharding(hf_model_dir):
    _, model_dir = hf_model_dir("llama")
    layout = Layout.create("tp=4", "tp")
    # as declared, [embed, heads, head_dim]; the "out_in" layout: tests/test_weight_layout.py
    _, _, params = restore_model(model_dir, layout, weight_layout="in_out")
    q_proj = params["layers"][0]["attn"]["q_proj"][...]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "tp", None)
    assert {s.data.shape for s in q_proj.addressable_shards} == {(64, 2, 8)}
    k_proj = params["layers"][0]["attn"]["k_proj"][...]  # 2 kv heads < tp=4: each repeated
    assert k_proj.sharding.spec == jax.sharding.PartitionSpec(None, "tp", None)
    assert k_proj.shape == (64, 4, 8)
    assert {s.data.shape for s in k_proj.addressable_shards} == {(64, 1, 8)}


def test_restore_onto_another_mesh_gives_identical_logits(hf_model_dir):
    _, model_dir = hf_model_dir("mistral")
    single = LLM(model_dir).logits(PROMPT)[0]
    for mesh, rules in [("tp=4", "tp"), ("dp=2,tp=2", "dp_tp")]:
        other = LLM(model_dir, mesh=mesh, rules=rules).logits(PROMPT)[0]
        np.testing.assert_allclose(other, single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_bfloat16_conversion_stores_bfloat16(hf_model_dir, tmp_path):
    hf_dir, _ = hf_model_dir("llama")
    config = convert_hf(hf_dir, tmp_path / "bf16", dtype="bfloat16")
    assert config.dtype == "bfloat16"
    logits = LLM(tmp_path / "bf16").logits(PROMPT)[0]
    reference = LLM(hf_model_dir("llama")[1]).logits(PROMPT)[0]
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


def test_sharded_hf_checkpoint_converts_like_a_single_file(hf_model_dir, tmp_path):
    hf_dir, model_dir = hf_model_dir("llama")
    sharded = tmp_path / "hf_sharded"
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    shutil.copyfile(embedded_model() / "tokenizer.model", sharded / "tokenizer.model")
    convert_hf(sharded, tmp_path / "out")
    assert (tmp_path / "out/tokenizer.model").read_bytes() == \
        (sharded / "tokenizer.model").read_bytes()
    a = LLM(tmp_path / "out").logits(PROMPT)[0]
    b = LLM(model_dir).logits(PROMPT)[0]
    assert np.array_equal(a, b)


def test_hf_checkpoint_with_missing_and_misshaped_tensors_lists_them_all(hf_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_dir, _ = hf_model_dir("llama")
    bad = tmp_path / "bad_hf"
    shutil.copytree(hf_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    tensors["model.layers.9.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        convert_hf(bad, tmp_path / "out")
    msg = str(err.value)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.9.extra.weight"):
        assert name in msg


def test_orbax_checkpoint_with_missing_or_misshaped_params_is_rejected(hf_model_dir, tmp_path):
    _, model_dir = hf_model_dir("llama")
    _, _, params = restore_model(model_dir, Layout.create(None, "tp"))
    flat = leaves_by_name(params)
    del flat["layers/1/mlp/down_proj"]
    flat["layers/0/attn/q_proj"] = np.zeros((64, 8, 4), np.float32)
    flat["layers/0/attn/bias"] = np.zeros((4,), np.float32)
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad, ignore=shutil.ignore_patterns("params"))
    save_params(bad / "params", flat)
    with pytest.raises(CheckpointError) as err:
        LLM(bad)
    msg = str(err.value)
    assert "layers/1/mlp/down_proj" in msg and "layers/0/attn/bias" in msg
    assert "layers/0/attn/q_proj: expected (64, 8, 8), found (64, 8, 4)" in msg


def test_unsupported_config_field_is_rejected_by_name(hf_model_dir, tmp_path):
    hf_dir, _ = hf_model_dir("mistral")
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["sliding_window"] = 128
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding_window=128"):
        convert_hf(bad, tmp_path / "out")


def test_cli_convert_and_shard_info(hf_model_dir, tmp_path, capsys):
    hf_dir, _ = hf_model_dir("llama")
    assert cli_main(["convert", "--hf", str(hf_dir), "--out", str(tmp_path / "m")]) == 0
    assert cli_main(["shard-info", "--model", str(tmp_path / "m"), "--rules", "tp",
                     "--mesh", "tp=4"]) == 0
    out = capsys.readouterr().out
    # q_proj 64x8x8 float32 split 4 ways over heads = 4096 bytes per device
    line = next(l for l in out.splitlines() if l.startswith("layers/0/attn/q_proj"))
    assert "P(None, 'tp', None)" in line and line.rstrip().endswith("4,096")
    assert "total per device" in out
    assert cli_main(["shard-info", "--model", str(tmp_path / "m"), "--rules", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
