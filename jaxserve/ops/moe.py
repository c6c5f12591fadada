"""Mixture-of-experts execution: each token's top-k (token, expert) pairs through stacked SwiGLU
experts, weighted and summed back per token. Three strategies, one setting (`MoEExecution`),
read when a step's program is traced, so every compiled step shape has its strategy fixed:

- `dense`: every token through every expert, weighted by its routing weight (0 for experts it
  did not pick). Plain XLA, partitioned by XLA. The simple reference.
- `alltoall`: expert weights stay where they are (sharded over the mesh axes of `experts`, `ep`);
  each device sorts its (token, expert) pairs by the device that owns the expert, sends them
  there with an all-to-all, the owner runs them through its experts (grouped matmuls,
  `grouped_swiglu`), and a second all-to-all brings the results back. Nothing is ever dropped:
  the exchange is a fixed-capacity `all_to_all` whose every (sender, receiver) slot holds all of
  the sender's pairs, the most any routing can send there (XLA:CPU has no `ragged_all_to_all`).
  The slack is the price: the owner's grouped matmul runs over ep x the pairs it really got.
  Where the platform has `ragged_all_to_all` (GPU, TPU), the same exchange moves only the rows
  really sent (`MoEExecution.exchange`).
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
import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp

from jaxserve.ops.cost import note_loop
from jaxserve.settings import MOE_STRATEGIES
from jaxserve.sharding import (all_gather_logical, all_to_all_logical, axis_index_logical,
                               axis_size_logical, psum_logical, ragged_all_to_all_logical,
                               shard_map_logical)

STRATEGIES = MOE_STRATEGIES
# Tokens per step above which `auto` gathers expert weights instead of exchanging tokens, where
# nothing better is known. An engine takes its threshold from `moe_auto_threshold`, else from the
# performance model's crossover for its model, mesh and device (jaxserve/perf/moe_auto.py); this
# value (the crossover scripts/bench_moe.py measured on 8 simulated CPU devices, BENCHMARKS.md)
# is only for devices without a hardware profile and for a bare `MoEExecution()`.
DEFAULT_AUTO_THRESHOLD = 512

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


EXCHANGE_KINDS = ("platform", "fixed", "ragged")


@dataclasses.dataclass(frozen=True)
class MoEExecution:
    strategy: str = "auto"
    auto_threshold: int = DEFAULT_AUTO_THRESHOLD
    # How `alltoall` moves tokens: "fixed" capacity, "ragged" (only the rows sent; emulated with
    # a fixed-capacity exchange where the platform lacks the op), or by "platform": ragged on
    # GPU and TPU, fixed on CPU.
    exchange: str = "platform"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"moe_strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.strategy!r}")
        if self.exchange not in EXCHANGE_KINDS:
            raise ValueError(f"exchange must be one of {', '.join(EXCHANGE_KINDS)}, "
                             f"got {self.exchange!r}")
        t = self.auto_threshold
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"moe_auto_threshold must be a non-negative integer (tokens per "
                             f"step), got {t!r}")

    def token_exchange(self) -> str:
        if self.exchange != "platform":
            return self.exchange
        return "fixed" if jax.default_backend() == "cpu" else "ragged"

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


def route_grouped(router_logits: jax.Array, top_k: int, method: str, n_group: int,
                  topk_group: int, normalize: bool, scaling: float,
                  bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """DeepSeek's routers (`config.TOPK_METHODS`), in float32: the experts split into `n_group`
    groups, only the best `topk_group` groups of a token open to it, its top_k experts among
    those; weights times `scaling`.

    "group_limited_greedy" (V2): softmax scores; a group's score is its best expert's.
    "noaux_tc" (V3): sigmoid scores; the choice (of groups, by the sum of their two best, and of
    experts) is by score + `bias`, the weights are the scores without it, renormalised when
    `normalize`. "greedy": `route`'s softmax top-k."""
    logits = router_logits.astype(jnp.float32)
    if method == "greedy":
        ids, weights = route(logits, top_k, normalize)
        return ids, weights * scaling
    tokens, experts = logits.shape
    sigmoid = method == "noaux_tc"
    scores = jax.nn.sigmoid(logits) if sigmoid else jax.nn.softmax(logits, axis=-1)
    choice = scores + bias.astype(jnp.float32) if sigmoid else scores
    grouped = choice.reshape(tokens, n_group, experts // n_group)
    group_scores = (jax.lax.top_k(grouped, 2)[0].sum(-1) if sigmoid else grouped.max(-1))
    open_groups = jax.lax.top_k(group_scores, topk_group)[1]  # [tokens, topk_group]
    is_open = jnp.zeros((tokens, n_group), bool).at[
        jnp.arange(tokens)[:, None], open_groups].set(True)
    is_open = jnp.repeat(is_open, experts // n_group, axis=1)
    # V3 closes a group with -inf, V2 with a 0 score (both as transformers does)
    choice = jnp.where(is_open, choice, -jnp.inf if sigmoid else 0.0)
    ids = jax.lax.top_k(choice, top_k)[1]
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if normalize and sigmoid:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * scaling


def grouped_swiglu(x: jax.Array, expert: jax.Array, w: ExpertWeights) -> jax.Array:
    """Row r of x [rows, embed] through expert `expert[r]` of `w` (rows whose expert is
    `num_experts` or more belong to none and give 0).

    Two implementations of the same grouped matmul, chosen by platform and shape when traced:
    `jax.lax.ragged_dot` (GPU and TPU have grouped-matmul kernels for it), and on CPU, where
    XLA lowers `ragged_dot` to a masked dense product over every group (experts x the work),
    expert tiles: rows sorted by expert, each expert's rows padded to a multiple of a tile, one
    [tile, embed] x [embed, width] product per tile in a loop (measured 5.6x faster at 512 rows
    and 16 experts; tiny batches keep `ragged_dot`, cheaper there)."""
    rows, groups = x.shape[0], w.gate.shape[0]
    if jax.default_backend() == "cpu" and rows > 2 * groups:
        tile = min(64, max(8, 1 << (rows // groups - 1).bit_length()))
        return _grouped_tiled(x, expert, w, tile)
    return _grouped_ragged(x, expert, w)


def _grouped_ragged(x, expert, w: ExpertWeights):
    num_experts = w.gate.shape[0]
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=num_experts).astype(jnp.int32)  # ids >= length: dropped
    xs = x[order]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, sizes)) * jax.lax.ragged_dot(xs, w.up, sizes)
    y = jax.lax.ragged_dot(h, w.down, sizes)
    y = jnp.where((expert[order] < num_experts)[:, None], y, 0)
    return jnp.zeros_like(y).at[order].set(y)


def _grouped_tiled(x, expert, w: ExpertWeights, tile: int):
    groups = w.gate.shape[0]
    rows, width = x.shape
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=groups)
    padded = (sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    padded_start, start = padded_end - padded, jnp.cumsum(sizes) - sizes
    tiles = -(-rows // tile) + groups  # sum of ceil(size / tile) never exceeds this
    sorted_expert = expert[order]
    valid = sorted_expert < groups
    g = jnp.minimum(sorted_expert, groups - 1)
    slot = jnp.where(valid, padded_start[g] + jnp.arange(rows) - start[g], tiles * tile)
    grid = jnp.zeros((tiles * tile, width), x.dtype).at[slot].set(x[order], mode="drop")
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(tiles) * tile,
                                               side="right"), groups - 1)

    def one_tile(_, inputs):
        xt, e = inputs
        h = jax.nn.silu(xt @ w.gate[e]) * (xt @ w.up[e])
        return None, h @ w.down[e]

    note_loop(tiles, 2 * 3 * tile * width * w.gate.shape[2])
    _, y = jax.lax.scan(one_tile, None, (grid.reshape(tiles, tile, width), tile_expert))
    y = y.reshape(tiles * tile, -1).at[slot].get(mode="fill", fill_value=0)
    y = jnp.where(valid[:, None], y, 0)
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


def _exchange_fixed(rows, expert, no_expert, dest, rank, counts, starts, devices):
    """Send row i (sorted by `dest`) to device dest[i] in slot (dest, rank): a [devices, n]
    buffer each way, the capacity no routing can overflow. Returns the rows received [devices *
    n, embed] (sender p's at [p*n, p*n + its count)), their experts (`no_expert` in empty slots),
    and `back(y)`, which returns results computed on those rows to their senders, in the order
    the rows were sent."""
    n = rows.shape[0]
    send = jnp.zeros((devices, n, rows.shape[1]), rows.dtype).at[dest, rank].set(rows)
    send_expert = jnp.full((devices, n), no_expert, jnp.int32).at[dest, rank].set(expert)
    received = all_to_all_logical(send, "experts", 0, 0).reshape(devices * n, -1)
    received_expert = all_to_all_logical(send_expert, "experts", 0, 0).reshape(-1)

    def back(y):
        return all_to_all_logical(y.reshape(devices, n, -1), "experts", 0, 0)[dest, rank]

    return received, received_expert, back


def _exchange_ragged(rows, expert, no_expert, dest, rank, counts, starts, devices):
    """The same exchange moving only the rows each device really sends
    (`ragged_all_to_all`); received rows land where the fixed exchange puts them."""
    n = rows.shape[0]
    me = axis_index_logical("experts")
    recv_counts = all_to_all_logical(counts, "experts", 0, 0)  # [senders]
    their_starts = all_to_all_logical(starts, "experts", 0, 0)  # where my rows sit at each sender
    slot = jnp.arange(devices, dtype=jnp.int32) * n
    mine = jnp.full((devices,), me * n, jnp.int32)
    received = ragged_all_to_all_logical(rows, jnp.zeros((devices * n, rows.shape[1]), rows.dtype),
                                         starts, counts, mine, recv_counts, "experts")
    received_expert = ragged_all_to_all_logical(expert, jnp.full((devices * n,), no_expert,
                                                                 jnp.int32),
                                                starts, counts, mine, recv_counts, "experts")

    def back(y):
        return ragged_all_to_all_logical(y, jnp.zeros((n, y.shape[1]), y.dtype), slot,
                                         recv_counts, their_starts, counts, "experts")

    return received, received_expert, back


EXCHANGES = {"fixed": _exchange_fixed, "ragged": _exchange_ragged}


def _alltoall_local(exchange, x, ids, weights, gate, up, down):
    """Per device: x [T, embed] its tokens, ids/weights [T, k], its experts' weights."""
    local_experts = gate.shape[0]
    devices = axis_size_logical("experts")
    pairs = ids.reshape(-1)
    n = pairs.shape[0]
    owner = pairs // local_experts
    # Pairs grouped by owner: row i goes to dest[i], slot rank[i] among that owner's rows.
    order = jnp.argsort(owner, stable=True)
    counts = jnp.bincount(owner, length=devices).astype(jnp.int32)
    starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    dest = owner[order]
    rank = jnp.arange(n) - starts[dest]
    received, received_expert, back = EXCHANGES[exchange](
        x[order // ids.shape[1]], (pairs % local_experts)[order].astype(jnp.int32),
        local_experts, dest, rank, counts, starts, devices)
    y = grouped_swiglu(received, received_expert, ExpertWeights(gate, up, down))
    pair_out = jnp.zeros((n, x.shape[1]), x.dtype).at[order].set(back(y))
    return psum_logical(_combine(pair_out, weights), "expert_mlp")


def experts_alltoall(x, ids, weights, w: ExpertWeights, exchange: str) -> jax.Array:
    return shard_map_logical(
        functools.partial(_alltoall_local, exchange),
        (TOKEN_AXES, PAIR_AXES, PAIR_AXES, EXPERT_AXES, EXPERT_AXES, DOWN_AXES),
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
        return experts_alltoall(x, ids, weights, w, _ACTIVE.get().token_exchange())
    if strategy == "allgather":
        return experts_allgather(x, ids, weights,
                                 gathered if gathered is not None else gather_experts(w))
    raise ValueError(f"unknown MoE strategy {strategy!r}")

