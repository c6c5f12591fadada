"""A workload on a layout: the operating point, TTFT, TPOT, throughput and cost.

Colocated engines (prefill and decode in the same steps, the engine's chunked prefill) run in
steady state: each replica keeps B sequences decoding; a request decodes for E[O] steps, so
B / E[O] requests finish, and as many start, per step. One step therefore runs B decode
tokens at the mean decode context plus B / E[O] prompts' new tokens, and

    TPOT = t(B),   throughput = replicas x B / t(B),
    TTFT = the steps that carry the prompt's new tokens, (max_num_batched_tokens - B) of them
           per step beside the B decodes

(queueing before admission is not modelled). B is the largest the engine allows: its
`max_num_seqs`, the KV pool (each sequence holds E[context] + 1 tokens on average), and the token
budget (B + B E[P_new] / E[O] <= max_num_batched_tokens); or, with a `concurrency`, that many in
flight; or, with a `rate`, the smallest B whose throughput keeps up (Little's law).

Disaggregated serving splits the devices into prefill engines (prefill-only steps of a full
token budget) and decode engines (decode-only steps); a prompt's KV moves from one to the other
over the link between them. The system serves min(prefill rate, decode rate) requests per second.
"""

from __future__ import annotations

import dataclasses
import math

from jaxserve.perf.profiles import Link
from jaxserve.perf.speculative import Speculation
from jaxserve.perf.step import Chunk, Deployment, StepTime, decode_chunk
from jaxserve.perf.workload import Workload


@dataclasses.dataclass(frozen=True)
class Operating:
    """One engine (all its replicas) at its operating point."""

    batch: float  # sequences decoding per replica
    step: StepTime
    tpot_s: float
    ttft_s: float
    output_tokens_per_s: float  # the engine, all replicas
    requests_per_s: float
    limited_by: str  # what capped the batch
    saturated: bool = False  # a rate the engine cannot keep up with

    @property
    def bottleneck(self) -> str:
        return "KV capacity" if self.limited_by == "KV capacity" else self.step.bottleneck


class DoesNotFit(ValueError):
    """A layout that cannot hold the model or one request of the workload."""


def _check_fits(d: Deployment, w: Workload, longest: int) -> None:
    if not d.fits:
        raise DoesNotFit(f"weights take {d.weight_bytes_per_device / 1e9:.1f} GB per device, "
                         f"more than the {d.memory_budget / 1e9:.1f} GB usable")
    if d.kv_capacity_tokens < longest:
        raise DoesNotFit(f"KV capacity {d.kv_capacity_tokens} tokens per replica, less than "
                         f"one {longest}-token request")


def _prefill_chunks(w: Workload, prompts: float, samples: bool) -> list[Chunk]:
    """`prompts` prompts' new tokens, spread over the prompt-length points."""
    return [Chunk(int(p * w.prefix_hit_rate), p, prompts * weight, samples)
            for p, weight in w.prompt_len.points]


def _ttft(d: Deployment, w: Workload, decodes: float, room: float) -> float:
    """Seconds until a prompt's first token: the steps that run its new tokens, `room` of them
    per step, each beside `decodes` decoding sequences (averaged over the prompt lengths)."""
    def one(p: int) -> float:
        start, seconds = int(p * w.prefix_hit_rate), 0.0
        while start < p:
            end = min(p, start + max(int(room), 1))
            chunks = [Chunk(start, end, 1, end == p)]
            if decodes:
                chunks.append(decode_chunk(w.mean_decode_context, decodes))
            seconds += d.step(chunks).total_s
            start = end
        return seconds
    return w.prompt_len.mean(one)


