"""The engine's settings: one tree of frozen dataclasses, validated once, when it is built.

    Settings
      cache       CacheSettings      KV pool: block size, how many blocks, prefix caching
      scheduler   SchedulerSettings  limits of one step per DP replica, steps in flight, routing
      parallel    ParallelSettings   mesh, sharding rules, how MoE experts run on the mesh
      sampling    SamplingSettings   where sampling and text making run
      compile     CompileSettings    when step programs compile, where compiled ones are kept
      precision   PrecisionSettings  weight format (float, or int8 with scales), KV cache format
      distributed DistributedSettings  N processes as one engine (jax.distributed): off by default
      dtype                          parameter / compute dtype (the checkpoint's by default)
      speculative SpeculativeSettings  a proposer (n-gram prompt lookup) and its draft
                                     length; None = plain decoding
      disaggregation DisaggregationSettings  prefill and decode engines on their own devices,
                                     with the KV handoff between them; None = one engine

`LLM(model_dir, settings=..., **overrides)` takes the tree and flat overrides by field name
(`LLM(model, max_num_seqs=8)`, as vLLM does), or a whole section by its name
(`LLM(model, distributed=DistributedSettings(...))`); `Settings.replace` is that override. The
engine takes the tree, the scheduler and step builder their section. Each field's metadata
carries its help text (and, where it differs from the field name, its user-facing name and
flag): the CLI's engine flags are generated from it (jaxserve/cli.py), so a new field is a new
flag, and a bad value is the same error from the CLI as from `LLM`.

Mode vocabularies are named here, for users; the modules that implement the modes keep their own
copies (tests/test_settings.py checks they agree). Checks that need the model or the devices
(max_model_len against the model's limit, the mesh against the devices there are, the rules
file's contents) run where those are known.

This module must never import jax: the CLI builds its parser from it before jax loads
(`jaxserve calibrate` sets XLA_FLAGS first), and planning tools read it without accelerators.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Iterator

from jaxserve.config import (LATENT_ATTENTIONS, LATENT_TRANSFORMS, QUANTIZATIONS,
                             WEIGHT_LAYOUT_CHOICES)
from jaxserve.package_data import embedded_draft
from jaxserve.rules import parse_mesh
from jaxserve.token_tree import TokenTree, parse_tree

# The mode names users see, defined once; the modules that implement them import these.
SAMPLING_MODES = ("sequence_parallel", "replicated")  # jaxserve/runtime/step_sampling.py
OUTPUT_PROCESSING_MODES = ("auto", "inline", "thread")  # jaxserve/engine/output_processor.py
MOE_STRATEGIES = ("dense", "alltoall", "allgather", "auto")  # jaxserve/ops/moe.py
ROUTING_POLICIES = ("prefix", "least_loaded", "round_robin")  # jaxserve/engine/router.py
COMPILATION_MODES = ("background", "upfront", "on_use")  # jaxserve/engine/warmup.py
SPECULATIVE_METHODS = ("ngram", "draft")  # jaxserve/engine/speculative/
MAX_SPECULATIVE_TOKENS = 15  # proposed tokens per sequence and step, at most
DTYPES = ("float32", "bfloat16", "float16")
# "auto": the checkpoint's format; "none": float; else a weight format (jaxserve/ops/quant.py)
QUANTIZATION_CHOICES = ("auto", "none") + QUANTIZATIONS
# "auto": the model's dtype; int8 / fp8_e4m3 store a scale per token and KV head (kv_cache.py)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8_e4m3")
PREFILL_QUERY_TILE = 16  # prefill tokens per attention row (engine/step_builder.QUERY_TILE)


def setting(default: Any, help: str, *, type: type = int, name: str | None = None,
            choices: tuple[str, ...] | None = None, default_help: str | None = None,
            flag: str | None = None) -> Any:
    """A settings field. `name`: what users call it (keyword, flag, errors; default: the
    field's name); `flag`: its CLI flag (default --NAME with dashes); `default_help`: how the
    help text states the default (default: the value)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "type": type, "name": name, "choices": choices,
        "default_help": default_help, "flag": flag})


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """The paged KV pool, per DP replica (a replica is one shard of the pool)."""

    block_size: int = setting(16, "KV block size in tokens")
    kv_blocks: int | None = setting(None, "KV blocks per DP replica",
                                    default_help="from memory")
    kv_memory_fraction: float | None = setting(
        None, "fraction of device memory for the KV pool", type=float,
        default_help="see README")
    enable_prefix_caching: bool = setting(
        True, "compute every prompt in full (default: reuse the KV of cached prompt prefixes)",
        type=bool, flag="--no-prefix-caching")
    swap_preempted: bool = setting(
        False, "keep a preempted sequence's KV in host memory and bring it back when it runs "
        "again (default: recompute it)", type=bool)

    def __post_init__(self):
        _positive_int("block_size", self.block_size)
        if self.kv_blocks is not None and self.kv_memory_fraction is not None:
            raise ValueError("give kv_blocks or kv_memory_fraction, not both")
        if self.kv_blocks is not None:
            if isinstance(self.kv_blocks, bool) or not isinstance(self.kv_blocks, int) \
                    or self.kv_blocks < 2:
                raise ValueError(f"kv_blocks must be an integer >= 2, got {self.kv_blocks!r}")
        f = self.kv_memory_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                              or not 0 < f < 1):
            raise ValueError(f"kv_memory_fraction must be in (0, 1), got {f!r}")
        if not isinstance(self.swap_preempted, bool):
            raise TypeError(f"swap_preempted must be True or False, got "
                            f"{self.swap_preempted!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be True or False, got "
                            f"{self.enable_prefix_caching!r}")


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    """Limits of one step, per DP replica, and how sequences are placed on replicas."""

    max_model_len: int | None = setting(
        None, "longest sequence", default_help="the model's, lowered to what the KV pool holds")
    max_num_seqs: int = setting(32, "sequences decoding at once per DP replica (device slots)")
    max_num_batched_tokens: int = setting(
        512, "tokens per step per DP replica, prefill chunks plus decodes")
    max_prefill_chunk: int = setting(256, "longest prefill chunk of one sequence in one step")
    max_prefill_rows: int = setting(8, "sequences prefilled in one step per DP replica")
    max_steps_in_flight: int = setting(2, "steps dispatched ahead of readback")
    routing: Any = setting(
        "prefix", "which DP replica a new sequence joins: prefix (the one caching its longest "
        "prefix, unless it is overloaded), least_loaded or round_robin (LLM also takes a "
        "policy object: jaxserve/engine/router.py)", type=str, choices=ROUTING_POLICIES)

    def __post_init__(self):
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk",
                     "max_prefill_rows", "max_steps_in_flight"):
            _positive_int(name, getattr(self, name))
        if self.max_num_batched_tokens < PREFILL_QUERY_TILE:
            raise ValueError(f"max_num_batched_tokens must be at least {PREFILL_QUERY_TILE} (one "
                             f"prefill query tile), got {self.max_num_batched_tokens}")
        routing = self.routing
        if isinstance(routing, str):
            if routing not in ROUTING_POLICIES:
                raise ValueError(f"routing must be one of {list(ROUTING_POLICIES)} or a policy "
                                 f"object, got {routing!r}")
        elif not callable(getattr(routing, "choose", None)) or not isinstance(
                getattr(routing, "name", None), str):
            raise TypeError(f"routing must be one of {list(ROUTING_POLICIES)} or an object with "
                            f"a `name` and a `choose(replicas)` method, got "
                            f"{type(routing).__name__}")


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    """The device mesh, the rules that map logical axes onto it, and MoE execution."""

    mesh: str | None = setting(None, "device mesh, e.g. 'tp=4' or 'dp=2,tp=2'", type=str,
                               default_help="one device")
    rules: str | os.PathLike = setting("tp", "sharding rules: a built-in name (jaxserve/sharding_rules/) or "
                         "a YAML path", type=str)
    moe_strategy: str = setting(
        "auto", "how a MoE model's experts run on a mesh (auto: allgather for steps above "
        "--moe-auto-threshold tokens, else alltoall)", type=str, choices=MOE_STRATEGIES)
    moe_auto_threshold: int | None = setting(
        None, "tokens per step (all replicas) above which auto gathers expert weights",
        default_help="the performance model's crossover for this model, mesh and device "
        "profile, jaxserve/perf/moe_auto.py")
    attention: str = setting(
        "mla", "latent-attention models (DeepSeek): the latent whole on every tensor-parallel "
        "device (mla, exact), split over tp with per-shard attention (tpla), or split with "
        "exact prefill and per-shard decode (tpla-decode)", type=str, choices=LATENT_ATTENTIONS)
    latent_transform: str = setting(
        "hadamard", "tpla: the orthogonal transform folded into the weights before the latent "
        "is split (pca: the latent's principal axes on --latent-calibration)", type=str,
        choices=LATENT_TRANSFORMS)
    latent_calibration: str | os.PathLike | None = setting(
        None, "latent_transform pca: the text file whose latents give the principal axes",
        type=str, default_help="a short mixed text shipped with jaxserve "
        "(jaxserve/text/latent_calibration.txt)")

    def __post_init__(self):
        if self.mesh is not None:
            parse_mesh(self.mesh)
        if not isinstance(self.rules, (str, os.PathLike)) or not str(self.rules):
            raise ValueError(f"rules must be a rules name or a YAML path, got {self.rules!r}")
        _one_of("moe_strategy", self.moe_strategy, MOE_STRATEGIES)
        _one_of("attention", self.attention, LATENT_ATTENTIONS)
        _one_of("latent_transform", self.latent_transform, LATENT_TRANSFORMS)
        if self.moe_auto_threshold is not None:
            t = self.moe_auto_threshold
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"moe_auto_threshold must be a non-negative integer (tokens "
                                 f"per step), got {t!r}")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Where tokens are sampled and where they become text."""

    mode: str = setting(
        "sequence_parallel", "under tensor parallelism: each device samples its own rows "
        "(sequence_parallel) or every row (replicated)", type=str, name="sampling",
        choices=SAMPLING_MODES)
    output_processing: str = setting(
        "auto", "detokenization, stop strings and streaming on the engine thread (inline) "
        "or on a worker thread beside the next step (thread); auto: inline on cpu, thread on "
        "gpu/tpu", type=str,
        choices=OUTPUT_PROCESSING_MODES)

    def __post_init__(self):
        _one_of("sampling", self.mode, SAMPLING_MODES)
        _one_of("output_processing", self.output_processing, OUTPUT_PROCESSING_MODES)


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """When the step programs compile and where compiled programs persist between runs."""

    compilation: str | None = setting(
        None, "when step programs compile: the first requests' now and the rest on a thread "
        "beside them (background), all before starting (upfront) or each when first needed "
        "(on_use)", type=str, choices=COMPILATION_MODES,
        default_help="$JAXSERVE_COMPILATION, else background; generate --prompt: on_use")
    compilation_cache: str | None = setting(
        None, "where compiled programs are kept between runs, a directory or off", type=str,
        default_help="$JAXSERVE_COMPILATION_CACHE, else ~/.cache/jaxserve/xla")

    def __post_init__(self):
        if self.compilation is not None:
            _one_of("compilation", self.compilation, COMPILATION_MODES)
        if self.compilation_cache is not None:
            if not isinstance(self.compilation_cache, (str, os.PathLike)):
                raise TypeError(f"compilation_cache must be a directory or 'off', got "
                                f"{self.compilation_cache!r}")
            if not str(self.compilation_cache):
                raise ValueError("compilation_cache is empty: give a directory or 'off'")
            object.__setattr__(self, "compilation_cache", str(self.compilation_cache))


@dataclasses.dataclass(frozen=True)
class PrecisionSettings:
    """The formats weights run in (jaxserve/ops/quant.py) and the KV cache is stored in
    (jaxserve/kv_cache.py); the compute format goes here too."""

    quantization: str = setting(
        "auto", "linear layers' weight format: the checkpoint's (auto), float (none), int8 with "
        "a scale per output channel (int8) or per group of 32/64/128 inputs (int8-gN); a float "
        "checkpoint is quantized on load, a quantized one loads only in its own format",
        type=str, choices=QUANTIZATION_CHOICES)
    quantize_embeddings: bool = setting(
        False, "quantize the embedding and LM head too (with --quantization)", type=bool)
    weight_layout: str = setting(
        "auto", "how linear weights are stored on the devices: the platform's (auto: in_out "
        "everywhere today), as declared [in, out] (in_out) or transposed to [out, in] "
        "(out_in); checkpoints keep the declared layout", type=str,
        choices=WEIGHT_LAYOUT_CHOICES)
    kv_cache_dtype: str = setting(
        "auto", "KV cache format: the model's dtype (auto), float32, bfloat16, float16, or "
        "int8 / fp8_e4m3 with a scale per token and KV head (about 4x the tokens of float32 "
        "in the same memory)", type=str, choices=KV_CACHE_DTYPES)

    def __post_init__(self):
        if self.quantization is None:  # LLM(quantization=None): float, as "none"
            object.__setattr__(self, "quantization", "none")
        _one_of("quantization", self.quantization, QUANTIZATION_CHOICES)
        if not isinstance(self.quantize_embeddings, bool):
            raise ValueError(f"quantize_embeddings must be True or False, got "
                             f"{self.quantize_embeddings!r}")
        _one_of("weight_layout", self.weight_layout, WEIGHT_LAYOUT_CHOICES)
        _one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)


def parse_address(text: str, what: str = "coordinator") -> tuple[str, int]:
    """HOST:PORT -> (host, port); the error names the bad value."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT (e.g. 10.0.0.1:1234), got {text!r}")
    return host.strip("[]"), int(port)


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """N processes (hosts) run one engine as one SPMD program (jaxserve/runtime/distributed.py):
    process 0 schedules and serves, the others run the steps it sends. Off without a
    coordinator; every process is given the same settings but its own process_id."""

    coordinator: str | None = setting(
        None, "HOST:PORT where process 0 runs the jax.distributed coordinator (the same on "
        "every process)", type=str, default_help="one process")
    num_processes: int = setting(1, "processes that run the engine together")
    process_id: int = setting(0, "this process's id, 0 (the leader: scheduling and front "
                              "ends) to num_processes - 1")
    peer_timeout: float = setting(
        10.0, "seconds without a heartbeat after which another process counts as dead (the "
        "leader then fails its requests and exits; a follower exits)", type=float)
    connect_timeout: float = setting(
        60.0, "seconds to wait for the coordinator and every process to join", type=float)

    def __post_init__(self):
        _positive_int("num_processes", self.num_processes)
        if isinstance(self.process_id, bool) or not isinstance(self.process_id, int) \
                or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be an integer in [0, {self.num_processes - 1}] "
                             f"(num_processes is {self.num_processes}), got {self.process_id!r}")
        for name in ("peer_timeout", "connect_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.coordinator is None:
            if self.num_processes > 1:
                raise ValueError(f"num_processes {self.num_processes} needs a coordinator "
                                 f"(--coordinator HOST:PORT of process 0)")
        else:
            parse_address(self.coordinator)

    @property
    def enabled(self) -> bool:
        return self.coordinator is not None

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def parse_draft_mesh(text: str) -> tuple[dict[str, int], int]:
    """'tp=1@4' -> ({'tp': 1}, 4): the draft's mesh axes and its first device's index."""
    axes, at, first = text.partition("@") if isinstance(text, str) else ("", "", "")
    if not at or not first.strip().isdigit():
        raise ValueError(f"speculative mesh must be AXES@FIRST_DEVICE, e.g. 'tp=1@4', got "
                         f"{text!r}")
    return parse_mesh(axes), int(first)


@dataclasses.dataclass(frozen=True)
class SpeculativeSettings:
    """Speculative decoding: a proposer guesses up to `num_speculative_tokens` next tokens per
    sequence and one target step verifies them all (jaxserve/engine/speculative/). Built from
    vLLM's `speculative_config` dict (`from_config`). `ngram` is prompt lookup: the last n
    tokens (n from prompt_lookup_max down to prompt_lookup_min) are looked up earlier in the
    prompt and output, and what followed them is proposed. `draft` names a smaller model of
    the same vocabulary (`model`, a checkpoint directory; default: the embedded model's
    distilled draft, `jaxserve/checkpoints/tiny-draft`). `mesh` puts the draft on devices of
    its own, "AXES@FIRST": the mesh AXES (e.g. "tp=1") on the devices FIRST, FIRST+1, ...,
    which must not be the target's (checked at load); None = the target's devices."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    model: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    mesh: str | None = None
    # stop proposing for a sequence whose acceptance stays below the measured break-even
    # (jaxserve/engine/speculative/fallback.py)
    auto_fallback: bool = True
    # a token tree ("WxD" or parent indices, jaxserve/token_tree.py); None: one chain
    tree: str | tuple[int, ...] | None = None

    def __post_init__(self):
        _one_of("speculative method", self.method, SPECULATIVE_METHODS)
        if self.tree is not None:
            if isinstance(self.tree, list):
                object.__setattr__(self, "tree", tuple(self.tree))
            tree = parse_tree(self.tree)
            if self.method != "ngram":
                raise ValueError(f"speculative tree {self.tree!r} needs method 'ngram' (prompt "
                                 f"lookup fills its branches), got {self.method!r}")
            if tree.max_depth > self.num_speculative_tokens:
                raise ValueError(f"speculative tree {self.tree!r} is {tree.max_depth} deep, "
                                 f"more than num_speculative_tokens "
                                 f"({self.num_speculative_tokens})")
        if not isinstance(self.auto_fallback, bool):
            raise TypeError(f"speculative auto_fallback must be a bool, got "
                            f"{self.auto_fallback!r}")
        _positive_int("num_speculative_tokens", self.num_speculative_tokens)
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, "
                             f"got {self.num_speculative_tokens}")
        _positive_int("prompt_lookup_min", self.prompt_lookup_min)
        _positive_int("prompt_lookup_max", self.prompt_lookup_max)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.method == "draft" and not self.model:
            object.__setattr__(self, "model", str(embedded_draft()))
        if self.method == "ngram" and self.model is not None:
            raise ValueError(f"speculative method 'ngram' takes no model, got {self.model!r}: "
                             f"use method 'draft' for a draft model")
        if self.model is not None:
            object.__setattr__(self, "model", str(self.model))
        if self.mesh is not None:
            if self.method != "draft":
                raise ValueError(f"speculative mesh {self.mesh!r} places a draft model; "
                                 f"method {self.method!r} has none")
            parse_draft_mesh(self.mesh)

    @property
    def token_tree(self) -> TokenTree | None:
        return parse_tree(self.tree) if self.tree is not None else None

    @property
    def step_rows(self) -> int:
        """Decode rows a sequence may take in one step: its last token and the proposals."""
        tree = self.token_tree
        return tree.step_rows if tree is not None else 1 + self.num_speculative_tokens

    @classmethod
    def from_config(cls, config: dict | SpeculativeSettings | None
                    ) -> SpeculativeSettings | None:
        """vLLM's `speculative_config` dict (or settings, or None = off), validated. A
        `model` without a `method` means method 'draft'."""
        if config is None or isinstance(config, SpeculativeSettings):
            return config
        if not isinstance(config, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key {unknown[0]!r}; keys are "
                             f"{', '.join(sorted(known))}")
        if config.get("model") is not None and "method" not in config:
            config = {**config, "method": "draft"}
        return cls(**config)


TRANSFER_MODES = ("auto", "device", "host")  # jaxserve/engine/handoff.py
ROLES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class RoleSettings:
    """One engine of a disaggregated pair: its mesh over its own devices (ids into
    `jax.devices()`), its rules, its compute dtype and KV format, its pool size and block
    size (the handoff converts between block sizes)."""

    mesh: str | None = None  # None: one device
    devices: tuple[int, ...] = ()
    rules: str | None = None  # None: the settings' rules
    dtype: str | None = None  # None: the settings' dtype
    kv_cache_dtype: str | None = None  # None: the settings' kv_cache_dtype
    kv_blocks: int | None = None  # None: the settings' pool sizing
    block_size: int | None = None  # None: the settings' block size

    def validate(self, role: str) -> None:
        if not isinstance(self.devices, (list, tuple)) or not self.devices or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.devices):
            raise ValueError(f"disaggregate {role}: devices must be a non-empty list of device "
                             f"ids (integers >= 0), got {self.devices!r}")
        object.__setattr__(self, "devices", tuple(self.devices))
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"disaggregate {role}: devices {list(self.devices)} name a device "
                             f"twice")
        size = 1
        if self.mesh is not None:
            try:
                shape = parse_mesh(self.mesh)
            except ValueError as e:
                raise ValueError(f"disaggregate {role}: {e}") from None
            for n in shape.values():
                size *= n
        if size != len(self.devices):
            raise ValueError(f"disaggregate {role}: mesh {self.mesh!r} has {size} device(s) but "
                             f"its devices {list(self.devices)} are {len(self.devices)}: give "
                             f"as many devices as the mesh holds")
        if self.dtype is not None:
            _one_of(f"disaggregate {role}: dtype", self.dtype, DTYPES)
        if self.kv_cache_dtype is not None:
            _one_of(f"disaggregate {role}: kv_cache_dtype", self.kv_cache_dtype,
                    KV_CACHE_DTYPES)
        if self.kv_blocks is not None and (isinstance(self.kv_blocks, bool) or not isinstance(
                self.kv_blocks, int) or self.kv_blocks < 2):
            raise ValueError(f"disaggregate {role}: kv_blocks must be an integer >= 2, got "
                             f"{self.kv_blocks!r}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(
                self.block_size, int) or self.block_size < 1):
            raise ValueError(f"disaggregate {role}: block_size must be a positive integer, got "
                             f"{self.block_size!r}")


@dataclasses.dataclass(frozen=True)
class DisaggregationSettings:
    """Prefill and decode on two engines with disjoint devices (jaxserve/engine/handoff.py).
    `transfer`: how a sequence's KV moves, device to device (`device`), through host memory
    (`host`), or `auto` (device). `max_prefill_ahead`: sequences prefilled and waiting for
    the decode engine to take them, at most; prefill pauses there (back-pressure).
    `handoff_retries`: times a failed transfer is retried before its request fails."""

    prefill: RoleSettings
    decode: RoleSettings
    transfer: str = "auto"
    max_prefill_ahead: int = 4
    handoff_retries: int = 1

    def __post_init__(self):
        for role in ROLES:
            if not isinstance(getattr(self, role), RoleSettings):
                raise TypeError(f"disaggregate {role} must be a RoleSettings, got "
                                f"{type(getattr(self, role)).__name__}")
            getattr(self, role).validate(role)
        shared = sorted(set(self.prefill.devices) & set(self.decode.devices))
        if shared:
            raise ValueError(f"disaggregate: prefill devices {list(self.prefill.devices)} and "
                             f"decode devices {list(self.decode.devices)} overlap at "
                             f"{shared}: give each role its own devices")
        _one_of("disaggregate transfer", self.transfer, TRANSFER_MODES)
        _positive_int("disaggregate max_prefill_ahead", self.max_prefill_ahead)
        _positive_int("disaggregate handoff_retries", self.handoff_retries, low=0)

    @classmethod
    def from_config(cls, config: dict | DisaggregationSettings | None
                    ) -> DisaggregationSettings | None:
        """{"prefill": {"mesh": "tp=2", "devices": [0, 1], ...}, "decode": {...}, ...} (or
        settings, or None = off), validated; unknown keys are named."""
        if config is None or isinstance(config, DisaggregationSettings):
            return config
        if not isinstance(config, dict):
            raise TypeError(f"disaggregate must be a dict, got {type(config).__name__}")
        _known_keys("disaggregate", config, {f.name for f in dataclasses.fields(cls)})
        roles = {}
        for role in ROLES:
            given = config.get(role)
            if not isinstance(given, dict):
                raise ValueError(f"disaggregate: {role!r} must be a dict with mesh and devices, "
                                 f"got {given!r}")
            _known_keys(f"disaggregate {role}", given,
                        {f.name for f in dataclasses.fields(RoleSettings)})
            roles[role] = RoleSettings(**given)
        return cls(**{**config, **roles})

    @classmethod
    def load(cls, path: str | os.PathLike) -> DisaggregationSettings:
        """The YAML file `--disaggregate FILE` names (the same keys as `from_config`)."""
        import yaml

        try:
            text = open(path, encoding="utf-8").read()
        except OSError as e:
            raise ValueError(f"disaggregate file {str(path)!r}: {e.strerror}") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"disaggregate file {str(path)!r} is not valid YAML: {e}") from None
        try:
            return cls.from_config(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"disaggregate file {str(path)!r}: {e}") from None


def _known_keys(what: str, given: dict, known: set[str]) -> None:
    unknown = sorted(set(given) - known, key=str)
    if unknown:
        raise ValueError(f"{what}: unknown key {unknown[0]!r}; keys are "
                         f"{', '.join(sorted(known))}")


SECTIONS = {"cache": CacheSettings, "scheduler": SchedulerSettings,
            "parallel": ParallelSettings, "sampling": SamplingSettings,
            "compile": CompileSettings, "precision": PrecisionSettings,
            "distributed": DistributedSettings}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting as users see it: its name (keyword, flag stem, errors), where it lives in
    the tree, and its field (default, metadata)."""

    name: str
    section: str | None  # None: a field of the root
    field: dataclasses.Field

    @property
    def flag(self) -> str:
        return self.field.metadata["flag"] or "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        return self.field.default


@dataclasses.dataclass(frozen=True)
class Settings:
    cache: CacheSettings = dataclasses.field(default_factory=CacheSettings)
    scheduler: SchedulerSettings = dataclasses.field(default_factory=SchedulerSettings)
    parallel: ParallelSettings = dataclasses.field(default_factory=ParallelSettings)
    sampling: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    compile: CompileSettings = dataclasses.field(default_factory=CompileSettings)
    precision: PrecisionSettings = dataclasses.field(default_factory=PrecisionSettings)
    distributed: DistributedSettings = dataclasses.field(default_factory=DistributedSettings)
    dtype: str | None = setting(None, "parameter dtype", type=str, choices=DTYPES,
                                default_help="the checkpoint's")
    speculative: SpeculativeSettings | None = None  # None: plain decoding
    disaggregation: DisaggregationSettings | None = None  # None: one engine

    def __post_init__(self):
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"settings.{name} must be a {kind.__name__}, got "
                                f"{type(getattr(self, name)).__name__}")
        if self.dtype is not None:
            _one_of("dtype", self.dtype, DTYPES)
        if self.speculative is not None and not isinstance(self.speculative,
                                                           SpeculativeSettings):
            raise TypeError(f"settings.speculative must be a SpeculativeSettings or None, got "
                            f"{type(self.speculative).__name__} (LLM takes vLLM's "
                            f"speculative_config dict)")
        if self.disaggregation is not None and not isinstance(self.disaggregation,
                                                              DisaggregationSettings):
            raise TypeError(f"settings.disaggregation must be a DisaggregationSettings or None, "
                            f"got {type(self.disaggregation).__name__} (LLM takes a "
                            f"disaggregate dict)")

    @staticmethod
    def leaves() -> Iterator[Leaf]:
        """Every setting a user can override, section by section."""
        for section, kind in SECTIONS.items():
            for f in dataclasses.fields(kind):
                yield Leaf(f.metadata["name"] or f.name, section, f)
        for f in dataclasses.fields(Settings):
            if "help" in f.metadata:
                yield Leaf(f.metadata["name"] or f.name, None, f)

    def replace(self, **overrides: Any) -> Settings:
        """A copy with settings replaced by their names (`max_num_seqs=8`), or whole sections
        by theirs (`distributed=DistributedSettings(...)`), validated."""
        sections = {name: overrides.pop(name) for name, value in list(overrides.items())
                    if isinstance(value, SECTIONS.get(name, ()))}
        if sections:
            return dataclasses.replace(self, **sections).replace(**overrides)
        leaves = {leaf.name: leaf for leaf in self.leaves()}
        unknown = [name for name in overrides if name not in leaves]
        if unknown:
            close = difflib.get_close_matches(unknown[0], leaves, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown setting {unknown[0]!r}{hint}; settings are "
                            f"{', '.join(leaves)}")
        by_section: dict[str | None, dict[str, Any]] = {}
        for name, value in overrides.items():
            leaf = leaves[name]
            by_section.setdefault(leaf.section, {})[leaf.field.name] = value
        root = by_section.pop(None, {})
        for section, values in by_section.items():
            root[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **root)

    def get(self, name: str) -> Any:
        """A setting's value by its name."""
        leaf = next((leaf for leaf in self.leaves() if leaf.name == name), None)
        if leaf is None:
            raise KeyError(f"unknown setting {name!r}")
        holder = self if leaf.section is None else getattr(self, leaf.section)
        return getattr(holder, leaf.field.name)
