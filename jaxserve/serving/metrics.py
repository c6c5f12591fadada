"""Prometheus metrics of the server, on their own registry (served by `serve --metrics-port`).

Two feeds: `on_step` (the EngineLoop hook, run on the engine thread after each step and after
commands that change the engine while it is idle) sets the gauges and the token / preemption
counters from `engine.stats()`; `request_finished` (handler threads) counts finished sequences and
observes the latency histograms from the request's RequestMetrics. Neither may raise: a metrics
bug must never fail the engine loop or a request, so errors are logged and dropped.

`start_metrics_server` serves a registry on its own port (prometheus_client's WSGI app, any path),
behind the API key when the `Auth` protects metrics.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from jaxserve.serving.auth import Auth, Endpoint

if TYPE_CHECKING:
    from jaxserve.engine.loop import Final

log = logging.getLogger("jaxserve.serving")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0, 320.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.5)

SPECULATIVE_GAUGES = {
    "spec_acceptance_rate": ("jaxserve_spec_acceptance_rate",
                             "Proposed tokens the target kept / proposed tokens verified"),
    "spec_tokens_per_step": ("jaxserve_spec_tokens_per_step", "Tokens a sequence gains per "
                             "target step that verifies its proposals"),
    "spec_break_even_tokens_per_step": ("jaxserve_spec_break_even_tokens_per_step",
                                        "Tokens per verifying step below which speculation "
                                        "costs more than it gains (measured)"),
    "spec_fallback_running": ("jaxserve_spec_fallback_running", "Decoding sequences that "
                              "stopped speculating (auto fallback)"),
}
SPECULATIVE_COUNTERS = {
    "spec_proposed_tokens": ("jaxserve_spec_proposed_tokens", "Proposed tokens verified"),
    "spec_accepted_tokens": ("jaxserve_spec_accepted_tokens", "Proposed tokens the target "
                             "kept"),
    "spec_draft_s": ("jaxserve_spec_draft_seconds", "Time spent proposing"),
    "spec_verify_s": ("jaxserve_spec_verify_seconds", "Time of target steps that verified "
                      "proposals"),
}


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # "requests" as the scheduler counts them: a request with n > 1 is n sequences
        self.running = Gauge("jaxserve_num_requests_running", "Sequences in the running batch",
                             registry=r)
        self.waiting = Gauge("jaxserve_num_requests_waiting", "Sequences waiting to be scheduled",
                             registry=r)
        self.kv_used = Gauge("jaxserve_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("jaxserve_kv_blocks_total", "KV cache blocks in the pool",
                              registry=r)
        self.kv_usage = Gauge("jaxserve_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                              registry=r)
        self.kv_cached = Gauge("jaxserve_kv_blocks_cached", "KV blocks no sequence holds that "
                               "keep a cached prefix (evicted when the pool needs them)",
                               registry=r)
        self.replica_load = Gauge("jaxserve_replica_load_flops", "True FLOPs of the work "
                                  "admitted to a DP replica and not yet done", ["replica"],
                                  registry=r)
        self.preemptions = Counter("jaxserve_preemptions", "Sequences preempted", registry=r)
        self.prefix_queries = Counter("jaxserve_prefix_cache_queries", "Tokens looked up in the "
                                      "prefix cache when sequences were admitted", registry=r)
        self.prefix_hits = Counter("jaxserve_prefix_cache_hits", "Tokens found in the prefix "
                                   "cache (their KV was not computed again)", registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Tokens generated",
                                         registry=r)
        self.finished = Counter("jaxserve_requests_finished", "Finished sequences",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds",
                              "(e2e - ttft) / (completion tokens - 1)", buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("jaxserve_request_queue_time_seconds", "Arrival to first "
                               "scheduled", buckets=LATENCY_BUCKETS, registry=r)
        # speculative decoding (absent from the stats of an engine without it): stats key ->
        # gauge or counter
        self._gauges = {key: Gauge(name, doc, registry=r) for key, (name, doc) in
                        SPECULATIVE_GAUGES.items()}
        spec_counters = {key: Counter(name, doc, registry=r) for key, (name, doc) in
                         SPECULATIVE_COUNTERS.items()}
        # disaggregated prefill/decode (jaxserve/engine/handoff.py); zero on one engine
        self.queue_length = Gauge("jaxserve_queue_length", "Sequences waiting: for prefill, "
                                  "prefilled for the decode engine (handoff), for decode",
                                  ["role"], registry=r)
        self.utilization = Gauge("jaxserve_role_utilization", "Share of wall time an engine "
                                 "of a disaggregated pair spent in steps", ["role"], registry=r)
        self.handoffs = Counter("jaxserve_handoffs", "KV handoffs committed", registry=r)
        self.handoff_bytes = Counter("jaxserve_handoff_bytes", "KV bytes handed off",
                                     registry=r)
        self.handoff_seconds = Counter("jaxserve_handoff_seconds", "Time KV handoffs took, "
                                       "reserve to commit", registry=r)
        self.swapped_out = Counter("jaxserve_kv_swapped_out", "Preempted sequences whose KV "
                                   "went to host memory (cache.swap_preempted)", registry=r)
        self._counters = {"preemptions": self.preemptions, "swapped_out": self.swapped_out,
                          "generated_tokens": self.generation_tokens,
                          "prefix_cache_queries": self.prefix_queries,
                          "prefix_cache_hits": self.prefix_hits,
                          "handoffs": self.handoffs, "handoff_bytes": self.handoff_bytes,
                          "handoff_seconds": self.handoff_seconds, **spec_counters}
        self._seen = dict.fromkeys(self._counters, 0)

    def start_from(self, stats: dict) -> None:
        """Count from these engine stats on (the engine may have run before it was served)."""
        for key in self._seen:
            self._seen[key] = stats.get(key, 0)
        self.kv_total.set(stats["kv_blocks_total"])

    def on_step(self, loop, step_s: float) -> None:
        """EngineLoop hook: runs on the engine thread, the one place engine.stats() is read."""
        try:
            stats = loop.engine.stats()
            self.running.set(stats["running"])
            self.waiting.set(stats["waiting"])
            used, total = stats["kv_blocks_used"], stats["kv_blocks_total"]
            self.kv_used.set(used)
            self.kv_total.set(total)
            self.kv_usage.set(used / total if total else 0.0)
            self.kv_cached.set(stats["kv_blocks_cached"])
            for replica, load in enumerate(stats["replica_load_flops"]):
                self.replica_load.labels(replica=str(replica)).set(load)
            for key, gauge in self._gauges.items():
                if stats.get(key) is not None:
                    gauge.set(stats[key])
            if stats.get("disaggregated"):
                for role, key in (("prefill", "prefill_waiting"), ("handoff", "handoffs_pending"),
                                  ("decode", "decode_waiting")):
                    self.queue_length.labels(role=role).set(stats[key])
                for role in ("prefill", "decode"):
                    self.utilization.labels(role=role).set(stats[f"{role}_utilization"])
            for key, counter in self._counters.items():
                now = stats.get(key, 0)
                if now > self._seen[key]:
                    counter.inc(now - self._seen[key])
                self._seen[key] = now
        except Exception:
            log.exception("metrics: on_step failed")

    def request_finished(self, finals: list[Final]) -> None:
        """Called once per request with the Final event of each of its sequences."""
        if not finals:
            return
        try:
            for final in finals:
                self.finished.labels(finish_reason=final.finish_reason).inc()
            self.prompt_tokens.inc(finals[0].prompt_tokens)
            m = finals[0].metrics
            if m is None:
                return
            completion = max(f.completion_tokens for f in finals)
            for histogram, value in ((self.ttft, m.ttft), (self.e2e, m.e2e_latency),
                                     (self.queue, m.queue_time)):
                if value is not None:
                    histogram.observe(value)
            if m.ttft is not None and m.e2e_latency is not None and completion > 1:
                self.tpot.observe((m.e2e_latency - m.ttft) / (completion - 1))
        except Exception:
            log.exception("metrics: request_finished failed")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # no line per scrape
        pass


def start_metrics_server(registry: CollectorRegistry, host: str, port: int,
                         auth: Auth = Auth()):
    """Serve `registry` on http://host:port/ on a daemon thread; returns the WSGI server (its
    `server_port`, `shutdown()`, `server_close()`). OSError if the port cannot be bound."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        refusal = auth.refusal(Endpoint.METRICS, environ.get("HTTP_AUTHORIZATION"))
        if refusal is None:
            return metrics_app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", "Bearer")])
        return [refusal.encode() + b"\n"]

    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    httpd = make_server(address[0], port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="jaxserve-metrics", daemon=True).start()
    return httpd
