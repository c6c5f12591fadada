"""`jaxserve plan --disaggregate` (jaxserve.perf.disaggregate): colocated engines against
prefill/decode splits with each role's precision on its own and the handoff over a given
interconnect. No jax, no device: the analytical model's ranking against hand arithmetic."""

import json

import pytest

from jaxserve.cli import main
from jaxserve.config import ModelConfig
from jaxserve.perf.disaggregate import interconnect, plan_disaggregated
from jaxserve.perf.plan import SLO, PlanError
from jaxserve.perf.profiles import load_hardware
from jaxserve.perf.workload import Workload

# Llama-3-8B's shapes: 32 layers, 8 KV heads of 128
LLAMA_8B = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=8192)
PRECISIONS = ["bfloat16", "kv=float8", "weights=int8,kv=int8"]
LABELS = {"bf16", "W bf16 KV fp8", "int8"}
H200 = load_hardware("h200")
W = Workload()  # prompts of 1024 tokens


def kv_bytes(dtype_bytes: int) -> float:
    """One prompt's KV by hand: K and V, per layer, per KV head, per channel."""
    return W.mean_prompt * 32 * 2 * 8 * 128 * dtype_bytes


def splits(gb_per_s: float, slo: SLO | None = None) -> dict:
    result = plan_disaggregated(LLAMA_8B, 8, H200, W, PRECISIONS, slo,
                                interconnect(H200, gb_per_s))
    return result, {(c.layout, c.prefill_precision, c.decode_precision): c
                    for c in result.candidates if c.kind == "disaggregated"}


def test_each_role_takes_each_precision_and_the_handoff_moves_the_decode_kv_format():
    result, by_key = splits(100)
    assert {(p, d) for _, p, d in by_key} == {(p, d) for p in LABELS for d in LABELS}
    colocated = [c for c in result.candidates if c.kind == "colocated"]
    assert {c.prefill_precision for c in colocated} == LABELS
    assert all(c.prefill_precision == c.decode_precision and c.handoff_bytes is None
               for c in colocated)
    for (layout, p, d), c in by_key.items():
        assert c.handoff_bytes == kv_bytes(2 if d == "bf16" else 1)  # the receiver's format
        if d != "bf16" and (layout, p, "bf16") in by_key:  # 8-bit KV: half the bytes
            assert c.handoff_bytes == by_key[layout, p, "bf16"].handoff_bytes / 2
    one = next(c for k, c in by_key.items() if k[0].count(" x tp=1 (tp)") == 2)
    # one device each side: one lane at the given bandwidth, plus the link's latency
    assert one.handoff_s == pytest.approx(one.handoff_bytes / 100e9 + H200.inter_host.latency)


def test_a_faster_interconnect_never_makes_a_split_worse():
    slo = SLO(ttft_s=1.0)
    runs = [splits(gb, slo) for gb in (0.01, 1, 10, 100, 1000)]
    keys = runs[0][1].keys()
    assert all(r[1].keys() == keys for r in runs)
    for (_, slow), (_, fast) in zip(runs, runs[1:]):
        for k in keys:
            assert fast[k].ttft_s <= slow[k].ttft_s
            assert fast[k].output_tokens_per_s >= slow[k].output_tokens_per_s
            assert fast[k].meets_slo >= slow[k].meets_slo
    # 10 MB/s: every handoff takes seconds, past the TTFT target; from 1 GB/s on the best
    # split meets it and ranks above every colocated layout that does not
    assert not any(c.meets_slo for c in runs[0][1].values())
    rank = [next(i for i, c in enumerate(r[0].candidates) if c.kind == "disaggregated")
            for r in runs]
    assert rank == sorted(rank, reverse=True) and rank[1] < rank[0]
    assert runs[1][0].candidates[rank[1]].meets_slo


def test_plan_disaggregate_prints_the_ranked_table_and_writes_json(tmp_path, capsys):
    model = tmp_path / "llama" / "config.json"
    model.parent.mkdir()
    model.write_text(json.dumps(LLAMA_8B.to_json_dict()))
    out = tmp_path / "plan.json"
    args = ["plan", "--model", str(model), "--devices", "4", "--hardware", "h100",
            "--disaggregate", "--interconnect-gbps", "50", "--json", str(out)]
    assert main(args + ["--role-precision", "bfloat16", "--role-precision", "kv=int8"]) == 0
    table = capsys.readouterr().out
    assert "precision P / D" in table and "handoff MB" in table
    assert "bf16 / W bf16 KV int8" in table
    layouts = json.loads(out.read_text())["layouts"]
    assert {c["kind"] for c in layouts} == {"colocated", "disaggregated"}
    ranked = [(not c["meets_slo"], -c["output_tokens_per_s"]) for c in layouts]
    assert ranked == sorted(ranked)
    assert main(args) == 0  # the default precisions the hardware computes in
    assert "fp8 / fp8" in capsys.readouterr().out


@pytest.mark.parametrize("extra, error", [
    (["--disaggregate", "--interconnect-gbps", "0"], "positive number of GB/s, got 0.0"),
    (["--interconnect-gbps", "10"], "--interconnect-gbps need --disaggregate"),
    (["--role-precision", "bfloat16"], "--role-precision and --interconnect-gbps need"),
    (["--disaggregate", "--colocated-only"], "does not take --colocated-only"),
    (["--disaggregate", "--decode-precision", "float8"], "does not take --decode-precision"),
    (["--disaggregate", "--hardware", "a100-80gb", "--role-precision", "float8"],
     "precision 'float8': hardware 'a100-80gb' has no float8 products"),
    (["--disaggregate", "--role-precision", "kv=int4"], "'int4'"),
])
def test_bad_disaggregate_flags_are_named(tmp_path, capsys, extra, error):
    model = tmp_path / "config.json"
    model.write_text(json.dumps(LLAMA_8B.to_json_dict()))
    assert main(["plan", "--model", str(model), "--devices", "4"] + extra) == 2
    assert error in capsys.readouterr().err
