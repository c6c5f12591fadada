"""One engine step's time on one layout: ops, collectives, host.

A step runs `Chunk`s on every DP replica at once (the engine's one program per step): decodes
(one token at a context) and prefill chunks (tokens start..end-1 of a prompt whose first
`start` tokens are already cached). Its time on one device is

    sum over ops of max(FLOPs / FLOP rate, bytes / byte rate)       (the roofline of each op)
  + sum over collectives of their ring / tree time                  (`collectives`)
  + layers x the device's fixed time per layer                     (kernel launches)
  + the host's per-step time                                       (Amdahl's serial part)

with nothing overlapped: XLA runs a layer's collectives between its products, and the host
term is what the engine does not hide behind the device (what `jaxserve calibrate` measures).
Ops: the q/k/v/o projections, the dense MLPs, the MoE router and experts, attention over the
cached context (the quadratic term; reads the KV pages), the LM head. FLOPs are the true
counts of `jaxserve.flops` times the share of the op's weights a device holds (each weight
element takes part in one multiply-add per row, so a device holding a fraction of an op's
weights does that fraction of its products; copies of KV heads and vocabulary padding count,
as the devices compute them). Bytes are the op's weights on the device (read once per step)
plus, for attention, the KV pages read and written. The collectives follow from the rules:
a parameter whose *contracted* axis is split (`shapes.Param.contracts`) leaves partial sums
that are all-reduced over those mesh axes; vocabulary-split logits are gathered to sample;
experts exchange tokens or gather weights by the MoE strategy.

MoE `auto` follows the engine's rule (`ops.moe.MoEExecution.resolve`): allgather for steps of
more than a threshold of tokens (all replicas together), alltoall otherwise. The threshold is
the one the engine uses: `moe_auto_threshold` when it is set explicitly, else
`moe_crossover_tokens()`, the step size past which this model, on this profile, finds gathering
the experts' weights cheaper than exchanging tokens. So `plan` predicts the strategy the engine
runs, and the engine takes its threshold from here (`perf/moe_auto.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

from jaxserve import flops
from jaxserve.config import ModelConfig
from jaxserve.perf import collectives
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import Hardware
from jaxserve.perf.shapes import Param, kv_cache_per_token, parameters
from jaxserve.placement import fit_to_layout
from jaxserve.rules import MeshRules, Rules, replicas_of

MOE_STRATEGIES = ("auto", "alltoall", "allgather")
MOE_EXCHANGES = ("ragged", "fixed")
LOGIT_BYTES = 4  # logits are float32
# The largest step (tokens, all replicas together) the MoE crossover is looked for in: past it
# `auto` keeps alltoall.
MOE_CROSSOVER_LIMIT = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chunk:
    """`count` sequences of each replica, each running its tokens start..end-1 this step
    (positions before `start` are read from the cache); `samples`: the chunk yields a token."""

    start: int
    end: int
    count: float = 1.0
    samples: bool = True

    @property
    def tokens(self) -> float:
        return (self.end - self.start) * self.count


def decode_chunk(context: float, batch: float) -> Chunk:
    """`batch` sequences each decoding the token after `context` cached ones."""
    context = int(round(context))
    return Chunk(context, context + 1, batch)


@dataclasses.dataclass(frozen=True)
class OpTime:
    name: str
    flops: float
    bytes: float
    flop_s: float
    byte_s: float

    @property
    def seconds(self) -> float:
        return max(self.flop_s, self.byte_s)

    @property
    def bound(self) -> str:
        return "compute" if self.flop_s >= self.byte_s else "memory bandwidth"


@dataclasses.dataclass(frozen=True)
class CollectiveTime:
    name: str
    kind: str  # all-reduce, all-gather, all-to-all
    nbytes: float  # per call
    calls: int
    group: collectives.Group
    seconds: float  # all calls together


@dataclasses.dataclass(frozen=True)
class StepTime:
    ops: tuple[OpTime, ...]
    collectives: tuple[CollectiveTime, ...]
    launch_s: float  # the device's fixed time per layer, all layers
    host_s: float
    tokens: float  # per replica
    sequences: float  # per replica
    moe_strategy: str | None = None

    @property
    def device_s(self) -> float:
        return sum(o.seconds for o in self.ops) + self.interconnect_s + self.launch_s

    @property
    def interconnect_s(self) -> float:
        return sum(c.seconds for c in self.collectives)

    @property
    def total_s(self) -> float:
        return self.device_s + self.host_s

    def breakdown(self) -> dict[str, float]:
        """Seconds by what bounds them: compute, memory bandwidth, interconnect, kernel
        launches (fixed per layer), host."""
        out = {"compute": 0.0, "memory bandwidth": 0.0}
        for o in self.ops:
            out[o.bound] += o.seconds
        out["interconnect"] = self.interconnect_s
        out["kernel launches"] = self.launch_s
        out["host"] = self.host_s
        return out

    @property
    def bottleneck(self) -> str:
        parts = self.breakdown()
        return max(parts, key=parts.get)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)


class Deployment:
    """One engine: a model fitted to a mesh and rules, on one kind of device, at one precision."""

    def __init__(self, config: ModelConfig, mesh: str | dict[str, int] | None,
                 rules: str | Rules, hardware: Hardware, precision: Precision | None = None,
                 moe_strategy: str = "auto", moe_auto_threshold: int | None = None,
                 moe_exchange: str | None = None):
        if moe_strategy not in MOE_STRATEGIES:
            raise ValueError(f"moe_strategy must be one of {', '.join(MOE_STRATEGIES)} (the "
                             f"dense strategy is a reference, not modelled), got {moe_strategy!r}")
        if moe_exchange not in (None, *MOE_EXCHANGES):
            raise ValueError(f"moe_exchange must be one of {', '.join(MOE_EXCHANGES)}, got "
                             f"{moe_exchange!r}")
        # how alltoall moves tokens, as the engine does (`ops.moe.MoEExecution.token_exchange`):
        # "ragged" (only the rows sent; GPU, TPU) or "fixed" (fixed-capacity slots, senders x
        # the rows; XLA:CPU, whose simulated devices are the profiles that share compute)
        self.moe_exchange = moe_exchange or ("fixed" if hardware.shared_compute else "ragged")
        self.base = config
        self.mesh = MeshRules.create(mesh, rules)
        self.config = fit_to_layout(config, self.mesh)  # what the devices hold
        self.hardware = hardware
        self.precision = precision or Precision()
        self.moe_strategy = moe_strategy
        self._moe_auto_threshold = moe_auto_threshold  # None: the crossover
        self._crossover: dict[int, int] = {}
        self.replicas = replicas_of(self.mesh)
        self.params = parameters(self.config)
        self._true = parameters(config)
        # Simulated devices share one host's cores and memory: each runs at 1/n of it.
        self._sharing = (min(self.devices, hardware.devices_per_host)
                         if hardware.shared_compute else 1)
        self._bytes = {n: self.param_bytes(n) for n in self.params}
        self._shares: dict[str, float] = {}
        self._reduces = self._contracted_splits()

    # ---- the layout ----
    @property
    def devices(self) -> int:
        return self.mesh.num_devices

    @property
    def devices_per_replica(self) -> int:
        return self.devices // self.replicas

    @property
    def label(self) -> str:
        """'tp=2,ep=4 (tp_ep)': the mesh (axes of size 1 left out) and the rules."""
        mesh = ",".join(f"{a}={n}" for a, n in self.mesh.shape.items() if n > 1) or "tp=1"
        return f"{mesh} ({self.mesh.rules.name})"

    # ---- memory ----
    def _split(self, name: str, p: Param) -> int:
        return self.mesh.split_factor(p.axes, p.shape, f"parameter {name!r}")

    def param_bytes(self, name: str) -> float:
        """Bytes of parameter `name` on one device."""
        p = self.params[name]
        return p.size * self.precision.weight_bytes / self._split(name, p)

    @property
    def weight_bytes_per_device(self) -> float:
        return sum(self._bytes.values())

    def _op_params(self, op: str) -> list[str]:
        if op == "lm_head" and self.config.tie_word_embeddings:
            return ["embed/embedding"]  # the tied head reads the embedding
        return [n for n, p in self.params.items() if p.op == op]

    def op_bytes(self, op: str) -> float:
        return sum(self._bytes[n] for n in self._op_params(op))

    def op_share(self, op: str) -> float:
        """The fraction of op `op`'s products one device computes: its elements of the op's
        weights over the model's own (unpadded, uncopied) elements."""
        if op not in self._shares:
            names = self._op_params(op)
            held = sum(self.params[n].size / self._split(n, self.params[n]) for n in names)
            self._shares[op] = held / sum(self._true[n].size for n in names)
        return self._shares[op]

    @property
    def kv_bytes_per_token(self) -> float:
        """KV bytes one token keeps on one device of its replica, all layers (the engine's
        `sizing.bytes_per_block_per_device` / block_size)."""
        total = 0.0
        for name, (shape, axes) in kv_cache_per_token(self.config).items():
            total += (math.prod(shape) * self.precision.kv_bytes
                      / self.mesh.split_factor(axes, shape, f"KV cache {name!r}"))
        return total * self.config.num_layers

    @property
    def kv_bytes_per_token_model(self) -> float:
        """KV bytes one token keeps in the whole model (no copies of KV heads): what a handoff
        between engines moves."""
        return self.precision.kv_bytes * self.base.num_layers * sum(
            math.prod(shape) for shape, _ in kv_cache_per_token(self.base).values())

    @property
    def memory_budget(self) -> float:
        return self.hardware.memory_capacity * self.hardware.memory_fraction

    @property
    def fits(self) -> bool:
        return self.weight_bytes_per_device < self.memory_budget

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache one replica holds in the memory its weights leave."""
        free = self.memory_budget - self.weight_bytes_per_device
        return max(0, int(free // self.kv_bytes_per_token))

    # ---- rates ----
    def _op(self, name: str, flop_count: float, nbytes: float, rows: float,
            width: int | None = None, byte_rate: float | None = None) -> OpTime:
        """An op whose products have `rows` rows, in the matmul shape class of `width` (the
        model's hidden size unless given): the slower of its FLOPs at that rate and its bytes."""
        flop_rate = self.hardware.matmul_rate(self.precision.compute, rows,
                                              width or self.config.hidden_size) / self._sharing
        byte_rate = (byte_rate or self.hardware.stream_rate) / self._sharing
        return OpTime(name, flop_count, nbytes, flop_count / flop_rate if flop_count else 0.0,
                      nbytes / byte_rate)

    def _collective(self, name: str, kind: str, nbytes: float, calls: int,
                    axes: tuple[str, ...]) -> CollectiveTime | None:
        group = collectives.group_of(self.mesh.shape, axes, self.hardware.devices_per_host)
        if group.size <= 1 or calls == 0:
            return None
        one = collectives.GROUP_COLLECTIVES[kind](nbytes, group, self.hardware)
        return CollectiveTime(name, kind, nbytes, calls, group, one * calls)

    def _split_axes(self, logical: Iterable[str | None], shape, names) -> tuple[str, ...]:
        """Mesh axes (of size > 1) that split the dims of a tensor named in `names`."""
        placed = self.mesh.mesh_axes(tuple(logical), tuple(shape))
        return tuple(a for name, axes in zip(logical, placed) if name in names for a in axes
                     if self.mesh.shape[a] > 1)

    # ---- MoE auto: the engine's rule ----
    def moe_experts_seconds(self, tokens: float, strategy: str) -> float:
        """The MoE experts' time (op and collectives) in a step of `tokens` per replica."""
        _, op, coll = self._experts(tokens, strategy)
        return op.seconds + sum(c.seconds for c in coll if c is not None)

    def moe_crossover_tokens(self, limit: int = MOE_CROSSOVER_LIMIT) -> int:
        """The largest step, in tokens of all replicas together (what the engine counts), at
        which exchanging tokens (alltoall) is no slower than gathering the experts' weights
        (allgather); `limit` when allgather never wins up to it. Found by doubling, then
        bisection: one crossover is assumed (allgather's cost is fixed per layer, alltoall's
        grows with the tokens)."""
        if not self.config.num_moe_layers:
            raise ValueError("the model has no MoE layers: no MoE crossover")
        if limit not in self._crossover:
            self._crossover[limit] = self._find_crossover(limit)
        return self._crossover[limit]

    def _find_crossover(self, limit: int) -> int:

        def gathers(total: int) -> bool:
            t = total / self.replicas
            return self.moe_experts_seconds(t, "allgather") < self.moe_experts_seconds(
                t, "alltoall")

        if gathers(1):
            return 0
        low, high = 1, 2  # alltoall holds at low
        while not gathers(high):
            if high >= limit:
                return limit
            low, high = high, min(2 * high, limit)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if gathers(mid) else (mid, high)
        return low

    @property
    def moe_auto_threshold(self) -> int:
        """Tokens per step (all replicas) above which `auto` gathers: the explicit setting, else
        the crossover."""
        if self._moe_auto_threshold is not None:
            return self._moe_auto_threshold
        return self.moe_crossover_tokens()

    def moe_auto_strategy(self, tokens: float) -> str:
        """What `auto` runs for a step of `tokens` per replica: the engine's rule."""
        total = tokens * self.replicas
        return "allgather" if total > self.moe_auto_threshold else "alltoall"

    # ---- the step ----
    def step(self, chunks: Iterable[Chunk], moe_strategy: str | None = None) -> StepTime:
        """The time of one step that runs `chunks` on every replica."""
        chunks = [c for c in chunks if c.count > 0]
        base, cfg, hw = self.base, self.config, self.hardware
        tokens = sum(c.tokens for c in chunks)
        sequences = sum(c.count for c in chunks)
        rows = sum(c.count for c in chunks if c.samples)
        layers = cfg.num_layers
        ops = [self._op("q/k/v/o projections", tokens * layers
                        * flops.attention_projection_flops(base) * self.op_share("attention"),
                        self.op_bytes("attention"), tokens)]
        dense = [i for i in range(layers) if not cfg.moe_layer(i)]
        shared = cfg.num_moe_layers * flops.shared_experts_flops(base) if cfg.is_moe else 0
        if dense or shared:  # the dense MLPs, and the shared experts beside routed ones
            mlp = sum(flops.mlp_flops(base, i) for i in dense) + shared
            ops.append(self._op("mlp", tokens * mlp * self.op_share("mlp"),
                                self.op_bytes("mlp"), tokens))
        coll = self._contraction_all_reduces(tokens)
        strategy = None
        if cfg.num_moe_layers:  # a MoE family whose layers are all dense has no experts
            moe_layers = cfg.num_moe_layers
            ops.append(self._op("router", tokens * moe_layers * flops.router_flops(base)
                                * self.op_share("router"), self.op_bytes("router"), tokens))
            strategy, experts_op, experts_coll = self._experts(tokens, moe_strategy)
            ops.append(experts_op)
            coll += experts_coll
        ops.append(self._attention(chunks, tokens))
        coll.append(self._latent_output_sum(tokens))
        ops.append(self._op("lm head", flops.lm_head_flops(base, 1) * rows
                            * self.op_share("lm_head"), self.op_bytes("lm_head"), rows))
        head = self._op_params("lm_head")[0]
        p = self.params[head]
        vocab_axes = self._split_axes(p.axes, p.shape, ("vocab",))
        if rows:
            coll.append(self._collective("logits gathered for sampling", "all-gather",
                                         rows * cfg.vocab_rows * LOGIT_BYTES, 1, vocab_axes))
        host = hw.host.seconds(sequences * self.replicas)
        return StepTime(tuple(ops), tuple(c for c in coll if c is not None),
                        layers * hw.layer_overhead_s, host, tokens, sequences, strategy)

    def _attention(self, chunks: list[Chunk], tokens: float) -> OpTime:
        """Scores and weighted values over each token's context (the quadratic term), and
        the KV pages: each query block of a chunk reads its context once; every new token's
        K and V are written."""
        q_split = self.mesh.split_factor(("q_heads",), (self.config.num_heads,))
        share, rows, width = 1 / q_split, self.config.q_per_kv, self.config.head_dim
        if self.config.is_mla:  # absorbed: one latent read by a device's heads together
            share, rows, width = self._latent_attention_share(q_split)
        score_flops = sum(c.count * flops.attention_score_flops(self.base, c.start, c.end)
                          for c in chunks) * share
        block = self.hardware.attention_query_block
        per_token = self.kv_bytes_per_token
        read = sum(c.count * c.end * per_token * math.ceil((c.end - c.start) / block)
                   for c in chunks)
        prefill = any(c.end - c.start > 1 for c in chunks)
        return self._op("attention over the context", score_flops, read + tokens * per_token,
                        block if prefill else rows, width, self.hardware.attention_rate)

    @property
    def latent_split(self) -> int:
        """Into how many slices the rules split an MLA model's latent (TPLA; 1: replicated)."""
        return self.mesh.split_factor(("latent",), (self.config.kv_lora_rank,))

    def _latent_attention_share(self, q_split: int) -> tuple[float, int, int]:
        """MLA's attention on one device: (its share of the model's score FLOPs, the query rows
        of one latent's products, their width). Replicated latent: the device's heads over the
        whole latent and rope key. Split (TPLA): every head over its 1/n of the latent and the
        whole rope key (`ops.latent_attention`)."""
        cfg, n = self.config, self.latent_split
        lat, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        heads = cfg.num_heads if n > 1 else cfg.num_heads // q_split
        share = heads / cfg.num_heads * (2 * lat / n + rope) / (2 * lat + rope)
        return share, heads, lat // n + rope

    def _latent_output_sum(self, tokens: float) -> CollectiveTime | None:
        """TPLA: each device's per-head outputs over its latent slice are summed, one
        all-reduce of [tokens, heads, v_head_dim] per layer."""
        if not self.config.is_mla or self.latent_split == 1:
            return None
        p = self.params["layers/0/attn/kv_a_norm/scale"]
        axes = self._split_axes(p.axes, p.shape, ("latent",))
        cfg = self.config
        return self._collective("latent attention outputs summed", "all-reduce",
                                tokens * cfg.num_heads * cfg.v_head_dim
                                * self.precision.activation_bytes, cfg.num_layers, axes)

    def _contracted_splits(self) -> dict[tuple[str, tuple[str, ...]], list[float]]:
        """Parameters whose contracted axes the rules split, grouped by op and mesh axes:
        {(op, axes): [calls per step, output elements per token on a device]}."""
        out: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        for name, p in self.params.items():
            axes = self._split_axes(p.axes, p.shape, p.contracts) if p.contracts else ()
            if not axes:
                continue
            kept = [(a, d) for a, d in zip(p.axes, p.shape)
                    if a not in p.contracts and a != "experts"]
            elements = math.prod(d for _, d in kept) / self.mesh.split_factor(
                tuple(a for a, _ in kept), tuple(d for _, d in kept))
            out.setdefault((p.op, axes), [0, elements])[0] += 1
        return out

    def _contraction_all_reduces(self, tokens: float) -> list[CollectiveTime | None]:
        """One all-reduce per parameter whose contracted axes the rules split: the partial
        sums of its output ([tokens, embed] for every such parameter here) are added up."""
        act = self.precision.activation_bytes
        return [self._collective(f"{op} partial sums", "all-reduce", tokens * elements * act,
                                 int(calls), axes)
                for (op, axes), (calls, elements) in self._reduces.items()]

    def _experts(self, tokens: float, strategy: str | None):
        """MoE layers' experts under a strategy (`auto`: the engine's rule, `moe_auto_strategy`).

        Routing is taken as uniform: a token picks each expert with probability k / N, so
        T tokens touch N (1 - (1 - k/N)^T) distinct experts (whose weights are read) and every
        device's experts get an equal share of the (token, expert) pairs.
        - alltoall: the replicas that split `experts` between them exchange pairs (two
          all-to-alls per layer of tokens x k x embed); each device runs every pair routed to
          its experts, reading only the experts hit. With the fixed-capacity exchange
          (`moe_exchange="fixed"`, XLA:CPU) the rows sent and computed are senders x that.
        - allgather: each layer's experts are all-gathered (written to memory once); each
          device runs its own tokens through the experts they hit.
        """
        strategy = strategy or self.moe_strategy
        if strategy == "auto":
            return self._experts(tokens, self.moe_auto_strategy(tokens))
        cfg, base = self.config, self.base
        n, k, layers = cfg.num_experts, cfg.num_experts_per_tok, cfg.num_moe_layers
        gate = next(p for p in self.params.values() if p.op == "experts")
        expert_axes = self._split_axes(gate.axes, gate.shape, ("experts",))
        ep = self.mesh.axis_size(expert_axes)
        width_split = self.mesh.axis_size(self._split_axes(gate.axes, gate.shape,
                                                           ("expert_mlp",)))
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size \
            * self.precision.weight_bytes / width_split  # one expert's bytes on a device
        batch_axes = set(self.mesh.rules.mapping.get("batch", ()))
        exchange = tuple(a for a in expert_axes if a in batch_axes)
        act = self.precision.activation_bytes
        coll = []
        if strategy == "alltoall":
            senders = self.mesh.axis_size(exchange)
            group_tokens = tokens * senders
            touched = (n / ep) * (1 - (1 - k / n) ** group_tokens)
            pairs = group_tokens * k / ep
            # the fixed-capacity exchange: every (sender, receiver) slot holds all of the
            # sender's pairs, so `senders` x the rows travel and the owner computes them all
            slack = senders if self.moe_exchange == "fixed" else 1
            if slack > 1:
                pairs = senders * tokens * k  # a slot per sender, each of its tokens x k rows
            op = self._op("experts (all-to-all)", pairs * flops.expert_flops(base) / width_split
                          * layers,
                          touched * per_expert * layers, group_tokens * k / n)
            coll.append(self._collective("experts: tokens exchanged", "all-to-all",
                                         tokens * k * cfg.hidden_size * act * slack, 2 * layers,
                                         exchange))
            replicated = tuple(a for a in expert_axes if a not in batch_axes)
            coll.append(self._collective("experts: partial outputs", "all-reduce",
                                         tokens * cfg.hidden_size * act, layers, replicated))
        else:
            touched = n * (1 - (1 - k / n) ** tokens)
            gathered = n * per_expert * (ep - 1) / ep
            op = self._op("experts (all-gather)", tokens * k * flops.expert_flops(base)
                          / width_split * layers, (touched * per_expert + gathered) * layers,
                          tokens * k / n)
            coll.append(self._collective("experts: weights gathered", "all-gather",
                                         n * per_expert, layers, expert_axes))
        return strategy, op, coll
