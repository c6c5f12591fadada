"""Which DP replica a new sequence joins: a small policy behind one method.

Each DP replica owns its shard of the KV pool and so its own prefix cache. When a waiting
sequence is admitted, the scheduler shows the policy one `ReplicaView` per replica: how many of
the sequence's tokens that replica has cached, its free sequence slots, and its *load*, the true
FLOPs (jaxserve/flops.py) of the work admitted there and not yet done: the uncached tokens left
to prefill and the tokens left to generate, each with its dense FLOPs plus attention over its
full context (so a long context weighs what it costs, and a cache hit weighs nothing). The
policy returns a replica id; if that replica has no room in this step (a free slot, token
budget, prefill rows or KV blocks), the sequence waits for the next step rather than going
elsewhere, and later sequences may still start on other replicas.

The waiting queue is shared and routing happens at admission, not at arrival: the decision sees
each replica's cache and load as they are when the sequence can start. "Queued" work on a
replica is therefore the admitted sequences still prefilling.

Policies (pass one to `LLM(routing=...)`, by name or as an instance):
- `PrefixAware` (default, "prefix"): the replica caching the longest prefix of the sequence,
  even when it has no free slot right now, unless it is overloaded: its load exceeds the least
  loaded replica's (among those with a free slot) by more than `threshold_flops` AND by more
  than `max_ratio` times. Then, or when no replica caches any of the prefix, the least loaded
  one. Ties go to the lower load, then the lower replica id. (Both conditions, as in SGLang's
  cache-aware router: under a burst every replica is busy and loads differ by a few requests
  all the time, which must not scatter a prefix over every replica; when one replica idles,
  any real backlog elsewhere moves work to it.)
- `LeastLoaded` ("least_loaded"): the lowest load among replicas with a free slot, caches
  ignored.
- `RoundRobin` ("round_robin"): replicas with a free slot in turn.

A policy is any object with `name` and `choose(replicas) -> replica id`; it must be
deterministic (multi-host runs take the same decision on every host). Scoring jobs are routed by
the same policy when their run is made (jaxserve/engine/scoring.py): their views count the
prompt's cached blocks and the run's own queued jobs. `choose_replica` checks every choice.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from jaxserve import flops
from jaxserve.config import ModelConfig
from jaxserve.settings import ROUTING_POLICIES


@dataclasses.dataclass(frozen=True)
class ReplicaView:
    replica: int
    cached_tokens: int  # the sequence's leading tokens this replica's prefix cache holds
    load_flops: int  # true FLOPs of the work admitted there and not yet done
    free_blocks: int  # KV blocks it can hand out (cached ones included)
    free_slots: int  # sequences it can still start (0: the sequence would wait for one)


class RoutingPolicy(Protocol):
    name: str

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        """The replica id a sequence joins; `replicas` holds every replica, in order, and at
        least one has a free slot."""
        ...


def _least_loaded(replicas: Sequence[ReplicaView]) -> ReplicaView:
    """The least loaded replica that can start the sequence now."""
    return min((v for v in replicas if v.free_slots), key=lambda v: (v.load_flops, v.replica))


class PrefixAware:
    name = "prefix"

    def __init__(self, threshold_flops: float, max_ratio: float = 1.5):
        if not threshold_flops >= 0:
            raise ValueError(f"threshold_flops must be >= 0, got {threshold_flops!r}")
        if not max_ratio >= 1:
            raise ValueError(f"max_ratio must be >= 1, got {max_ratio!r}")
        self.threshold_flops = threshold_flops
        self.max_ratio = max_ratio

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        least = _least_loaded(replicas)
        best = min(replicas, key=lambda v: (-v.cached_tokens, v.load_flops, v.replica))
        overloaded = (best.load_flops - least.load_flops > self.threshold_flops
                      and best.load_flops > self.max_ratio * least.load_flops)
        return least.replica if best.cached_tokens == 0 or overloaded else best.replica


class LeastLoaded:
    name = "least_loaded"

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        return _least_loaded(replicas).replica


class RoundRobin:
    name = "round_robin"

    def __init__(self):
        self._next = 0

    def choose(self, replicas: Sequence[ReplicaView]) -> int:
        ids = [v.replica for v in replicas if v.free_slots]
        pick = next((r for r in ids if r >= self._next), ids[0])
        self._next = pick + 1
        return pick


POLICIES = ROUTING_POLICIES
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


def choose_replica(policy: RoutingPolicy, replicas: Sequence[ReplicaView]) -> int:
    """The policy's choice, checked: a replica id among `replicas`."""
    replica = policy.choose(replicas)
    if not (isinstance(replica, int) and 0 <= replica < len(replicas)):
        raise ValueError(f"routing policy {policy.name!r} chose replica {replica!r}; there are "
                         f"{len(replicas)}")
    return replica
