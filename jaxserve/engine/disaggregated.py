"""Disaggregated prefill/decode: two engines on disjoint devices behind one engine-like face.

The prefill engine runs prompts (chunked, prefix-cached) and samples each sequence's first
token; the decode engine streams the rest. Between them, the handoffs (jaxserve/engine/
handoff.py) move each sequence's KV blocks, converting their format and layout. One step of
the pair is: a prefill engine step (unless `max_prefill_ahead` sequences already wait for the
decode engine: prefill runs ahead of decode up to that bound, then pauses), every handoff the
decode engine has room for, and a decode engine step. Both engines run on the calling thread,
one after the other; their device work overlaps because dispatch is asynchronous.

To the host loop (jaxserve/engine/loop.py), `LLM` and the front ends this is an `Engine`:
add_request, abort, step, has_unfinished, stats, timeline, output. A request lives in exactly
one engine's request table: the prefill engine's until its handoff commits, then the decode
engine's. It never imports the model or the runner: the engines own those.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from jaxserve.engine.engine import Engine
from jaxserve.engine.handoff import Handoffs
from jaxserve.engine.sequence import Request
from jaxserve.sampling_params import SamplingParams
from jaxserve.settings import DisaggregationSettings

ROLE_KEYS = ("running", "waiting", "kv_blocks_used", "kv_blocks_cached", "kv_blocks_total",
             "preemptions")


class _Outputs:
    """Both engines' output processors as one (what EngineLoop sets and closes)."""

    def __init__(self, *processors):
        self._processors = processors

    @property
    def on_updates(self):
        return self._processors[0].on_updates

    @on_updates.setter
    def on_updates(self, hook) -> None:
        for processor in self._processors:
            processor.on_updates = hook

    def close(self) -> None:
        for processor in self._processors:
            processor.close()


class DisaggregatedEngine:
    def __init__(self, prefill: Engine, decode: Engine, handoffs: Handoffs,
                 settings: DisaggregationSettings):
        self.prefill, self.decode = prefill, decode
        self.handoffs = handoffs
        self.settings = settings
        self.config = decode.config  # the limits front ends report (max_num_seqs)
        self.max_model_len = decode.max_model_len
        self.model_config = decode.model_config
        self.tokenizer = decode.tokenizer
        self.output = _Outputs(prefill.output, decode.output)
        self.timeline = decode.timeline
        self.busy = collections.Counter()  # role -> seconds in its engine's steps
        self.started = time.perf_counter()

    # ---- requests ----
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Request:
        if request_id in self.decode.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n > 1:
            raise ValueError(f"n={params.n}: disaggregated prefill/decode runs one sequence "
                             f"per request; use n=1 or a colocated engine")
        self.decode.check_request(prompt_ids, params)  # it must fit where it will decode
        return self.prefill.add_request(request_id, prompt_ids, params, prompt,
                                        handoff_after=1)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request in either engine (or between them); every block is free after."""
        request = self.prefill.abort(request_id) or self.decode.abort(request_id)
        self.handoffs.forget_finished()
        return request

    def has_unfinished(self) -> bool:
        return self.prefill.has_unfinished() or self.decode.has_unfinished()

    @property
    def requests(self) -> dict[str, Request]:
        return {**self.prefill.requests, **self.decode.requests}

    @property
    def num_waiting(self) -> int:
        return self.prefill.num_waiting + len(self.handoffs) + self.decode.num_waiting

    @property
    def counters(self) -> collections.Counter:
        return self.prefill.counters + self.decode.counters

    # ---- the loop ----
    def step(self) -> list[Request]:
        finished: list[Request] = []
        if self.prefill.has_unfinished() and \
                len(self.handoffs) < self.settings.max_prefill_ahead:
            finished += self._timed("prefill", self.prefill.step)
        self.handoffs.take(self.prefill)
        finished += self.handoffs.advance(self.prefill, self.decode)
        if self.decode.has_unfinished():
            finished += self._timed("decode", self.decode.step)
        return finished

    def _timed(self, role: str, step) -> list[Request]:
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            self.busy[role] += time.perf_counter() - t0

    def drain(self) -> list[Request]:
        return self.prefill.drain() + self.decode.drain()

    def clear_prefix_cache(self) -> None:
        self.prefill.clear_prefix_cache()
        self.decode.clear_prefix_cache()

    def warmup(self) -> int:
        return self.prefill.warmup() + self.decode.warmup()

    # ---- stats ----
    @property
    def kv_blocks_used(self) -> int:
        return self.prefill.kv_blocks_used + self.decode.kv_blocks_used

    @property
    def kv_blocks_total(self) -> int:
        return self.decode.kv_blocks_total

    def stats(self, peak_flops: float | None = None) -> dict[str, Any]:
        """The decode engine's stats (what a colocated engine reports, for the front ends),
        tokens of both, each role's own under "prefill" and "decode", the queue on each side
        (`prefill_waiting`, `handoffs_pending`: prefilled and waiting for the decode side,
        `decode_waiting`), the handoffs' bytes, seconds and refusals (jaxserve/engine/
        handoff.py), and each role's utilization: the share of wall time since the pair
        started that its engine spent in steps."""
        roles = {"prefill": self.prefill.stats(peak_flops), "decode": self.decode.stats(peak_flops)}
        wall = max(time.perf_counter() - self.started, 1e-9)
        out = dict(roles["decode"])
        for key in ("prefill_tokens", "generated_tokens", "compilations", "prefix_cache_queries",
                    "prefix_cache_hits"):
            out[key] = roles["prefill"].get(key, 0) + roles["decode"].get(key, 0)
        for key in ROLE_KEYS:
            out[key] = roles["prefill"][key] + roles["decode"][key]
        out["replica_load_flops"] = roles["prefill"]["replica_load_flops"] + \
            roles["decode"]["replica_load_flops"]
        out.update(self.handoffs.stats())
        out.update(disaggregated=True, **roles,
                   prefill_waiting=roles["prefill"]["waiting"],
                   prefill_running=roles["prefill"]["running"],
                   decode_waiting=roles["decode"]["waiting"],
                   decode_running=roles["decode"]["running"],
                   prefill_utilization=round(self.busy["prefill"] / wall, 4),
                   decode_utilization=round(self.busy["decode"] / wall, 4))
        return out
