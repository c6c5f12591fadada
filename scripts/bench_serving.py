"""Online serving benchmark: a load generator for the jaxserve gRPC server (vLLM's definitions).

    python scripts/bench_serving.py --launch --num-prompts 32 --input-len 32 --output-len 32 \\
        --request-rate 4
    python scripts/bench_serving.py --target localhost:50051 --request-rate inf \\
        --max-concurrency 8 --goodput ttft:500 tpot:50 --result-json out.json
    python scripts/bench_serving.py --target localhost:50051 --dataset jsonl \\
        --dataset-path prompts.jsonl --request-rate 2 --burstiness 0.5

It sends `--num-prompts` streaming Generate requests to a running server (`--target HOST:PORT`),
or to one it starts itself (`--launch`: `python -m jaxserve.cli serve --port 0 ...` as a
subprocess; the address is read from its `jaxserve serving on HOST:PORT` stdout line and the
server is stopped with SIGTERM at the end), and reports latency and throughput the way vLLM's
`benchmarks/benchmark_serving.py` (`vllm bench serve`) does, so numbers are comparable.

Workload
  * Arrivals: request i is sent at offset sum(interval_0..interval_{i-1}) from the start (the
    first at 0), intervals drawn i.i.d. from Gamma(shape=B, scale=1/(R*B)) with numpy's
    `default_rng(--seed)`: mean 1/R, variance 1/(R^2 B). B = `--burstiness` = 1 is a Poisson
    process; B < 1 is burstier, B > 1 more uniform. `--request-rate inf` sends all at once.
    Offsets are precomputed and slept to against one clock, so they do not drift.
  * `--max-concurrency C`: at most C requests in flight (vLLM's semaphore). Arrivals still
    follow the schedule; a request that arrives while C are in flight waits, and its latencies
    are measured from when it is actually sent (as in vLLM). Concurrency is implemented by a
    thread pool of min(N, C) workers (each runs one blocking gRPC stream); without C the pool
    has N workers, capped at --max-workers.
  * `--dataset random`: prompts of random token ids (sent as token ids, so the prompt length
    is exact), lengths uniform in [L(1-r), L(1+r)] for L = --input-len / --output-len and
    r = --range-ratio, like vLLM's RandomDataset; `ignore_eos` and max_tokens = the output
    length, so every request generates exactly that many tokens. Ids are drawn from
    [--min-token-id, vocab) (default 3 skips unk/bos/eos of jaxserve's sentencepiece models);
    the vocabulary size comes from --vocab-size, else --model's config.json, else the server's
    GetModelInfo.
  * `--dataset jsonl --dataset-path F`: one JSON object per line with `prompt` (text) and
    optional `max_tokens` (default --output-len); cycled if N exceeds the lines. The prompt
    length in tokens is taken from the server's usage report (Final.usage.prompt_tokens).
  * Before the timed run, --warmup-requests (default 1) requests are sent one by one and not
    measured; --launch also passes `--warmup` to the server (compile before serving) unless
    --no-server-warmup.

Per-request metrics (one "stream event" = one streamed message that carries k >= 1 new tokens;
messages carrying no tokens are ignored; t0 = when the request is sent)
  * TTFT = time of the first event - t0.
  * E2EL = time of the last event - t0 (vLLM: the last content chunk, not the stream's close).
  * output tokens = the sum of k over the events.
  * TPOT = (E2EL - TTFT) / (output tokens - 1), for requests with > 1 output token
    (0 otherwise, which counts as meeting a TPOT SLO, as in vLLM).
  * ITL: one sample per event after the first: the gap since the previous event. A message
    carrying k > 1 tokens contributes ONE gap, not k (this is what vLLM does with its
    per-chunk `itl` list). So when the server batches tokens into deltas, mean ITL is the
    per-message gap and exceeds TPOT; TPOT stays per token.
  A request fails if the RPC raises, the stream ends without a token, or its Final says
  finish_reason "abort"; failed requests count in "failed" and nothing else.

Aggregates (duration = wall time from the first send to the last request's end)
  * request throughput = completed / duration; output token throughput = sum(output tokens) /
    duration; total token throughput = (sum(prompt tokens) + sum(output tokens)) / duration,
    over completed requests.
  * mean / median / std / P<p> (numpy linear interpolation, `--percentiles`, default 99) of
    TTFT, TPOT, ITL (pooled over all requests' gaps) and E2EL, in ms.
  * goodput (`--goodput ttft:500 tpot:50 e2el:2000`, SLOs in ms): completed requests meeting
    every given SLO (metric <= SLO) / duration.

Prints a vLLM-style table and, with --result-json, writes the date, args, machine info, all
metrics and per-request values.

Side by side (with --launch): --server-args may be repeated and --max-concurrency may list
several values (`32,128`); every (server args, concurrency) pair runs against a fresh server,
one after the other, and a table compares them. --profile-out FILE.json has each server write
its step timeline (jaxserve/engine/timeline.py; a Chrome trace, FILE-<i>.json when there are
several runs); its Amdahl summary (ms per step: device, host only, output processing and the
part of it the device waited for) joins the results. The CPU time other processes used during
each run is recorded too (the machine may be shared). The metric math (`record_from_events`, `compute_metrics`) and
the arrival process (`arrival_intervals`) are pure functions, tested without a server in
tests/test_bench_serving.py; the only code that knows the gRPC client is `stream_tokens`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxserve.package_data import embedded_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = embedded_model()
SERVING_LINE = re.compile(r"jaxserve serving on (\S+):(\d+)")
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


class StreamUsage:
    """Filled by `stream_tokens` from the final message, when the server reports usage."""

    def __init__(self):
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None


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


# ---- the gRPC adapter: the only code that knows jaxserve's client ----

_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def _client(target: str):
    from jaxserve.serving.client import Client

    with _clients_lock:
        if target not in _clients:
            _clients[target] = Client(target)
        return _clients[target]


def stream_tokens(target: str, request: BenchRequest,
                  usage: StreamUsage | None = None) -> Iterator[tuple[float, int]]:
    """Send one streaming Generate; yield (perf_counter timestamp, new tokens) per Delta.

    Fills `usage` from the Final message. Raises grpc.RpcError on an RPC error."""
    prompt = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
    for resp in _client(target).generate(prompt, max_tokens=request.max_tokens,
                                         temperature=request.temperature,
                                         ignore_eos=request.ignore_eos or None):
        now = time.perf_counter()
        if resp.HasField("delta"):
            if resp.delta.token_ids:
                yield now, len(resp.delta.token_ids)
        elif usage is not None and resp.HasField("final"):
            usage.prompt_tokens = resp.final.usage.prompt_tokens
            usage.completion_tokens = resp.final.usage.completion_tokens
            usage.finish_reason = resp.final.finish_reason


def server_vocab_size(target: str) -> int:
    return int(_client(target).model_info().vocab_size)


def server_model_info(target: str) -> dict | None:
    """The server's GetModelInfo as a dict (for the JSON); {"error": ...} if that fails."""
    from google.protobuf.json_format import MessageToDict

    try:
        return MessageToDict(_client(target).model_info(), preserving_proto_field_name=True)
    except Exception as e:  # noqa: BLE001 - informational only
        return {"error": f"{type(e).__name__}: {e}"}


