"""The local validation of the performance model: its out-of-sample suite keeps to shapes
`jaxserve calibrate` never timed, says which it did time, and writes its rows as JSON and a
table (a --quick run: one tiny model; no timing is asserted beyond its structure)."""

import dataclasses
import json

import pytest

from jaxserve.bench import out_of_sample, validate_perf
from jaxserve.config import ModelConfig
from jaxserve.perf import calibrate
from jaxserve.perf.profiles import HostOverhead

# the in-sample model (bench/models.py's "55m" preset, as a ModelConfig)
IN_SAMPLE = ModelConfig(family="llama", vocab_size=32000, hidden_size=512,
                        intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2,
                        head_dim=64, max_position_embeddings=2048)


@pytest.mark.parametrize("quick", [False, True])
def test_no_out_of_sample_model_has_a_shape_calibration_timed(quick):
    timed = calibrate.timed_shapes("cpu", quick)
    for m in out_of_sample.SUITE + out_of_sample.QUICK_SUITE:
        assert out_of_sample.overlaps(ModelConfig(**m.shape), timed) == [], m.name


def test_the_overlap_check_finds_the_in_sample_model_calibrated():
    """The 55M model has calibration's width, its q/o and k/v products and its KV block."""
    found = out_of_sample.overlaps(IN_SAMPLE, calibrate.timed_shapes())
    assert found == ["hidden width 512", "product (512, 128)", "product (512, 512)",
                     "KV block (kv_heads, head_dim) (2, 64)"]
    mlp_timed = dataclasses.replace(IN_SAMPLE, intermediate_size=1536)
    assert "product (1536, 512)" in out_of_sample.overlaps(mlp_timed, calibrate.timed_shapes())


def test_the_suite_covers_widths_moe_gqa_and_long_context():
    configs = [(m, ModelConfig(**m.shape)) for m in out_of_sample.SUITE]
    assert len({c.hidden_size for _, c in configs}) == len(configs) >= 4
    assert any(c.is_moe for _, c in configs)
    assert len({c.q_per_kv for _, c in configs}) >= 3
    assert max(ctx for m, _ in configs for _, ctx in m.decodes) >= 4096
    assert max(cached for m, _ in configs for cached, _ in m.prefills) >= 2048
    for m, c in configs:  # every step fits the model it runs on
        assert all(ctx <= c.max_position_embeddings for _, ctx in m.decodes)
        assert all(a + n <= c.max_position_embeddings for a, n in m.prefills)


@pytest.mark.parametrize("quick", [False, True])
def test_timed_shapes_name_every_shape_calibrate_times(monkeypatch, quick):
    """calibrate with its timers replaced by recorders: every width, square and KV block it
    asks to time is one `timed_shapes` lists."""
    asked = {"widths": set(), "square": set()}

    def rates(dtype, width, rows, mib, repeats):
        asked["widths"].add(width)
        return {r: 1e9 * r for r in rows}

    monkeypatch.setattr(calibrate, "matmul_rates", rates)
    monkeypatch.setattr(calibrate, "square_matmul_rate",
                        lambda dtype, n, repeats: asked["square"].add(n) or 1e12)
    monkeypatch.setattr(calibrate, "read_bandwidth", lambda mib, repeats: 1e10)
    monkeypatch.setattr(calibrate, "kv_read_bandwidth", lambda mib, repeats: 1e9)
    monkeypatch.setattr(calibrate, "layer_overhead", lambda repeats: 1e-5)
    monkeypatch.setattr(calibrate, "all_reduce_link", lambda repeats, bandwidth: None)
    monkeypatch.setattr(calibrate, "host_overhead",
                        lambda model_dir, batches, new_tokens: (HostOverhead(1e-3), {}))
    hw = calibrate.calibrate(quick=quick, progress=lambda line: None)
    timed = calibrate.timed_shapes("cpu", quick)
    assert asked["widths"] and asked["widths"] <= set(timed["hidden_widths"])
    assert {(n, n) for n in asked["square"]} <= set(timed["products"])
    for w in asked["widths"]:
        assert set(calibrate.layer_products(w)) <= set(timed["products"])
    assert {int(w) for curves in hw.matmul_efficiency.values() for w in curves} \
        == asked["widths"]


def test_a_quick_out_of_sample_run_writes_its_rows_as_json_and_a_table(tmp_path, capsys):
    out = tmp_path / "oos.json"
    result = validate_perf.main(["--suite", "out-of-sample", "--quick", "--repeats", "2",
                                 "--json", str(out), "--max-load", "1000", "--load-wait", "0"])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=float))
    assert result["suite"] == "out-of-sample" and "shared" in result["machine"]
    assert result["calibration_timed"]["hidden_widths"] == calibrate.timed_shapes(
        "cpu", False)["hidden_widths"]  # the committed profile is a full calibration
    cases = result["cases"]
    assert [(c["model"], c["part"]) for c in cases] == [
        (m.name, part) for m in out_of_sample.QUICK_SUITE
        for part, steps in (("decode", m.decodes), ("prefill", m.prefills)) for _ in steps]
    for c in cases:
        assert c["measured"] > 0 and c["predicted"] > 0 and c["unit"] == "ms"
        assert c["error"] == pytest.approx(c["predicted"] / c["measured"] - 1)
        assert len(c["detail"]["samples_ms"]) == 2
        assert c["measured"] == pytest.approx(sorted(c["detail"]["samples_ms"])[0] / 2
                                              + sorted(c["detail"]["samples_ms"])[1] / 2)
        assert c["detail"]["calibration_overlap"] == []
        assert set(c["detail"]["breakdown_s"]) >= {"compute", "memory bandwidth"}
    assert "calibration timed: hidden widths" in printed
    table = printed[printed.index("| model | part | case |"):].splitlines()
    assert len(table) == 2 + len(cases)
    first = out_of_sample.QUICK_SUITE[0]
    assert table[2].startswith(f"| {first.name} | decode | batch {first.decodes[0][0]}, ")
    assert result["within_target"] == sum(abs(c["error"]) <= 0.25 for c in cases)


def test_the_tp_layer_programs_split_the_layers_as_tp_does():
    """With its all-reduces the split program computes the whole layers; without them it does
    not (each device keeps a partial sum): the timed difference is the all-reduces'."""
    import numpy as np

    programs = calibrate.tp_layer_programs(width=32, intermediate=48, rows=2, layers=2)
    out = {name: np.asarray(f(x, w)) for name, (f, x, w) in programs.items()}
    np.testing.assert_allclose(out["tp2_with_all_reduces"], out["one_device"], rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(out["tp2_all_reduces_replaced"], out["one_device"], rtol=1e-2)
    timed = calibrate.tp_layer_all_reduces(32, 48, 2, 2, repeats=1)
    assert timed["all_reduces"] == 4 and timed["all_reduce_bytes"] == 2 * 32 * 4
    assert timed["seconds_per_all_reduce"] == pytest.approx(
        (timed["tp2_with_all_reduces"] - timed["tp2_all_reduces_replaced"]) / 4)
