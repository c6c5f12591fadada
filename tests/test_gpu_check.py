"""The first-GPU check's dry run, end to end on one CPU device: every part runs, the JSON
holds the fields a GPU run is read for, and the markdown section is appended."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxserve.bench import gpu_check
from jaxserve.perf.profiles import load_hardware

ROOT = Path(__file__).resolve().parents[1]


def test_a_part_that_fails_or_overruns_is_recorded_and_the_check_goes_on():
    def broken():
        raise ValueError("no device 7")

    failed = gpu_check.run_part(broken, 5)
    assert failed["status"] == "failed" and "ValueError: no device 7" in failed["error"]
    slow = gpu_check.run_part(lambda: time.sleep(3) or {}, 0.2)
    assert slow["status"] == "timed out" and slow["seconds"] < 2
    assert gpu_check.run_part(lambda: {"x": 1}, 5)["result"] == {"x": 1}


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "parity_dense,warp_drive"])
    assert "'warp_drive'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "0"])


def test_dry_run_end_to_end(tmp_path):
    out, md = tmp_path / "gpu.json", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out),
         "--markdown", str(md), "--budget-s", "1500"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and "dry-run" in r["label"]
    assert list(r["parts"]) == list(gpu_check.PARTS)
    bad = {k: v.get("error") for k, v in r["parts"].items() if v["status"] != "ok"}
    assert not bad, bad
    p = {k: v["result"] for k, v in r["parts"].items()}
    assert p["environment"]["platform"] == "cpu" and p["environment"]["devices"] == 1
    assert p["parity_dense"]["ok"] and p["parity_dense"]["relative_error"] <= 1e-4
    assert set(p["parity_moe"]["by_strategy"]) == set(gpu_check.MOE_EXECUTIONS)
    assert p["parity_moe"]["ok"]
    assert "cpu-local" in p["parity_moe"]["auto_threshold"]["source"]
    assert all(s["relative_error"] <= 1e-4 for s in p["parity_moe"]["by_strategy"].values())
    assert p["ragged_all_to_all"]["op"]["ran"] is False  # XLA:CPU: recorded, not raised
    d = p["decode_roofline"]
    assert d["step_ms"] > 0 and d["bytes_per_step"] > 0 and d["measured_bandwidth_Bps"] > 0
    assert d["roofline_ms"] == pytest.approx(d["bytes_per_step"] / d["measured_bandwidth_Bps"]
                                             * 1e3)
    assert d["step_over_roofline"] == pytest.approx(d["step_ms"] / d["roofline_ms"])
    f = p["prefill_peak"]
    assert f["fraction_of_measured_peak"] == pytest.approx(
        f["true_flops"] / (f["step_ms"] / 1e3) / f["measured_matmul_peak_flops_per_s"])
    hw = load_hardware(p["calibrate"]["profile_path"])
    assert hw.name == p["calibrate"]["name"] == "dry-run-cpu"
    pred = p["prediction"]
    assert set(pred["by_profile"]) == {"measured", "cpu-local"}
    for rows in pred["by_profile"].values():
        for kind in ("decode", "prefill"):
            m = pred["measured_s"][kind]
            assert rows[kind]["error"] == pytest.approx(rows[kind]["predicted_device_s"] / m - 1)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n")  # appended, not overwritten
    assert "## GPU check" in text and "[dry-run]" in text
    for name in gpu_check.PARTS:
        assert f"| {name} | ok |" in text
    assert text.split("## GPU check")[1] in run.stdout  # the section is printed too