# ---- the run ----

StreamFn = Callable[..., Iterator[tuple[float, int]]]


def _describe(e: Exception) -> str:
    """One line: 'CODE: details' for a gRPC error, else 'Type: message'."""
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:  # noqa: BLE001
            pass
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _one_request(stream_fn: StreamFn, target: str, request: BenchRequest,
                 bench_start: float) -> RequestRecord:
    usage = StreamUsage()
    t0 = time.perf_counter()
    events: list[tuple[float, int]] = []
    try:
        for ev in stream_fn(target, request, usage):
            events.append(ev)
    except Exception as e:  # noqa: BLE001 - any RPC failure is a failed request
        return RequestRecord(success=False, prompt_len=request.prompt_len or 0,
                             send_time=t0 - bench_start, error=_describe(e))
    prompt_len = request.prompt_len
    if prompt_len is None:
        prompt_len = usage.prompt_tokens or 0
    rec = record_from_events(t0, events, prompt_len, send_time=t0 - bench_start)
    if rec.success and usage.finish_reason == "abort":
        rec.success, rec.error = False, "aborted by the server"
    if (rec.success and usage.completion_tokens is not None
            and usage.completion_tokens != rec.output_tokens):
        rec.error = (f"warning: streamed {rec.output_tokens} tokens, usage says "
                     f"{usage.completion_tokens}")
    return rec


