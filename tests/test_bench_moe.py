"""The MoE benchmark (jaxserve.bench.moe, scripts/bench_moe.py) end to end at its smoke size on
2 simulated devices, and its crossover."""

import json

from jaxserve.bench import moe as bm


def test_crossover_is_the_first_size_where_allgather_wins():
    rows = [dict(devices=8, strategy=s, tokens=t, seconds=v) for s, t, v in [
        ("alltoall", 128, 1.0), ("allgather", 128, 2.0), ("alltoall", 512, 2.0),
        ("allgather", 512, 1.9), ("alltoall", 2048, 5.0), ("allgather", 2048, 3.0)]]
    rows.append(dict(devices=1, strategy="allgather", tokens=16, seconds=0.0))  # other mesh
    c = bm.crossover(rows, 8)
    assert c == {"allgather_wins_from_tokens": 512, "auto_threshold": 128,
                 "sizes": [128, 512, 2048]}
    assert bm.crossover(rows[:2], 8)["allgather_wins_from_tokens"] is None


def test_smoke_run_writes_every_strategy(tmp_path):
    out = tmp_path / "moe.json"
    results = bm.main(bm.parse_args(["--quick", "--devices", "2", "--json", str(out)]))
    saved = json.loads(out.read_text())
    assert saved["prefill"] == json.loads(json.dumps(results["prefill"]))
    for devices in (1, 2):
        rows = [r for r in saved["prefill"] if r["devices"] == devices]
        assert {r["strategy"] for r in rows} == {"dense", "alltoall", "allgather"}
        for r in rows:  # the program does at least the work the math needs
            assert r["seconds"] > 0 and r["executed_flops"] >= r["true_flops"] > 0
            assert r["floor_s"] > 0
    sent = {r["strategy"]: r["bytes_per_layer"] for r in saved["prefill"] if r["devices"] == 2}
    assert sent["dense"] == 0 and sent["alltoall"] > 0 and sent["allgather"] > 0
    assert {r["strategy"] for r in saved["decode"]} == {"alltoall", "allgather"}
