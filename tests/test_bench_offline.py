"""Fast tests of the offline benchmark (jaxserve.bench.offline, scripts/bench_offline.py): the cost
model, the engine decode window, the mixed workload, argument parsing, and the machine + decode
parts end to end on the tiny model (no HF generate, no warmup)."""

import json
from types import SimpleNamespace

import pytest

from jaxserve.bench import floors, models, offline, steps, workloads

LLAMA_55M = SimpleNamespace(hidden_size=512, head_dim=64, intermediate_size=1408, num_layers=8,
                            num_heads=8, num_kv_heads=2, vocab_size=32000)


def test_step_cost_of_the_55m_model():
    cost = floors.step_cost(LLAMA_55M, batch=8, context=192, itemsize=4, kv_itemsize=4)
    # a float32 decode step of this model reads 156 MB of weights (8 layers of 19.5 MB)
    assert cost["weight_bytes"] == 155_748_352
    assert cost["kv_bytes"] == 8 * 192 * 2 * 2 * 64 * 4 * 8
    matmul = 8 * (512 * 64 * 20 + 3 * 512 * 1408) + 32000 * 512
    assert matmul == floors.matmul_params(vars(LLAMA_55M))
    assert cost["flops"] == 2 * matmul * 8 + 4 * 8 * 8 * 64 * 192 * 8


def test_decode_window_starts_after_the_last_prefill_is_read_back():
    # (time, steps, prefill_steps, in flight, cpu): steps 1-2 prefill, 3-6 decode, 2 in flight
    marks = [(1.0, 1, 1, 1, 0.0), (2.0, 2, 2, 1, 0.0), (3.0, 3, 2, 1, 0.0),
             (4.0, 4, 2, 1, 0.0), (5.0, 5, 2, 1, 0.0), (6.0, 6, 2, 1, 0.0), (7.0, 6, 2, 0, 0.0)]
    w = steps.decode_window(marks)
    # step 2 (the last prefill) is read back by the call at t=3; steps 3..6 remain
    assert w["decode_steps"] == 4 and w["window_s"] == pytest.approx(4.0)
    assert w["ms_per_step"] == pytest.approx(1000.0)


def test_mixed_workload_is_seeded_and_in_range():
    prompts, outs = workloads.mixed_workload(64, 0, 1000)
    again, outs2 = workloads.mixed_workload(64, 0, 1000)
    assert prompts == again and outs == outs2
    assert all(16 <= len(p) <= 1024 for p in prompts) and all(16 <= n <= 512 for n in outs)
    assert all(3 <= t < 1000 for p in prompts for t in p)


def test_parse_args_parts():
    assert offline.parse_args([]).parts == list(offline.PARTS)
    assert offline.parse_args(["--parts", "decode,machine"]).parts == ["machine", "decode"]
    with pytest.raises(SystemExit):
        offline.parse_args(["--parts", "decode,nope"])


def test_machine_and_decode_parts_end_to_end(hf_model_dir, tmp_path):
    _, ours = hf_model_dir("llama")
    out = tmp_path / "bench.json"
    results = offline.main(["--parts", "machine,decode", "--model-dir", str(ours.parent),
                       "--repeats", "1", "--batches", "1,2", "--decode-iters", "4",
                       "--bandwidth-mib", "8", "--no-warmup", "--max-load", "1000",
                       "--json", str(out)])
    assert results["parts_ran"] == ["machine", "decode"] and not results["errors"]
    saved = json.loads(out.read_text())
    assert saved["parts_ran"] == ["machine", "decode"]
    machine = saved["parts"]["machine"]
    assert machine["read_GBps_2_threads"] > 0 and machine["jax_dot_2048_GFLOPs"] > 0
    for b in ("1", "2"):
        d = saved["parts"]["decode"]["batches"][b]
        assert d["ms_per_step"] > 0 and d["floor_ms"] > 0 and d["xla_stack_ms"] > 0
        assert d["ratio_to_floor"] == pytest.approx(d["ms_per_step"] / d["floor_ms"])


def test_a_checkpoint_that_does_not_load_is_reconverted(hf_model_dir, tmp_path):
    import shutil

    hf, ours = hf_model_dir("llama")
    root = tmp_path / "model"
    shutil.copytree(hf, root / "hf")
    shutil.copytree(ours, root / "jaxserve")
    config = json.loads((root / "jaxserve" / "config.json").read_text())
    good = config["intermediate_size"]
    config["intermediate_size"] = 2 * good  # the stored tensors no longer match
    (root / "jaxserve" / "config.json").write_text(json.dumps(config))
    assert models.ensure_current_checkpoint(root / "hf", root / "jaxserve")
    assert json.loads((root / "jaxserve" / "config.json").read_text())["intermediate_size"] == good
    assert not models.ensure_current_checkpoint(root / "hf", root / "jaxserve")
