"""Which DP replica a new sequence joins: a small policy behind one method.

Each DP replica owns its shard of the KV pool and so its own prefix cache. When a waiting
sequence is admitted, the scheduler shows the policy one `ReplicaView` per replica with a free
sequence slot: how many of the sequence's tokens that replica has cached, and its *load*, the
true FLOPs (jaxserve/flops.py) of the work admitted there and not yet done: the uncached tokens
left to prefill and the tokens left to generate, each with its dense FLOPs plus attention over
its full context (so a long context weighs what it costs, and a cache hit weighs nothing). The
policy returns a replica id; if that replica has no room in this step (token budget, prefill
rows or KV blocks), the sequence waits for the next step rather than going elsewhere.

The waiting queue is shared and routing happens at admission, not at arrival: the decision sees
each replica's cache and load as they are when the sequence can start. "Queued" work on a
replica is therefore the admitted sequences still prefilling.

Policies (pass one to `LLM(routing=...)`, by name or as an instance):
- `PrefixAware` (default, "prefix"): the replica caching the longest prefix of the sequence,
  unless its load exceeds the least loaded replica's by more than `threshold_flops`; then the
  least loaded one. Ties go to the lower load, then the lower replica id.
- `LeastLoaded` ("least_loaded"): the lowest load, caches ignored.
- `RoundRobin` ("round_robin"): replicas in turn.

A policy is any object with `name` and `choose(replicas) -> replica id`; it must be
deterministic (multi-host runs take the same decision on every host).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from jaxserve import flops
from jaxserve.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ReplicaView:
    replica: int
    cached_tokens: int  # the sequence's leading tokens this replica's prefix cache holds
    load_flops: int  # true FLOPs of the work admitted there and not yet done
    free_blocks: int  # KV blocks it can hand out (cached ones included)


class RoutingPolicy(Protocol):
    name: str

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        """The replica id a sequence joins; `replicas` is non-empty, in replica order."""
        ...


class PrefixAware:
    name = "prefix"

    def __init__(self, threshold_flops: float):
        if not threshold_flops >= 0:
            raise ValueError(f"threshold_flops must be >= 0, got {threshold_flops!r}")
        self.threshold_flops = threshold_flops

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        least = min(replicas, key=lambda v: (v.load_flops, v.replica))
        best = min(replicas, key=lambda v: (-v.cached_tokens, v.load_flops, v.replica))
        if best.load_flops - least.load_flops > self.threshold_flops:
            return least.replica
        return best.replica


class LeastLoaded:
    name = "least_loaded"

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        return min(replicas, key=lambda v: (v.load_flops, v.replica)).replica


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._next = 0

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        ids = [v.replica for v in replicas]
        pick = next((r for r in ids if r >= self._next), ids[0])
        self._next = pick + 1
        return pick


POLICIES = ("prefix", "least_loaded", "round_robin")
DEFAULT_THRESHOLD_STEPS = 4


def default_threshold(config: ModelConfig, max_num_batched_tokens: int) -> int:
    """`PrefixAware`'s default: the true FLOPs of prefilling DEFAULT_THRESHOLD_STEPS full steps
    of tokens from an empty context, about that many steps of work for one replica."""
    return flops.chunk_flops(config, 0, DEFAULT_THRESHOLD_STEPS * max_num_batched_tokens, 0)


def make_policy(routing, config: ModelConfig, max_num_batched_tokens: int) -> RoutingPolicy:
    """A policy from a name in POLICIES, or the given policy object itself."""
    if isinstance(routing, str):
        if routing == "prefix":
            return PrefixAware(default_threshold(config, max_num_batched_tokens))
        if routing == "least_loaded":
            return LeastLoaded()
        if routing == "round_robin":
            return RoundRobin()
        raise ValueError(f"routing must be one of {list(POLICIES)} or a policy object, got "
                         f"{routing!r}")
    if not callable(getattr(routing, "choose", None)) or not isinstance(
            getattr(routing, "name", None), str):
        raise TypeError(f"routing must be one of {list(POLICIES)} or an object with a `name` and "
                        f"a `choose(replicas)` method, got {type(routing).__name__}")
    return routing


def remaining_flops(config: ModelConfig, start: int, prompt_len: int, max_tokens: int,
                    sampled: int) -> int:
    """True FLOPs still ahead of a sequence whose KV is computed up to `start` (cache hits
    included), with `sampled` of its `max_tokens` output tokens already sampled. The last
    output token is never fed back, so the tokens to compute end at prompt + max_tokens - 1."""
    end = max(start, prompt_len + max_tokens - 1)
    return flops.chunk_flops(config, start, end, max(0, max_tokens - sampled))
