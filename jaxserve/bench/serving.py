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
each run is recorded too (the machine may be shared). The metric math (`record_from_events`,
`compute_metrics`) and the arrival process (`arrival_intervals`) are pure functions
(`jaxserve.bench.serving_metrics`), tested without a server in tests/test_bench_serving.py;
the only code that knows the gRPC client is `stream_tokens` (`jaxserve.bench.serving_client`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from jaxserve.bench.machine import CpuWatch, client_machine_info
from jaxserve.package_data import embedded_model
from jaxserve.bench.serving_client import (LaunchedServer, one_request, run_benchmark,
                                           server_model_info, server_vocab_size, stream_tokens)
from jaxserve.bench.serving_metrics import (BenchRequest, arrival_intervals, compute_metrics,
                                            format_table, jsonl_requests, parse_goodput,
                                            parse_percentiles, random_requests)

DEFAULT_MODEL = embedded_model()


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
    p.add_argument("--request-rate", type=_rate, default=float("inf"), metavar="REQ/S",
                   help="requests/s (Poisson with burstiness 1); inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0, metavar="B",
                   help="Gamma shape of the inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", type=_concurrencies, default=None, metavar="C[,C...]",
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
        rec = one_request(stream_tokens, target, warm, time.perf_counter())
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
                "args": arg_dict, "machine": client_machine_info(),
                "requests": [dataclasses.asdict(r) | {"tpot": r.tpot} for r in records]})
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(
            results[0] if len(results) == 1 else {"runs": results}, indent=2) + "\n")
        print(f"wrote {args.result_json}", file=sys.stderr)
    return 0 if all(run["metrics"]["completed"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
