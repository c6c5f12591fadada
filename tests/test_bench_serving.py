"""Fast tests of the serving benchmark (jaxserve.bench.serving*) without a server: the metric math
against hand-computed examples, the arrival process, the datasets, and the run loop with a fake
stream."""

import json
import math
import time

import numpy as np
import pytest

from jaxserve.bench import serving, serving_client
from jaxserve.bench import serving_metrics as bs


def rec(ttft, e2el, tokens, itl=(), prompt_len=10, success=True):
    return bs.RequestRecord(success=success, prompt_len=prompt_len, output_tokens=tokens,
                            ttft=ttft, e2el=e2el, itl=list(itl))


# ---- per-request ----

def test_record_from_events_single_token_deltas():
    r = bs.record_from_events(10.0, [(10.2, 1), (10.3, 1), (10.5, 1), (10.6, 1)], prompt_len=7)
    assert r.success and r.prompt_len == 7 and r.output_tokens == 4
    assert r.ttft == pytest.approx(0.2)
    assert r.e2el == pytest.approx(0.6)
    assert r.itl == pytest.approx([0.1, 0.2, 0.1])
    assert r.tpot == pytest.approx((0.6 - 0.2) / 3)


def test_record_from_events_multi_token_delta_is_one_gap():
    # the 2nd message carries 3 tokens: one ITL sample for it (vLLM), TPOT stays per token
    r = bs.record_from_events(0.0, [(0.5, 1), (0.0, 0), (0.9, 3), (1.0, 1)])
    assert r.output_tokens == 5
    assert r.itl == pytest.approx([0.4, 0.1])
    assert r.e2el == pytest.approx(1.0)
    assert r.tpot == pytest.approx((1.0 - 0.5) / 4)


def test_record_from_events_edge_cases():
    one = bs.record_from_events(1.0, [(1.25, 1)])
    assert one.success and one.ttft == pytest.approx(0.25) and one.e2el == pytest.approx(0.25)
    assert one.itl == [] and one.tpot == 0.0
    none = bs.record_from_events(1.0, [(1.1, 0)])
    assert not none.success and "without a token" in none.error


# ---- aggregates ----