def run_benchmark(target: str, requests: Sequence[BenchRequest], request_rate: float,
                  burstiness: float = 1.0, seed: int = 0, max_concurrency: int | None = None,
                  max_workers: int = 1024, stream_fn: StreamFn = stream_tokens,
                  progress: bool = False) -> tuple[list[RequestRecord], float]:
    """Send `requests` on the arrival schedule; return (records in request order, duration)."""
    n = len(requests)
    offsets = send_offsets(arrival_intervals(n, request_rate, burstiness, seed))
    workers = min(n, max_concurrency) if max_concurrency else n
    if workers > max_workers:
        print(f"note: concurrency capped at {max_workers} threads (--max-workers)",
              file=sys.stderr)
        workers = max_workers
    workers = max(workers, 1)
    done = [0]
    lock = threading.Lock()

    def job(req):
        rec = _one_request(stream_fn, target, req, start)
        if progress:
            with lock:
                done[0] += 1
                print(f"\r{done[0]}/{n} requests done", end="", file=sys.stderr, flush=True)
        return rec

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                               thread_name_prefix="bench") as pool:
        start = time.perf_counter()
        futures = []
        for req, offset in zip(requests, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(job, req))
        records = [f.result() for f in futures]
        duration = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    return records, duration


# ---- launching a server ----