def colocated(d: Deployment, w: Workload, engines: int = 1,
              speculation: Speculation | None = None) -> Operating:
    """`engines` identical engines sharing the workload; the operating point of one. With
    `speculation` each step is a round (jaxserve/perf/speculative.py): the decodes verify k
    proposals each and gain its tokens_per_step; `step` is the round's verify step."""
    _check_fits(d, w, w.longest_request)
    replicas = d.replicas * engines
    new_per_output = w.mean_new_prompt / w.mean_output
    per_step = speculation.tokens_per_step if speculation else 1.0  # tokens per sequence
    rows = speculation.num_speculative_tokens + 1 if speculation else 1  # per sequence
    limits = {"max_num_seqs": float(w.max_num_seqs),
              "KV capacity": d.kv_capacity_tokens / w.mean_resident_tokens,
              "token budget": w.max_num_batched_tokens / (rows + per_step * new_per_output)}
    limited_by = min(limits, key=limits.get)
    b_max = limits[limited_by]
    context = w.mean_decode_context

    def step(b: float) -> StepTime:
        decodes = speculation.verify_chunks(context, b) if speculation else \
            [decode_chunk(context, b)]
        return d.step(decodes + _prefill_chunks(w, b * per_step / w.mean_output, samples=False))

    def seconds(b: float) -> float:  # per step (per round)
        verify_s = step(b).total_s
        return speculation.round_s(verify_s, context, b) if speculation else verify_s

    saturated = False
    if w.concurrency is not None:
        if w.concurrency / replicas < b_max:
            b_max, limited_by = w.concurrency / replicas, "concurrency"
    elif w.rate is not None:
        need = w.rate / replicas * w.mean_output  # output tokens/s per replica
        if b_max * per_step / seconds(b_max) < need:
            saturated = True
        else:
            b_max, limited_by = _batch_for_rate(seconds, b_max, need / per_step), "rate"
    s, round_s = step(b_max), seconds(b_max)
    tokens = replicas * b_max * per_step / round_s
    ttft = _ttft(d, w, b_max, w.max_num_batched_tokens - b_max * rows)
    return Operating(b_max, s, round_s / per_step, ttft, tokens / engines,
                     tokens / engines / w.mean_output, limited_by, saturated)


def _batch_for_rate(seconds, b_max: float, need: float) -> float:
    """The smallest batch in (0, b_max] whose tokens per second (batch / step time) reach
    `need`, by bisection (tokens per second grow with the batch)."""
    lo, hi = 0.0, b_max
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid / seconds(mid) < need else (lo, mid)
    return hi


def prefill_role(d: Deployment, w: Workload) -> Operating:
    """A prefill-only engine: every step a full token budget of prompts."""
    _check_fits(d, w, w.prompt_len.max + w.max_num_batched_tokens)
    prompts = w.max_num_batched_tokens / w.mean_new_prompt
    s = d.step(_prefill_chunks(w, prompts, samples=True))
    requests = d.replicas * prompts / s.total_s
    # a prompt waits for the step it is packed into: a full step's time per budget's worth
    ttft = w.prompt_len.mean(lambda p: math.ceil(p * (1 - w.prefix_hit_rate)
                                                 / w.max_num_batched_tokens)) * s.total_s
    return Operating(0.0, s, 0.0, ttft, requests, requests, "token budget")


def decode_role(d: Deployment, w: Workload, rate_per_engine: float | None = None) -> Operating:
    """A decode-only engine (its KV arrives from a prefill engine)."""
    _check_fits(d, w, w.longest_request)
    limits = {"max_num_seqs": float(w.max_num_seqs),
              "KV capacity": d.kv_capacity_tokens / w.mean_resident_tokens}
    limited_by = min(limits, key=limits.get)
    b = limits[limited_by]

    def step(batch: float) -> StepTime:
        return d.step([decode_chunk(w.mean_decode_context, batch)])

    if rate_per_engine is not None:
        need = rate_per_engine / d.replicas * w.mean_output
        if b / step(b).total_s >= need:
            b, limited_by = _batch_for_rate(lambda x: step(x).total_s, b, need), "rate"
    s = step(b)
    tokens = d.replicas * b / s.total_s
    return Operating(b, s, s.total_s, 0.0, tokens, tokens / w.mean_output, limited_by)


def kv_handoff_bytes(decode: Deployment, w: Workload) -> float:
    """One prompt's KV in the decode engine's format (the sender converts before it sends)."""
    return w.mean_prompt * decode.kv_bytes_per_token_model


def kv_handoff_s(prefill: Deployment, decode: Deployment, w: Workload, same_host: bool,
                 link: Link | None = None) -> float:
    """Moving one prompt's KV (in the decode engine's format) from the prefill replica to the
    decode replica: each device sends its shard, over as many links as the smaller replica;
    over `link` when given, else the profile's intra- or inter-host link."""
    if link is None:
        link = prefill.hardware.intra_host if same_host else prefill.hardware.inter_host
    lanes = min(prefill.devices_per_replica, decode.devices_per_replica)
    return kv_handoff_bytes(decode, w) / (link.rate * lanes) + link.latency