def test_compute_metrics_hand_example():
    records = [
        rec(0.1, 0.5, 5, itl=[0.1, 0.1, 0.1, 0.1], prompt_len=10),  # tpot 0.1
        rec(0.3, 0.9, 4, itl=[0.2, 0.2, 0.2], prompt_len=20),       # tpot 0.2
        rec(0.2, 0.2, 1, prompt_len=30),                            # no tpot
        bs.RequestRecord(success=False, prompt_len=40, error="boom"),
    ]
    m = bs.compute_metrics(records, duration=2.0, percentiles=[50, 99])
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 10
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(5.0)
    assert m["total_token_throughput"] == pytest.approx(35.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    # linear interpolation over [100, 200, 300]: p99 -> index 1.98 -> 200 + 0.98 * 100
    assert m["ttft_ms"]["p99"] == pytest.approx(298.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(150.0)  # only the two multi-token requests
    assert m["tpot_ms"]["p99"] == pytest.approx(199.0)
    assert m["itl_ms"]["mean"] == pytest.approx((4 * 100 + 3 * 200) / 7)
    assert m["itl_ms"]["median"] == pytest.approx(100.0)
    assert m["e2el_ms"]["mean"] == pytest.approx(1600 / 3)
    assert m["e2el_ms"]["median"] == pytest.approx(500.0)
    assert m["e2el_ms"]["max"] == pytest.approx(900.0)
    assert "request_goodput" not in m


def test_percentiles_match_numpy_linear():
    vals = [0.001 * v for v in (7, 1, 3, 9, 5, 2, 8)]
    m = bs.compute_metrics([rec(v, v, 1) for v in vals], 1.0, percentiles=[10, 90, 99.9])
    for p in (10, 90, 99.9):
        assert m["ttft_ms"][f"p{p:g}"] == pytest.approx(np.percentile(np.array(vals) * 1e3, p))
    # sorted ms: 1 2 3 5 7 8 9; p90 at index 5.4 -> 8 + 0.4 * 1
    assert m["ttft_ms"]["p90"] == pytest.approx(8.4)


def test_goodput():
    records = [
        rec(0.1, 0.5, 5),   # ttft 100, tpot 100, e2el 500
        rec(0.6, 0.8, 3),   # ttft 600 -> fails ttft:500
        rec(0.2, 2.2, 5),   # tpot 500 -> fails tpot:200; e2el 2200 fails e2el:2000
        rec(0.3, 0.3, 1),   # single token: tpot 0 meets any TPOT SLO
        bs.RequestRecord(success=False),
    ]
    m = bs.compute_metrics(records, 4.0, {"ttft": 500, "tpot": 200})
    assert m["good_requests"] == 2 and m["request_goodput"] == pytest.approx(0.5)
    m = bs.compute_metrics(records, 4.0, {"e2el": 2000})
    assert m["good_requests"] == 3
    m = bs.compute_metrics(records, 4.0, {"ttft": 100})  # the boundary counts as met
    assert m["good_requests"] == 1


def test_parse_goodput_and_percentiles():
    assert bs.parse_goodput(["ttft:500", "TPOT:50", "e2el:2000.5"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    assert bs.parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:x"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            bs.parse_goodput(bad)
    assert bs.parse_percentiles("50,90, 99") == [50.0, 90.0, 99.0]
    with pytest.raises(ValueError):
        bs.parse_percentiles("101")


def test_compute_metrics_all_failed_and_table():
    m = bs.compute_metrics([bs.RequestRecord(success=False)], 1.0, {"ttft": 1})
    assert m["completed"] == 0 and m["failed"] == 1 and m["request_goodput"] == 0
    assert m["ttft_ms"]["mean"] == 0 and m["itl_ms"]["p99"] == 0  # vLLM's empty-list 0
    table = bs.format_table(m)
    for line in ("Successful requests:", "Failed requests:", "Mean TTFT (ms):",
                 "P99 ITL (ms):", "Median E2EL (ms):", "Request goodput (req/s):",
                 "Output token throughput (tok/s):", "Total Token throughput (tok/s):"):
        assert line in table
    json.dumps(m)  # serialisable
    with pytest.raises(ValueError):
        bs.compute_metrics([], 0.0)


# ---- arrivals ----

def test_poisson_mean_interarrival():
    gaps = bs.arrival_intervals(200_000, request_rate=4.0, burstiness=1.0, seed=0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.01)
    assert gaps.var() == pytest.approx(0.25**2, rel=0.03)  # exponential: var = mean^2
    assert np.array_equal(gaps, bs.arrival_intervals(200_000, 4.0, 1.0, seed=0))
    assert not np.array_equal(gaps[:10], bs.arrival_intervals(10, 4.0, 1.0, seed=1))


def test_burstiness_changes_variance_not_mean():
    n, rate = 200_000, 2.0
    for b in (0.25, 4.0):
        gaps = bs.arrival_intervals(n, rate, burstiness=b, seed=3)
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
        assert gaps.var() == pytest.approx(1 / (rate**2 * b), rel=0.05)
    bursty = bs.arrival_intervals(n, rate, 0.25, seed=3).var()
    smooth = bs.arrival_intervals(n, rate, 4.0, seed=3).var()
    assert bursty > 10 * smooth


def test_infinite_rate_and_offsets():
    gaps = bs.arrival_intervals(5, math.inf)
    assert np.array_equal(gaps, np.zeros(5))
    assert np.array_equal(bs.send_offsets(gaps), np.zeros(5))
    assert bs.send_offsets(np.array([1.0, 2.0, 3.0])).tolist() == [0.0, 1.0, 3.0]
    for bad in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError):
            bs.arrival_intervals(3, *bad)


# ---- datasets ----

def test_random_requests():
    reqs = bs.random_requests(50, 100, 20, 0.5, vocab_size=64, seed=1)
    assert len(reqs) == 50
    for r in reqs:
        assert 50 <= r.prompt_len <= 150 and len(r.prompt_token_ids) == r.prompt_len
        assert 10 <= r.max_tokens <= 30 and r.ignore_eos and r.prompt is None
        assert all(3 <= t < 64 for t in r.prompt_token_ids)
    fixed = bs.random_requests(4, 32, 8, 0.0, vocab_size=100, seed=0)
    assert [r.prompt_len for r in fixed] == [32] * 4 and [r.max_tokens for r in fixed] == [8] * 4
    again = bs.random_requests(4, 32, 8, 0.0, vocab_size=100, seed=0)
    assert [r.prompt_token_ids for r in fixed] == [r.prompt_token_ids for r in again]


def test_jsonl_requests(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello", "max_tokens": 5}\n\n{"prompt": "world"}\n')
    reqs = bs.jsonl_requests(f, 3, default_max_tokens=9)
    assert [(r.prompt, r.max_tokens, r.prompt_len) for r in reqs] == [
        ("hello", 5, None), ("world", 9, None), ("hello", 5, None)]
    f.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError):
        bs.jsonl_requests(f, 1, 9)


# ---- the run loop, with a fake server ----

def fake_stream(target, request, usage=None):
    """Token i of a request arrives 5 ms after token i-1; the 2nd message carries 2 tokens."""
    time.sleep(0.02)
    left = request.max_tokens
    first = True
    while left:
        k = 2 if (not first and left >= 2 and left == request.max_tokens - 1) else 1
        time.sleep(0.005 * k)
        yield time.perf_counter(), k
        left -= k
        first = False
    if usage is not None:
        usage.completion_tokens = request.max_tokens
        usage.prompt_tokens = request.prompt_len


def failing_stream(target, request, usage=None):
    if request.max_tokens == 3:
        raise RuntimeError("rpc failed")
    yield from fake_stream(target, request, usage)


def test_run_benchmark_with_fake_stream():
    reqs = [bs.BenchRequest(max_tokens=n, prompt_token_ids=[5] * 4, prompt_len=4)
            for n in (4, 3, 5, 6)]
    records, duration = serving_client.run_benchmark("fake", reqs, request_rate=math.inf,
                                         stream_fn=failing_stream)
    assert [r.success for r in records] == [True, False, True, True]
    assert "rpc failed" in records[1].error
    assert [r.output_tokens for r in records if r.success] == [4, 5, 6]
    for r in records:
        if r.success:
            assert r.ttft >= 0.02 and r.e2el > r.ttft and len(r.itl) == r.output_tokens - 2
            assert r.e2el <= duration and r.error == ""
    m = bs.compute_metrics(records, duration, {"ttft": 10_000})
    assert m["completed"] == 3 and m["failed"] == 1 and m["good_requests"] == 3
    assert m["tpot_ms"]["mean"] == pytest.approx(5.0, rel=0.8)


def test_run_benchmark_schedule_and_concurrency():
    reqs = [bs.BenchRequest(max_tokens=2, prompt_token_ids=[5], prompt_len=1)
            for _ in range(6)]
    # rate 50/s: sends spread over ~0.1 s; concurrency 1 serialises the requests
    records, duration = serving_client.run_benchmark("fake", reqs, request_rate=50.0, seed=0,
                                         max_concurrency=1, stream_fn=fake_stream)
    assert all(r.success for r in records)
    sends = [r.send_time for r in records]
    assert sends == sorted(sends)
    for a, b in zip(records, records[1:]):  # one at a time: each sent after the previous ended
        assert b.send_time >= a.send_time + a.e2el - 1e-3
    offsets = bs.send_offsets(bs.arrival_intervals(6, 50.0, 1.0, 0))
    assert all(s >= o - 1e-3 for s, o in zip(sends, offsets))


def test_parse_args():
    a = serving.parse_args(["--target", "h:1", "--goodput", "ttft:500", "tpot:50",
                       "--percentiles", "90,99", "--request-rate", "inf"])
    assert a.slos == {"ttft": 500.0, "tpot": 50.0} and a.percentile_list == [90.0, 99.0]
    assert math.isinf(a.request_rate)
    with pytest.raises(SystemExit):
        serving.parse_args(["--target", "h:1", "--launch"])
    with pytest.raises(SystemExit):
        serving.parse_args(["--target", "h:1", "--dataset", "jsonl"])
    with pytest.raises(SystemExit):
        serving.parse_args(["--target", "h:1", "--burstiness", "0"])


def test_rpc_errors_are_one_line():
    class FakeRpcError(Exception):
        def code(self):
            class Code:
                name = "RESOURCE_EXHAUSTED"
            return Code()

        def details(self):
            return "the wait queue is full"

    assert (serving_client.describe_error(FakeRpcError("x\ny"))
            == "RESOURCE_EXHAUSTED: the wait queue is full")
    assert serving_client.describe_error(ValueError("bad\nthing")) == "ValueError: bad"
