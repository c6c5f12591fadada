"""The TP sweep (jaxserve.bench.tp_sweep, scripts/tp_sweep.py) end to end on the 8 simulated
devices (quick model and workload), and its pieces: the splits, the Amdahl fit, predicted
columns."""

import csv
import json
import math

import pytest

from jaxserve.bench import tp_sweep as sweep


def test_the_fit_recovers_amdahls_p():
    p, t1 = 0.8, 10.0  # T(t) = T1 ((1 - p) + p / t)
    rows = [{"tp": t, "step_ms": t1 * ((1 - p) + p / t)} for t in (1, 2, 4, 8)]
    fit = sweep.fit_amdahl(rows)
    assert fit["p"] == pytest.approx(p) and fit["serial_ms"] == pytest.approx(2.0)
    assert fit["speedup"]["8"] == pytest.approx(1 / (0.2 + 0.1))
    assert sweep.fit_amdahl(rows[:1]) is None
    faster_than_linear = [{"tp": t, "step_ms": 10.0 / t ** 2} for t in (1, 2, 4, 8)]
    assert sweep.fit_amdahl(faster_than_linear)["p"] == 1.0
    slower = [{"tp": t, "step_ms": 10.0 + t} for t in (1, 2, 4, 8)]
    assert sweep.fit_amdahl(slower)["p"] == 0.0


def test_splits_name_the_rules_and_skip_what_the_heads_refuse():
    from jaxserve.config import ModelConfig

    dense = ModelConfig(**dict(sweep.PRESETS["quick"], num_heads=4, num_kv_heads=4))
    rows = {r["tp"]: r for r in sweep.splits(8, dense)}
    assert [(rows[t]["mesh"], rows[t]["rules"]) for t in (1, 2, 4)] == [
        ("dp=8", "dp"), ("dp=4,tp=2", "dp_tp"), ("dp=2,tp=4", "dp_tp")]
    assert "q_heads" in rows[8]["skipped"]  # 4 heads cannot split 8 ways
    moe = ModelConfig(**dict(sweep.PRESETS["quick"], family="qwen3_moe", num_experts=8,
                             num_experts_per_tok=2, moe_intermediate_size=32))
    assert [(r["mesh"], r["rules"]) for r in sweep.splits(4, moe)] == [
        ("ep=4", "ep"), ("tp=2,ep=2", "tp_ep"), ("tp=4", "tp")]


def test_predicted_columns_come_from_a_file_by_mesh_and_rules(tmp_path):
    as_json = tmp_path / "predicted.json"
    as_json.write_text(json.dumps([{"mesh": "tp=8", "rules": "tp", "throughput_tok_s": 123.0,
                                    "note": "model"}]))
    as_csv = tmp_path / "predicted.csv"
    as_csv.write_text("mesh,rules,throughput_tok_s\ntp=8,tp,123\n")
    for path in (as_json, as_csv):
        rows = [{"mesh": "tp=8", "rules": "tp"}, {"mesh": "dp=8", "rules": "dp"}]
        sweep.add_predictions(rows, sweep.read_predictions(path))
        assert rows == [{"mesh": "tp=8", "rules": "tp", "predicted_throughput_tok_s": 123.0},
                        {"mesh": "dp=8", "rules": "dp"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"throughput_tok_s": 1.0}]))
    with pytest.raises(ValueError, match="row 0"):
        sweep.read_predictions(bad)


def test_the_sweep_runs_on_8_devices_and_writes_csv_and_png(tmp_path):
    out = {k: tmp_path / f"sweep.{k}" for k in ("csv", "png", "json")}
    results = sweep.main(["--devices", "8", "--quick", "--predict", "cpu-local",
                          *[x for k, p in out.items() for x in (f"--{k}", str(p))]])
    with open(out["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["replicas"], r["tp"]) for r in rows] == [("8", "1"), ("4", "2"), ("2", "4"),
                                                        ("1", "8")]
    for r in rows:  # 8 requests x 8 greedy tokens; each decode token is a step of its own
        assert int(r["output_tokens"]) == 64 and int(r["steps"]) >= 8
        assert float(r["throughput_tok_s"]) == pytest.approx(64 / float(r["wall_s"]), rel=1e-3)
        assert float(r["step_ms"]) == pytest.approx(
            float(r["device_ms_per_step"]) + float(r["host_only_ms_per_step"]), rel=1e-3)
    capacity = [int(r["kv_capacity_seqs"]) for r in rows]
    assert capacity == sorted(capacity) and capacity[0] < capacity[-1]  # fewer weights per
    # device: more room for KV; the performance model must rank the splits the same way
    predicted = [float(r["predicted_kv_capacity_seqs"]) for r in rows]
    assert predicted == sorted(predicted) and predicted[0] < predicted[-1]
    for r in rows:  # the model's step time and throughput are one operating point
        assert all(math.isfinite(float(r[f"predicted_{k}"])) for k in ("throughput_tok_s",
                                                                       "step_ms"))
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out["json"].read_text())
    best = max(rows, key=lambda r: float(r["throughput_tok_s"]))  # t_e: the fastest split
    assert saved["simulated"] and saved["t_e"]["sequence_parallel"] == int(best["tp"])
    assert results["amdahl"]["sequence_parallel"]["p"] == saved["amdahl"]["sequence_parallel"]["p"]
