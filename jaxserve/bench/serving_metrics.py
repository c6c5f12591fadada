"""The serving benchmark's pure half: requests and what each measured, vLLM's metric
definitions (TTFT, TPOT, ITL, E2EL, goodput), its result table, the arrival process and the
request sets (random token ids, a JSONL file). `jaxserve.bench.serving` says how they are
defined; nothing here talks to a server."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


# ---- requests and records ----

@dataclasses.dataclass
class BenchRequest:
    """One request to send. Exactly one of `prompt` (text) / `prompt_token_ids` is set."""
    max_tokens: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_len: int | None = None  # known for token-id prompts; else from the server's usage
    ignore_eos: bool = False
    temperature: float = 0.0


@dataclasses.dataclass
class RequestRecord:
    """What one request measured (seconds; relative to its own send time t0)."""
    success: bool
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    send_time: float = 0.0  # t0, relative to the benchmark start
    error: str = ""

    @property
    def tpot(self) -> float:
        if not self.success or self.output_tokens <= 1:
            return 0.0
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def record_from_events(t0: float, events: Iterable[tuple[float, int]], prompt_len: int = 0,
                       send_time: float = 0.0) -> RequestRecord:
    """A request's record from its stream events (timestamp, new tokens) and send time t0.

    Events with 0 tokens are ignored. No event at all is a failure."""
    ttft = e2el = 0.0
    last = None
    itl: list[float] = []
    tokens = 0
    for ts, k in events:
        if k <= 0:
            continue
        if last is None:
            ttft = ts - t0
        else:
            itl.append(ts - last)
        last = ts
        tokens += k
    if last is None:
        return RequestRecord(success=False, prompt_len=prompt_len, send_time=send_time,
                             error="stream ended without a token")
    e2el = last - t0
    return RequestRecord(success=True, prompt_len=prompt_len, output_tokens=tokens, ttft=ttft,
                         e2el=e2el, itl=itl, send_time=send_time)


# ---- metrics ----

def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (ms), validated."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {'/'.join(SLO_METRICS)}, "
                             f"got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number") from None
        if not (ms > 0 and math.isfinite(ms)):
            raise ValueError(f"--goodput {item!r}: the SLO must be a positive number of ms")
        slos[name] = ms
    return slos


def parse_percentiles(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        if part.strip():
            p = float(part)
            if not 0 <= p <= 100:
                raise ValueError(f"percentile {p} is not in [0, 100]")
            out.append(p)
    return out


def _pct_label(p: float) -> str:
    return f"p{p:g}"


def _stats(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/min/max/pXX in ms; vLLM's convention of 0 for an empty list."""
    arr = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(np.mean(arr)), "median": float(np.median(arr)),
           "std": float(np.std(arr)), "min": float(np.min(arr)), "max": float(np.max(arr))}
    for p in percentiles:
        out[_pct_label(p)] = float(np.percentile(arr, p))
    return out


def compute_metrics(records: Sequence[RequestRecord], duration: float,
                    slos: dict[str, float] | None = None,
                    percentiles: Sequence[float] = (99,)) -> dict:
    """Aggregate metrics over a run lasting `duration` seconds (vLLM's `calculate_metrics`).

    `slos` are in ms (keys ttft/tpot/e2el); latencies in the result are in ms."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in records if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.e2el for r in ok]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    m = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "percentiles": list(percentiles),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        m[f"{name}_ms"] = _stats(values, percentiles)
    if slos:
        good = sum(all(getattr(r, name) * 1000.0 <= limit for name, limit in slos.items())
                   for r in ok)
        m["goodput_slos_ms"] = dict(slos)
        m["good_requests"] = good
        m["request_goodput"] = good / duration
    return m


def format_table(m: dict) -> str:
    """vLLM's result table."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label, value, fmt="{:<10.2f}"):
        lines.append(("{:<40} " + fmt).format(label, value))

    row("Successful requests:", m["completed"], "{:<10}")
    row("Failed requests:", m["failed"], "{:<10}")
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"], "{:<10}")
    row("Total generated tokens:", m["total_output_tokens"], "{:<10}")
    row("Request throughput (req/s):", m["request_throughput"])
    if "request_goodput" in m:
        row("Request goodput (req/s):", m["request_goodput"])
        slos = " ".join(f"{k}:{v:g}" for k, v in m["goodput_slos_ms"].items())
        row("Goodput SLOs (ms):", slos, "{}")
        row("Requests meeting the SLOs:", m["good_requests"], "{:<10}")
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total Token throughput (tok/s):", m["total_token_throughput"])
    for name in METRICS:
        s = m[f"{name}_ms"]
        lines.append("{s:{c}^{n}}".format(s=METRIC_TITLES[name], n=50, c="-"))
        abbr = name.upper()
        row(f"Mean {abbr} (ms):", s["mean"])
        row(f"Median {abbr} (ms):", s["median"])
        for p in m["percentiles"]:
            row(f"P{p:g} {abbr} (ms):", s[_pct_label(p)])
    lines.append("=" * 50)
    return "\n".join(lines)


# ---- workload ----

def arrival_intervals(n: int, request_rate: float, burstiness: float = 1.0,
                      seed: int = 0) -> np.ndarray:
    """n gaps (s) between consecutive sends: gap i is slept AFTER request i (vLLM), so the
    send offsets are [0, cumsum(gaps)[:-1]]. Gamma(shape=B, scale=1/(R*B)): mean 1/R,
    variance 1/(R^2 B); B=1 is exponential (Poisson arrivals). R=inf: all zeros."""
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)


def send_offsets(intervals: np.ndarray) -> np.ndarray:
    """Send time of each request relative to the start: 0, g0, g0+g1, ..."""
    return np.concatenate([[0.0], np.cumsum(intervals)[:-1]]) if len(intervals) else intervals


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int = 0, min_token_id: int = 3) -> list[BenchRequest]:
    """vLLM's RandomDataset with token-id prompts: uniform lengths in [L(1-r), L(1+r)]."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    if vocab_size <= min_token_id:
        raise ValueError(f"vocab size {vocab_size} leaves no ids >= {min_token_id}")
    rng = np.random.default_rng(seed)

    def lengths(length):
        lo, hi = int(length * (1 - range_ratio)), int(length * (1 + range_ratio))
        return rng.integers(max(lo, 1), max(hi, 1) + 1, size=n)

    in_lens, out_lens = lengths(input_len), lengths(output_len)
    out = []
    for i in range(n):
        ids = rng.integers(min_token_id, vocab_size, size=int(in_lens[i])).tolist()
        out.append(BenchRequest(max_tokens=int(out_lens[i]), prompt_token_ids=ids,
                                prompt_len=len(ids), ignore_eos=True))
    return out


def jsonl_requests(path: Path, n: int, default_max_tokens: int,
                   ignore_eos: bool = False) -> list[BenchRequest]:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: needs a string 'prompt'")
            max_tokens = int(obj.get("max_tokens", default_max_tokens))
            items.append(BenchRequest(max_tokens=max_tokens, prompt=obj["prompt"],
                                      ignore_eos=ignore_eos))
    if not items:
        raise ValueError(f"{path} has no prompts")
    return [dataclasses.replace(items[i % len(items)]) for i in range(n)]