class LaunchedServer:
    """`python -m jaxserve.cli serve --port 0 ...` as a subprocess; stopped with SIGTERM."""

    def __init__(self, server_args: Sequence[str], timeout: float, log_path: Path | None):
        self.cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--port", "0",
                    *server_args]
        self.timeout = timeout
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.target: str | None = None
        self.log: list[str] = []
        self._lines: queue.Queue = queue.Queue()

    def __enter__(self) -> LaunchedServer:
        print("launching: " + shlex.join(self.cmd), file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while self.target is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._stop()
                raise RuntimeError(f"server did not print 'jaxserve serving on HOST:PORT' "
                                   f"within {self.timeout:g} s; log tail:\n" + self._tail())
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                rc = self.proc.wait()
                raise RuntimeError(f"server exited with {rc} before serving; log tail:\n"
                                   + self._tail())
            match = SERVING_LINE.search(line)
            if match:
                host, port = match.groups()
                if host in ("0.0.0.0", "[::]", "::", "*", ""):
                    host = "localhost"
                self.target = f"{host}:{port}"
        print(f"server up at {self.target}", file=sys.stderr, flush=True)
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = open(self.log_path, "w", encoding="utf-8") if self.log_path else None
        try:
            for line in self.proc.stdout:
                self.log.append(line)
                del self.log[:-200]
                if log:
                    log.write(line)
                    log.flush()
                self._lines.put(line)
        finally:
            self._lines.put(None)
            if log:
                log.close()

    def _tail(self) -> str:
        return "".join(self.log[-40:])

    def _stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print("server ignored SIGTERM for 60 s; killing it", file=sys.stderr)
            self.proc.kill()
            return self.proc.wait()

    def __exit__(self, *exc) -> None:
        rc = self._stop()
        print(f"server stopped (exit {rc})", file=sys.stderr, flush=True)


# ---- machine info, args, main ----

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None}
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["mem_total_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info["versions"] = {d: _version(d) for d in ("jaxserve", "jax", "jaxlib", "grpcio",
                                                 "protobuf", "numpy")}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5)
        info["git_commit"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be integers >= 1, comma-separated, got {text!r}")
    return values


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running jaxserve gRPC server")
    where.add_argument("--launch", action="store_true",
                       help="start `python -m jaxserve.cli serve --port 0` for the run")
    p.add_argument("--model", default=None, help="with --launch: the server's --model "
                   "(default: the embedded model); also where --vocab-size "
                   "is read from")
    p.add_argument("--server-args", action="append", default=None,
                   help="with --launch: more server flags, one shell-quoted string, e.g. "
                   "'--max-num-seqs 16'; repeat to compare configurations side by side")
    p.add_argument("--profile-out", type=Path, default=None, metavar="FILE.json",
                   help="with --launch: the server writes its step timeline here (Chrome "
                   "trace); its Amdahl summary joins the results")
    p.add_argument("--no-server-warmup", dest="server_warmup", action="store_false",
                   help="with --launch: do not pass --warmup (compile before serving)")
    p.add_argument("--launch-timeout", type=float, default=900.0,
                   help="seconds to wait for the server's 'serving on' line")
    p.add_argument("--server-log", type=Path, default=None, help="with --launch: save its "
                   "output here")
    p.add_argument("--dataset", choices=["random", "jsonl"], default="random")
    p.add_argument("--dataset-path", type=Path, default=None, help="the --dataset jsonl file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens")
    p.add_argument("--output-len", type=int, default=128,
                   help="random: tokens generated; jsonl: max_tokens when a line has none")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [L(1-r), L(1+r)]")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random: token ids < this (default: the model's config.json)")
    p.add_argument("--min-token-id", type=int, default=3,
                   help="random: smallest token id drawn (default 3: skips unk/bos/eos)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="jsonl: ask for ignore_eos (random always does)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="requests/s (Poisson with burstiness 1); inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", type=_concurrencies, default=None,
                   help="most requests in flight at once; a comma-separated list runs each")
    p.add_argument("--max-workers", type=int, default=1024,
                   help="cap on client threads (one per in-flight request)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=1,
                   help="requests sent one at a time before the timed run (not measured)")
    p.add_argument("--percentiles", default="99",
                   help="comma-separated percentiles to report besides the median")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:2000")
    p.add_argument("--result-json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.dataset == "jsonl" and args.dataset_path is None:
        p.error("--dataset jsonl needs --dataset-path")
    if not args.launch and (args.server_args or args.server_log or not args.server_warmup
                            or args.profile_out):
        p.error("--server-args / --server-log / --profile-out need --launch")
    args.server_args = args.server_args or [""]
    args.concurrencies = args.max_concurrency or [None]
    args.max_concurrency = args.concurrencies[0]
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.percentile_list = parse_percentiles(args.percentiles)
        args.slos = parse_goodput(args.goodput)
        arrival_intervals(0, args.request_rate, args.burstiness)
    except ValueError as e:
        p.error(str(e))
    return args


def _vocab_size(args, target: str) -> int:
    """--vocab-size, else the --model's config.json, else the server's GetModelInfo."""
    if args.vocab_size is not None:
        return args.vocab_size
    if args.model:
        config = Path(args.model) / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["vocab_size"])
    return server_vocab_size(target)


def build_requests(args, target: str) -> list[BenchRequest]:
    if args.dataset == "random":
        reqs = random_requests(args.num_prompts, args.input_len, args.output_len,
                               args.range_ratio, _vocab_size(args, target), args.seed,
                               args.min_token_id)
    else:
        reqs = jsonl_requests(args.dataset_path, args.num_prompts, args.output_len,
                              args.ignore_eos)
    for r in reqs:
        r.temperature = args.temperature
    return reqs


def benchmark(args, target: str) -> dict:
    requests = build_requests(args, target)
    for i in range(args.warmup_requests):
        warm = dataclasses.replace(requests[i % len(requests)], max_tokens=min(
            requests[i % len(requests)].max_tokens, 8))
        rec = _one_request(stream_tokens, target, warm, time.perf_counter())
        if not rec.success:
            raise SystemExit(f"warm-up request failed: {rec.error}")
    print(f"sending {len(requests)} requests: rate {args.request_rate} req/s, burstiness "
          f"{args.burstiness}, max concurrency {args.max_concurrency}", file=sys.stderr,
          flush=True)
    records, duration = run_benchmark(
        target, requests, args.request_rate, args.burstiness, args.seed, args.max_concurrency,
        args.max_workers, progress=not args.no_progress)
    return {"records": records, "duration": duration, "model_info": server_model_info(target)}


