"""Mixture-of-experts execution: each token's top-k (token, expert) pairs through stacked SwiGLU
experts, weighted and summed back per token. Three strategies, one setting (`MoEExecution`),
read when a step's program is traced, so every compiled step shape has its strategy fixed:

- `dense`: every token through every expert, weighted by its routing weight (0 for experts it
  did not pick). Plain XLA, partitioned by XLA. The simple reference.
- `alltoall`: expert weights stay where they are (sharded over the mesh axes of `experts`, `ep`);
  each device sorts its (token, expert) pairs by the device that owns the expert, sends them
  there with an all-to-all, the owner runs them through its experts (grouped matmuls,
  `jax.lax.ragged_dot`), and a second all-to-all brings the results back. Nothing is ever dropped:
  the exchange is a fixed-capacity `all_to_all` whose every (sender, receiver) slot holds all of
  the sender's pairs, the most any routing can send there (XLA:CPU has no `ragged_all_to_all`).
  The slack is the price: the owner's grouped matmul runs over ep x the pairs it really got.
- `allgather`: expert weights stay sharded at rest; each MoE layer's weights are all-gathered
  (the model issues the gather one MoE layer ahead, so it can overlap the layer before) and
  every device runs its own tokens through all experts locally. Tokens never leave their device.
  Pays weight bytes per layer instead of activation bytes: better once a step has enough tokens
  (the MoE-Prefill paper's prefill-only regime).
- `auto`: `allgather` for steps of more than `auto_threshold` tokens, else `alltoall`.

Expert width (`expert_mlp`) may be split over `tp`: each device then computes a partial output
over its slice, summed over `tp` at the end. All strategies give the same result up to float
summation order. Sharding is named by logical axes (`sharding.shard_map_logical`,
`*_logical` collectives); nothing here names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp

from jaxserve.sharding import (all_gather_logical, all_to_all_logical, axis_size_logical,
                               psum_logical, shard_map_logical)

STRATEGIES = ("dense", "alltoall", "allgather", "auto")
# Tokens per step above which `auto` gathers expert weights instead of exchanging tokens: the
# crossover measured by scripts/bench_moe.py (BENCHMARKS.md). Set per engine with
# `moe_auto_threshold`.
DEFAULT_AUTO_THRESHOLD = 256

EXPERT_AXES = ("experts", "embed", "expert_mlp")  # gate_proj, up_proj: [experts, embed, width]
DOWN_AXES = ("experts", "expert_mlp", "embed")  # down_proj: [experts, width, embed]
GATHERED_AXES = (None, "embed", "expert_mlp")  # after the all-gather: every expert on each device
GATHERED_DOWN_AXES = (None, "expert_mlp", "embed")
TOKEN_AXES = ("batch", "embed")
PAIR_AXES = ("batch", None)  # [tokens, top_k]


class ExpertWeights(NamedTuple):
    gate: jax.Array  # [experts, embed, width]
    up: jax.Array  # [experts, embed, width]
    down: jax.Array  # [experts, width, embed]


@dataclasses.dataclass(frozen=True)
class MoEExecution:
    strategy: str = "auto"
    auto_threshold: int = DEFAULT_AUTO_THRESHOLD

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"moe_strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.strategy!r}")
        t = self.auto_threshold
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"moe_auto_threshold must be a non-negative integer (tokens per "
                             f"step), got {t!r}")

    def resolve(self, num_tokens: int) -> str:
        """The strategy a step of `num_tokens` tokens (all replicas together) runs."""
        if self.strategy != "auto":
            return self.strategy
        return "allgather" if num_tokens > self.auto_threshold else "alltoall"


_ACTIVE: contextvars.ContextVar[MoEExecution] = contextvars.ContextVar(
    "moe_execution", default=MoEExecution())


@contextlib.contextmanager
def moe_execution(execution: MoEExecution) -> Iterator[MoEExecution]:
    """Trace MoE layers with this execution setting."""
    token = _ACTIVE.set(execution)
    try:
        yield execution
    finally:
        _ACTIVE.reset(token)


def active_strategy(num_tokens: int) -> str:
    return _ACTIVE.get().resolve(num_tokens)


# ---- routing and the grouped expert computation (per device) ----

def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over experts in float32, the top_k experts per token and their probabilities
    (renormalised to sum to 1 when `normalize`): ids i32[tokens, k], weights f32[tokens, k]."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


def grouped_swiglu(x: jax.Array, expert: jax.Array, w: ExpertWeights) -> jax.Array:
    """Row r of x [rows, embed] through expert `expert[r]` of `w` (rows whose expert is
    `num_experts` or more belong to none and give 0): sorted by expert, three grouped matmuls."""
    num_experts = w.gate.shape[0]
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=num_experts).astype(jnp.int32)  # ids >= length: dropped
    xs = x[order]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, sizes)) * jax.lax.ragged_dot(xs, w.up, sizes)
    y = jax.lax.ragged_dot(h, w.down, sizes)
    y = jnp.where((expert[order] < num_experts)[:, None], y, 0)
    return jnp.zeros_like(y).at[order].set(y)


def _combine(pair_out: jax.Array, weights: jax.Array) -> jax.Array:
    """[tokens * k, embed] outputs of each (token, expert) pair -> [tokens, embed]."""
    t, k = weights.shape
    out = (pair_out.reshape(t, k, -1).astype(jnp.float32) * weights[..., None]).sum(axis=1)
    return out.astype(pair_out.dtype)


# ---- strategies ----

def experts_dense(x: jax.Array, ids: jax.Array, weights: jax.Array,
                  w: ExpertWeights) -> jax.Array:
    h = (jax.nn.silu(jnp.einsum("te,xem->txm", x, w.gate))
         * jnp.einsum("te,xem->txm", x, w.up))
    y = jnp.einsum("txm,xme->txe", h, w.down)
    t = x.shape[0]
    dense_weights = jnp.zeros((t, w.gate.shape[0]), jnp.float32).at[
        jnp.arange(t)[:, None], ids].add(weights)
    return jnp.einsum("tx,txe->te", dense_weights.astype(x.dtype), y)


def _alltoall_local(x, ids, weights, gate, up, down):
    """Per device: x [T, embed] its tokens, ids/weights [T, k], its experts' weights."""
    local_experts = gate.shape[0]
    devices = axis_size_logical("experts")
    pairs = ids.reshape(-1)
    n = pairs.shape[0]
    owner = pairs // local_experts
    # Pairs grouped by owner; slot (owner, rank among that owner's pairs). Capacity n per owner:
    # a device can send at most all of its pairs to one owner, so nothing ever overflows.
    order = jnp.argsort(owner, stable=True)
    counts = jnp.bincount(owner, length=devices)
    starts = jnp.cumsum(counts) - counts
    dest = owner[order]
    rank = jnp.arange(n) - starts[dest]
    send = jnp.zeros((devices, n, x.shape[1]), x.dtype).at[dest, rank].set(x[order // ids.shape[1]])
    send_expert = jnp.full((devices, n), local_experts, jnp.int32).at[dest, rank].set(
        (pairs % local_experts)[order])
    received = all_to_all_logical(send, "experts", 0, 0)  # [senders, n, embed]
    received_expert = all_to_all_logical(send_expert, "experts", 0, 0)
    y = grouped_swiglu(received.reshape(devices * n, -1), received_expert.reshape(-1),
                       ExpertWeights(gate, up, down))
    back = all_to_all_logical(y.reshape(devices, n, -1), "experts", 0, 0)  # [owners, n, embed]
    pair_out = jnp.zeros((n, x.shape[1]), x.dtype).at[order].set(back[dest, rank])
    return psum_logical(_combine(pair_out, weights), "expert_mlp")


def experts_alltoall(x, ids, weights, w: ExpertWeights) -> jax.Array:
    return shard_map_logical(
        _alltoall_local, (TOKEN_AXES, PAIR_AXES, PAIR_AXES, EXPERT_AXES, EXPERT_AXES, DOWN_AXES),
        TOKEN_AXES)(x, ids, weights, *w)


def _gather_local(gate, up, down):
    return tuple(all_gather_logical(a, "experts", 0) for a in (gate, up, down))


def gather_experts(w: ExpertWeights) -> ExpertWeights:
    """Every expert's weights on every device (width still split as the rules say)."""
    return ExpertWeights(*shard_map_logical(
        _gather_local, (EXPERT_AXES, EXPERT_AXES, DOWN_AXES),
        (GATHERED_AXES, GATHERED_AXES, GATHERED_DOWN_AXES))(*w))


def _allgather_local(x, ids, weights, gate, up, down):
    pairs = ids.reshape(-1)
    rows = jnp.repeat(x, ids.shape[1], axis=0)  # pair p = (token p // k, its p % k-th expert)
    pair_out = grouped_swiglu(rows, pairs, ExpertWeights(gate, up, down))
    return psum_logical(_combine(pair_out, weights), "expert_mlp")


def experts_allgather(x, ids, weights, gathered: ExpertWeights) -> jax.Array:
    """`gathered`: `gather_experts` of this layer's weights (issued ahead by the model)."""
    return shard_map_logical(
        _allgather_local,
        (TOKEN_AXES, PAIR_AXES, PAIR_AXES, GATHERED_AXES, GATHERED_AXES, GATHERED_DOWN_AXES),
        TOKEN_AXES)(x, ids, weights, *gathered)


def run_experts(strategy: str, x, ids, weights, w: ExpertWeights,
                gathered: ExpertWeights | None = None) -> jax.Array:
    """x [tokens, embed] -> the weighted sum of each token's experts, [tokens, embed]."""
    if strategy == "dense":
        return experts_dense(x, ids, weights, w)
    if strategy == "alltoall":
        return experts_alltoall(x, ids, weights, w)
    if strategy == "allgather":
        return experts_allgather(x, ids, weights,
                                 gathered if gathered is not None else gather_experts(w))
    raise ValueError(f"unknown MoE strategy {strategy!r}")

