"""The serving benchmark's client half: the gRPC adapter (`stream_tokens`, the only code that
knows jaxserve's client), sending requests on the arrival schedule from a thread pool, and a
server launched as a subprocess for the run."""

from __future__ import annotations

import concurrent.futures
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from jaxserve.bench.machine import SOURCE_ROOT
from jaxserve.bench.serving_metrics import (BenchRequest, RequestRecord, arrival_intervals,
                                            record_from_events, send_offsets)

SERVING_LINE = re.compile(r"jaxserve serving on (\S+):(\d+)")


class StreamUsage:
    """Filled by `stream_tokens` from the final message, when the server reports usage."""

    def __init__(self):
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None


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


def describe_error(e: Exception) -> str:
    """One line: 'CODE: details' for a gRPC error, else 'Type: message'."""
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:  # noqa: BLE001
            pass
    return f"{type(e).__name__}: {e}".splitlines()[0]


def one_request(stream_fn: StreamFn, target: str, request: BenchRequest,
                 bench_start: float) -> RequestRecord:
    usage = StreamUsage()
    t0 = time.perf_counter()
    events: list[tuple[float, int]] = []
    try:
        for ev in stream_fn(target, request, usage):
            events.append(ev)
    except Exception as e:  # noqa: BLE001 - any RPC failure is a failed request
        return RequestRecord(success=False, prompt_len=request.prompt_len or 0,
                             send_time=t0 - bench_start, error=describe_error(e))
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
        rec = one_request(stream_fn, target, req, start)
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
        self.proc = subprocess.Popen(self.cmd, cwd=SOURCE_ROOT, stdout=subprocess.PIPE,
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