def profile_path(args, index: int, runs: int) -> Path | None:
    if args.profile_out is None:
        return None
    if runs == 1:
        return args.profile_out
    return args.profile_out.with_name(f"{args.profile_out.stem}-{index}"
                                      f"{args.profile_out.suffix}")


def timeline_summary(path: Path | None) -> dict | None:
    """The Amdahl summary a server wrote with its step timeline (None if it wrote none)."""
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("otherData", {}).get("amdahl")


def run_once(args, server_args: str, concurrency: int | None, profile: Path | None) -> dict:
    """One benchmark run (a server of its own with --launch); its result record."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_offline import CpuWatch

    args.max_concurrency = concurrency
    server_cmd = None
    with CpuWatch() as load:
        if args.launch:
            cmd = ["--model", args.model, *(["--warmup"] if args.server_warmup else []),
                   *(["--profile-out", str(profile)] if profile else []),
                   *shlex.split(server_args)]
            with LaunchedServer(cmd, args.launch_timeout, args.server_log) as server:
                server_cmd = server.cmd
                run = benchmark(args, server.target)
        else:
            run = benchmark(args, args.target)
    records, duration = run["records"], run["duration"]
    metrics = compute_metrics(records, duration, args.slos, args.percentile_list)
    print(format_table(metrics))
    errors = sorted({r.error for r in records if r.error})
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    timeline = timeline_summary(profile)
    if timeline:
        from jaxserve.engine.timeline import format_amdahl
        print(format_amdahl(timeline))
    return {"server_args": server_args, "max_concurrency": concurrency,
            "server_command": server_cmd, "server_model_info": run["model_info"],
            "metrics": metrics, "timeline": timeline, "load": load.result,
            "records": records}


def side_by_side(runs: list[dict]) -> str:
    head = ("server args", "conc.", "out tok/s", "mean TPOT", "median ITL", "ms/step",
            "process", "exposed", "host only", "others' cores")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        m, t, load = run["metrics"], run["timeline"] or {}, run["load"] or {}
        steps = max(1, t.get("steps", 0))
        process = t.get("phases", {}).get("process", {})
        cell = (lambda x, f=".2f": "n/a" if x is None else format(x, f))  # noqa: E731
        lines.append("| " + " | ".join([
            run["server_args"] or "(defaults)", str(run["max_concurrency"]),
            cell(m.get("output_throughput"), ".1f"), cell(m["tpot_ms"]["mean"]),
            cell(m["itl_ms"]["median"]),
            cell(1e3 * t["busy_wall_s"] / steps if t else None),
            cell(process.get("ms_per_step")), cell(process.get("exposed_ms_per_step")),
            cell(t.get("host_only_ms_per_step")), cell(load.get("others_cores"))]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    date = datetime.datetime.now().astimezone()
    if args.launch and args.model is None:
        args.model = str(DEFAULT_MODEL)
    if args.dataset == "jsonl":
        build_requests(args, "")  # reject a bad file before starting anything
    plan = [(a, c) for a in args.server_args for c in args.concurrencies]
    runs = [run_once(args, a, c, profile_path(args, i, len(plan)))
            for i, (a, c) in enumerate(plan)]
    if len(runs) > 1:
        print("\n" + side_by_side(runs))
    if args.result_json:
        arg_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        arg_dict["request_rate"] = str(args.request_rate)  # inf is not JSON
        results = []
        for run in runs:
            records = run.pop("records")
            results.append({
                "date": date.isoformat(timespec="seconds"),
                "backend": "jaxserve-grpc", "target": args.target, **run,
                "args": arg_dict, "machine": machine_info(),
                "requests": [dataclasses.asdict(r) | {"tpot": r.tpot} for r in records]})
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(
            results[0] if len(results) == 1 else {"runs": results}, indent=2) + "\n")
        print(f"wrote {args.result_json}", file=sys.stderr)
    return 0 if all(run["metrics"]["completed"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
