"""The model runner: compiled programs over (params, KV cache, step inputs), nothing else.

At load the Flax model is split into its static graph definition and its parameter state; the
programs here are pure functions of the state, jitted once per input shape bucket, with every
sharding pinned and the KV cache donated so its pages are updated in place. The runner owns the
device-side KV pool; which blocks belong to which sequence is the caller's business (the engine's
block allocator). It never sees a request object.

Programs may be compiled from several threads at once (a warm-up thread beside the one that
dispatches steps): each shape is compiled once, a caller that needs a shape another thread is
compiling waits for that compile, and programs are lowered from abstract arguments (shapes and
shardings), never from the live KV pool, which a step in flight may have donated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve import kv_cache
from jaxserve.kv_cache import KVPool
from jaxserve.ops.attention import AttentionMetadata
from jaxserve.ops.cost import uncounted_flops
from jaxserve.ops.moe import MoEExecution, moe_execution
from jaxserve.runtime import sampling, slots, step_sampling, verify
from jaxserve.runtime.sampling import SamplingInputs
from jaxserve.sharding import Layout, replicas_of


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def _abstract(tree):
    """Shapes, dtypes and shardings only: what a program is lowered from."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


def bucket(n: int, minimum: int = 1) -> int:
    """Round up to a power of two (at least `minimum`): bounds the number of compiled shapes."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class ModelRunner:
    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                 layout: Layout, kv: KVPool, moe: MoEExecution = MoEExecution(),
                 sampling: str = step_sampling.DEFAULT_SAMPLING):
        self.config = config
        self.moe = moe  # how MoE layers run; fixed when each program is traced
        self.sampling = step_sampling.check_mode(sampling)  # see runtime/step_sampling.py
        self.output_probs = False  # steps also return each sample row's distribution (a draft)
        self.graphdef = graphdef
        # Programs take the parameters as a flat list: flattening an nnx.State on every call
        # costs ~0.1-0.2 ms of host time per step; a list costs microseconds.
        self.param_leaves, self._param_treedef = jax.tree.flatten(params)
        self.layout = layout
        self.kv = kv
        self._abstract_params = _abstract(self.param_leaves)
        self._abstract_kv = _abstract(kv)
        self.compilations = 0  # programs compiled (or loaded from the persistent cache)
        self._programs: dict[Any, Any] = {}  # kind -> the jitted function
        self._compiled: dict[tuple, Any] = {}  # shape key -> its compiled program
        self._building: dict[tuple, concurrent.futures.Future] = {}  # shape key -> its compile
        self._generation = 0  # bumped when the programs change: older compiles are dropped
        self._lock = threading.RLock()
        self._flops: dict[tuple, int] = {}  # shape key -> FLOPs the program executes
        self._loop_flops: dict[tuple, int] = {}  # shape key -> loop FLOPs XLA does not count

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @property
    def num_replicas(self) -> int:
        """DP replicas: the mesh axes that split the step's sequences (and the KV pool)."""
        return replicas_of(self.layout)

    @property
    def blocks_per_replica(self) -> int:
        return self.kv.num_blocks // self.num_replicas

    def _sharding(self, leading: str, rank: int, what: str):
        return self.layout.sharding((leading,) + (None,) * (rank - 1),
                                    (self.num_replicas,) + (1,) * (rank - 1), what)

    def _input_sharding(self):
        # One sharding for every input leaf (a pytree prefix): the leading dim of every input
        # is tokens or rows, laid out replica after replica, so it splits like `batch`.
        return self._sharding("batch", 1, "step input")

    def input_sharding(self, kind: str):
        """The sharding the program `kind` (a method: step, set_slots, ...) pins its host
        inputs to: several processes place them as global arrays in it (plan_channel.py)."""
        if kind == "set_slots":
            return self.layout.replicated()
        if kind in ("copy_blocks", "copy_slots"):
            return self._sharding("batch", 3, "block copies")
        return self._input_sharding()

    @staticmethod
    def _shape_key(kind: str, inputs) -> tuple:
        # Every input's shape follows from these; the key costs ~1 us per step.
        if kind == "forward":
            tokens, metadata = inputs
            return (kind, tokens.shape, metadata.block_tables.shape, metadata.decode_rows)
        rows = inputs.score_index.shape if kind == "score" else ()
        # a speculative engine runs plain steps too (no `verify`): another program
        verifies = kind == "step" and inputs.verify is not None
        return (kind, inputs.tokens.shape, inputs.metadata.block_tables.shape,
                inputs.metadata.decode_rows, rows, verifies)

    def _jitted(self, kind: str, make: Callable[[], Any]):
        """The jitted function of this kind, made once (threads may ask for it at once)."""
        with self._lock:
            if kind not in self._programs:
                self._programs[kind] = make()
            return self._programs[kind]

    def _step_program(self):
        return self._jitted("step", lambda: jax.jit(
            functools.partial(_step, self.graphdef, self._param_treedef,
                              (self.layout, self.moe), sampling_mode=self.sampling,
                              output_probs=self.output_probs),
            donate_argnums=(1, 2),
            in_shardings=(_shardings(self.param_leaves), self.kv.shardings(),
                          _shardings(self.slot_state), self._input_sharding()),
            out_shardings=(self.layout.replicated(), self.kv.shardings(),
                           _shardings(self.slot_state))))

    def _executable(self, kind: str, inputs):
        """The compiled program for these inputs' shapes (compiled now if it is new)."""
        key = self._shape_key(kind, inputs)
        executable = self._compiled.get(key)
        if executable is not None:
            return executable
        return self._compile_once(key, lambda: self._compile(kind, inputs))

    def _compile_once(self, key: tuple, compile_program: Callable[[], Any]):
        """The program under `key`: compiled here, or waited for if another thread is compiling
        it. A compile that started before the programs changed (`set_moe`) is not kept."""
        with self._lock:
            executable = self._compiled.get(key)
            if executable is not None:
                return executable
            building = self._building.get(key)
            if building is None:
                building = self._building[key] = concurrent.futures.Future()
                generation, mine = self._generation, True
            else:
                mine = False
        if not mine:
            return building.result()
        try:
            executable = compile_program()
        except BaseException as e:
            with self._lock:
                self._building.pop(key, None)
            building.set_exception(e)
            raise
        with self._lock:
            if self._building.get(key) is building:
                del self._building[key]
            if generation == self._generation:
                self._compiled[key] = executable
                self.compilations += 1
        building.set_result(executable)
        return executable

    def _abstract_inputs(self, kind: str, inputs):
        """Host inputs as what a program is lowered from (with several processes, numpy
        arguments may not carry a sharding that splits them)."""
        sharding = self.input_sharding(kind)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype,
                                                           sharding=sharding), inputs)

    def _compile(self, kind: str, inputs):
        kv = self._abstract_kv
        key = self._shape_key(kind, inputs)
        inputs = self._abstract_inputs(kind, inputs)
        with uncounted_flops() as loop_flops:
            if kind == "step":
                lowered = self._step_program().lower(self._abstract_params, kv,
                                                     self._abstract_slots, inputs)
            else:
                program = self._forward_program() if kind == "forward" else \
                    self._score_program()
                lowered = program.lower(self._abstract_params, kv, inputs)
        self._loop_flops[key] = loop_flops[0]
        return lowered.compile()

    def compile_steps(self, shapes_inputs: list[StepInputs], threads: int) -> int:
        """Compile the step programs for these inputs' shapes ahead of use, `threads` at a time
        (XLA compiles outside the GIL, so on a multi-core host this divides warm-up time).
        Returns how many were new."""
        todo = {}
        for inputs in shapes_inputs:
            key = self._shape_key("step", inputs)
            if key not in self._compiled:
                todo[key] = inputs
        before = self.compilations
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(lambda inputs: self._executable("step", inputs), todo.values()))
        return self.compilations - before

    def has_step(self, inputs: StepInputs) -> bool:
        """Whether the step program for these inputs' shapes is compiled (a dispatch would not
        wait for a compile)."""
        return self._shape_key("step", inputs) in self._compiled

    def compiled_step(self, inputs: StepInputs):
        """The compiled step program for these inputs' shapes (`memory_analysis()`, `as_text()`
        show what it allocates and does)."""
        return self._executable("step", inputs)

    def program_flops(self, inputs, kind: str = "step") -> int:
        """FLOPs of the compiled program of this kind ("step", "score", "forward") for these
        inputs' shapes, all devices together: XLA's cost analysis of one device's program plus
        the loop iterations it does not count (`jaxserve.ops.cost`), times the devices."""
        key = self._shape_key(kind, inputs)
        if key not in self._flops:
            analysis = self._executable(kind, inputs).cost_analysis()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            self._flops[key] = (int(analysis.get("flops", 0)) + self._loop_flops.get(key, 0)) \
                * self.layout.num_devices
        return self._flops[key]

    def step(self, inputs: StepInputs) -> StepOutputs:
        """Dispatch one step (prefill chunks and decodes together); returns without waiting."""
        outputs, self.kv, self.slot_state = self._executable("step", inputs)(
            self.param_leaves, self.kv, self.slot_state, inputs)
        return outputs

    def _prefill_program(self, kind: str, fn, out_sharding: Callable[[], Any]):
        """A program (params, KV pool, inputs) -> (outputs, KV pool), the pool donated."""
        return self._jitted(kind, lambda: jax.jit(
            functools.partial(fn, self.graphdef, self._param_treedef, (self.layout, self.moe)),
            donate_argnums=(1,),
            in_shardings=(_shardings(self.param_leaves), self.kv.shardings(),
                          self._input_sharding()),
            out_shardings=(out_sharding(), self.kv.shardings())))

    def _forward_program(self):
        return self._prefill_program("forward", _forward, lambda: self.layout.sharding(
            ("batch", "vocab"), (self.num_replicas, self.config.vocab_rows), "logits"))

    def forward(self, tokens: np.ndarray, metadata: AttentionMetadata) -> jax.Array:
        """Logits of every token of a prefill-only step (the `LLM.logits` program): float32
        [tokens, vocab_rows]. Writes the tokens' KV into their blocks."""
        inputs = (tokens, metadata)
        logits, self.kv = self._executable("forward", inputs)(self.param_leaves, self.kv, inputs)
        return logits

    def _score_program(self):
        return self._prefill_program("score", _score, self.layout.replicated)

    def score(self, inputs: ScoreInputs) -> ScoreOutputs:
        """Dispatch one prefill-only scoring step (see jaxserve/engine/scoring.py); returns
        without waiting. Writes the tokens' KV into their blocks."""
        outputs, self.kv = self._executable("score", inputs)(self.param_leaves, self.kv, inputs)
        return outputs

    def set_moe(self, moe: MoEExecution) -> None:
        """Run MoE layers another way from now on (the programs compiled so far are dropped)."""
        with self._lock:
            self.moe = moe
            self._drop_programs()

    def set_sampling(self, mode: str) -> None:
        """Sample another way from now on (the programs compiled so far are dropped)."""
        with self._lock:
            self.sampling = step_sampling.check_mode(mode)
            self._drop_programs()

    def set_output_probs(self, on: bool) -> None:
        """Steps return the distribution each sample row drew from (`StepOutputs.probs`: a
        draft model's q, see jaxserve/runtime/verify.py); the programs so far are dropped."""
        with self._lock:
            self.output_probs = on
            self._drop_programs()

    def _drop_programs(self) -> None:
        self._generation += 1
        self._programs.clear()
        self._compiled.clear()
        self._building.clear()
        self._flops.clear()
        self._loop_flops.clear()

    def init_slots(self, num_slots: int) -> None:
        """State for `num_slots` slots (global ids; each DP replica owns an equal share) and
        the trash slot, id `num_slots`."""
        self.num_slots = num_slots
        self.slot_state = SlotState.create(num_slots, self.config.vocab_rows, self.layout)
        # What programs are lowered from: the live arrays' shapes and shardings, which never
        # change (the arrays do: each step donates the pool and the slot state).
        self._abstract_slots = _abstract(self.slot_state)

    def read_slot(self, slot: int) -> dict[str, np.ndarray]:
        """One slot's state (its global id), read back: last_token, output_counts, prompt_mask."""
        row = slots.shard_row(slot, self.num_slots // self.num_replicas)
        return {f.name: np.asarray(getattr(self.slot_state, f.name)[row])
                for f in dataclasses.fields(self.slot_state)}

    # ---- programs beside the step: slot state from the host, copies between blocks ----
    def _aux_program(self, kind: str):
        if kind == "set_slots":
            return self._jitted(kind, lambda: jax.jit(
                functools.partial(_set_slots, self.layout), donate_argnums=(0,),
                in_shardings=(_shardings(self.slot_state), self.layout.replicated()),
                out_shardings=_shardings(self.slot_state)))
        copy = kv_cache.copy_local_blocks if kind == "copy_blocks" else kv_cache.copy_local_slots
        return self._jitted(kind, lambda: jax.jit(
            functools.partial(self._copy_per_replica, copy), donate_argnums=(0,),
            in_shardings=(self.kv.shardings(), self._sharding("batch", 3, "block copies")),
            out_shardings=self.kv.shardings()))

    def _copy_per_replica(self, copy, kv: KVPool, pairs: jax.Array) -> KVPool:
        """pairs i32[replicas, copies, 2]: (source, destination) ids (blocks, or slots: block *
        block_size + offset) local to each replica's shard, copied by `copy`. Each device copies
        within its own shard: nothing crosses devices."""
        specs = jax.tree.map(lambda a: a.sharding.spec, self._abstract_kv)
        pool_spec = jax.tree.leaves(self._abstract_kv)[0].sharding.spec
        blocks_axes = pool_spec[0] if len(pool_spec) else None  # how kv_blocks is split

        def local(kv, pairs):
            return copy(kv, pairs[0, :, 0], pairs[0, :, 1])

        return jax.shard_map(local, mesh=self.layout.mesh, in_specs=(specs, P(blocks_axes)),
                             out_specs=specs, check_vma=False)(kv, pairs)

    def _aux_executable(self, kind: str, arg):
        key = (kind,) + tuple(np.shape(leaf) for leaf in jax.tree.leaves(arg))
        executable = self._compiled.get(key)
        if executable is not None:
            return executable
        state = self._abstract_slots if kind == "set_slots" else self._abstract_kv
        return self._compile_once(key, lambda: self._aux_program(kind).lower(
            state, self._abstract_inputs(kind, arg)).compile())

    def compile_side_programs(self, set_rows: int, copies: int) -> int:
        """Compile `set_slots` for `set_rows` rows and `copy_blocks` for `copies` pairs per
        replica ahead of use; returns how many were new."""
        before = self.compilations
        vocab, trash = self.config.vocab_rows, self.num_slots
        rows = SlotRows(np.full((set_rows,), trash, np.int32),
                        np.zeros((set_rows, vocab), np.bool_), np.zeros((set_rows, vocab), np.int32))
        self._aux_executable("set_slots", rows)
        self._aux_executable("copy_blocks", np.zeros((self.num_replicas, copies, 2), np.int32))
        return self.compilations - before

    def set_slots(self, slots: np.ndarray, prompt_mask: np.ndarray,
                  output_counts: np.ndarray) -> None:
        """Slots i32[k] start with prompt_mask bool[k, vocab_rows] and output_counts
        i32[k, vocab_rows] (padding rows name the trash slot)."""
        rows = SlotRows(slots, prompt_mask, output_counts)
        self.slot_state = self._aux_executable("set_slots", rows)(
            self.slot_state, rows)

    def copy_blocks(self, pairs: np.ndarray) -> None:
        """Copy KV blocks within each replica's shard: pairs i32[replicas, copies, 2] of local
        (source, destination) ids; (0, 0) pairs are padding. Ordered after the steps before."""
        self.kv = self._aux_executable("copy_blocks", pairs)(self.kv, pairs)

    def copy_slots(self, pairs: np.ndarray) -> None:
        """Copy single tokens' KV within each replica's shard: pairs i32[replicas, copies, 2] of
        local (source, destination) slots, block * block_size + offset (a tree's accepted
        path moved to its positions); (0, 0) pairs are padding."""
        self.kv = self._aux_executable("copy_slots", pairs)(self.kv, pairs)

    def gather_blocks(self, block_ids) -> dict[str, np.ndarray]:
        """One sequence's blocks out of the pool (ids over the whole pool), bitwise."""
        return kv_cache.gather_blocks(self.kv, block_ids)

    def scatter_blocks(self, block_ids, blocks) -> None:
        self.kv = kv_cache.scatter_blocks(self.kv, block_ids, blocks)


# ---- the serving step: prefill chunks or decodes, sampling on device ----

MAX_LOGPROBS = 20  # top-N computed on device when any row asks; rows slice what they asked for
MAX_SUPPRESSED = 16  # stop tokens masked per row while min_tokens is not reached


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-sequence state that lives on the device between steps, indexed by slot.

    Keeping the last sampled token here lets step n+1 be dispatched before step n's tokens are read
    back. The rows are split over the DP replicas, each replica's shard its own slots and a trash
    row that padding rows write to, so the state never crosses replicas (jaxserve/runtime/
    slots.py turns the engine's global slot ids into rows of a shard). A slot's prompt mask and
    output counts are set from the host's token ids when a sequence with penalties takes the slot
    (`ModelRunner.set_slots`), not from the prefill chunks that run: a sequence that starts
    after a prefix cache hit, or shares its prompt with siblings, computes only part of it.
    """

    last_token: jax.Array  # i32[replicas x (slots + 1)]
    output_counts: jax.Array  # i32[replicas x (slots + 1), vocab]: times each token was generated
    prompt_mask: jax.Array  # bool[replicas x (slots + 1), vocab]: tokens in the prompt

    @classmethod
    def create(cls, num_slots: int, vocab: int, layout: Layout) -> SlotState:
        rows = replicas_of(layout) * slots.rows_per_replica(num_slots, replicas_of(layout))
        make = jax.jit(lambda: cls(jnp.zeros((rows,), jnp.int32),
                                   jnp.zeros((rows, vocab), jnp.int32),
                                   jnp.zeros((rows, vocab), jnp.bool_)),
                       out_shardings=cls(slots.slot_sharding(layout, (rows,)),
                                         slots.slot_sharding(layout, (rows, vocab)),
                                         slots.slot_sharding(layout, (rows, vocab))))
        return make()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotRows:
    """Slot state rows the host sets (see SlotState)."""

    slots: jax.Array  # i32[k]
    prompt_mask: jax.Array  # bool[k, vocab]
    output_counts: jax.Array  # i32[k, vocab]


def _set_slots(layout: Layout, state: SlotState, rows: SlotRows) -> SlotState:
    prompt_mask, output_counts = slots.set_rows(layout, state.prompt_mask, state.output_counts,
                                                rows.slots, rows.prompt_mask, rows.output_counts)
    return SlotState(last_token=state.last_token, output_counts=output_counts,
                     prompt_mask=prompt_mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """What the host sends for one step. Token arrays [tokens] and sample-row arrays [rows] are
    laid out replica after replica (see jaxserve/ops/attention.py)."""

    tokens: jax.Array  # i32[tokens]: prompt (or recomputed) ids; decode tokens come from a slot
    token_slot: jax.Array  # i32[tokens]: slot whose last sampled token this is; -1 = use `tokens`
    metadata: AttentionMetadata
    sample_index: jax.Array  # i32[rows]: flat index of the token each sample row reads
    slot_ids: jax.Array  # i32[rows]; padding rows use the trash slot
    sample: jax.Array  # bool[rows]: the row yields a new output token
    want_logprobs: jax.Array  # bool[rows]
    suppressed: jax.Array  # i32[rows, MAX_SUPPRESSED]; vocab_rows = no token
    sampling: SamplingInputs
    verify: VerifyRows | None = None  # a speculative step: rows grouped into runs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VerifyRows:
    """How a speculative step's sample rows verify proposals (see jaxserve/runtime/verify.py)."""

    # i32[rows]: the proposed token the row verifies (-1 = none), and the next row's input
    draft: jax.Array
    run_start: jax.Array  # i32[rows]: flat index of the first row of the row's run
    # f32[rows, vocab_rows]: q of a sampled proposal (zeros: a point mass); None: all are
    draft_probs: jax.Array | None = None
    # i32[rows]: a token tree's runs (one per branch): the sequence's first row; None: no trees
    group_start: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    tokens: jax.Array  # i32[batch]
    logprob: jax.Array  # f32[batch]: of the chosen token
    top_ids: jax.Array  # i32[batch, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[batch, MAX_LOGPROBS]
    emitted: jax.Array | None = None  # bool[batch], a speculative step: the row's token counts
    probs: jax.Array | None = None  # f32[batch, vocab_rows]: what each row drew from (a draft)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ScoreInputs:
    """One scoring step: prefill chunks only, and the rows whose next token is scored. Token
    arrays [tokens] and score-row arrays [rows] are laid out replica after replica."""

    tokens: jax.Array  # i32[tokens]
    metadata: AttentionMetadata
    score_index: jax.Array  # i32[rows]: flat index of the token the row reads the next one of
    target: jax.Array  # i32[rows]: the next token whose log-prob the row returns
    want_top: jax.Array  # bool[rows]: the row also returns the top MAX_LOGPROBS tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ScoreOutputs:
    logprob: jax.Array  # f32[rows]: log-prob of `target` after the row's token
    top_ids: jax.Array  # i32[rows, MAX_LOGPROBS]: most likely first (zeros when no row wants top)
    top_logprobs: jax.Array  # f32[rows, MAX_LOGPROBS]


def _hidden(graphdef, param_treedef, setting, param_leaves, kv, tokens, metadata):
    layout, moe = setting
    with layout.activate(), moe_execution(moe):
        model = nnx.merge(graphdef, jax.tree.unflatten(param_treedef, param_leaves))
        hidden, kv = model(tokens, kv, metadata)
    return model, hidden, kv


def _forward(graphdef, param_treedef, setting, param_leaves, kv, inputs):
    model, hidden, kv = _hidden(graphdef, param_treedef, setting, param_leaves, kv, *inputs)
    with setting[0].activate():
        return model.logits(hidden), kv


def _step(graphdef, param_treedef, setting, param_leaves, kv, state: SlotState,
          inputs: StepInputs, *, sampling_mode: str, output_probs: bool = False):
    layout = setting[0]
    tokens = slots.slot_tokens(layout, state.last_token, inputs.token_slot, inputs.tokens)
    if inputs.verify is not None:
        tokens = verify.feed_proposals(tokens, inputs.verify.draft, inputs.verify.run_start,
                                       inputs.metadata.decode_rows)
    model, hidden, kv = _hidden(graphdef, param_treedef, setting, param_leaves, kv, tokens,
                                inputs.metadata)
    with layout.activate():
        logits = model.logits(hidden[inputs.sample_index])  # [rows, vocab_rows]: sample rows only
    if inputs.verify is not None:
        return _verify(logits, kv, state, inputs)

    next_tokens, chosen, top_ids, top_lps = step_sampling.sample_rows(
        sampling_mode, layout, logits, state.prompt_mask, state.output_counts, inputs.slot_ids,
        inputs.suppressed, inputs.want_logprobs, inputs.sampling, MAX_LOGPROBS)
    probs = verify.draft_distribution(logits, state.prompt_mask, state.output_counts,
                                      inputs.slot_ids, inputs.suppressed, inputs.sampling) \
        if output_probs else None
    last_token, output_counts = slots.record_samples(layout, state.last_token,
                                                     state.output_counts, inputs.slot_ids,
                                                     inputs.sample, next_tokens)
    state = SlotState(last_token=last_token, output_counts=output_counts,
                      prompt_mask=state.prompt_mask)
    return StepOutputs(next_tokens, chosen, top_ids, top_lps, probs=probs), kv, state


def _verify(logits, kv, state: SlotState, inputs: StepInputs):
    """A speculative step's acceptance (jaxserve/runtime/verify.py), on one DP replica."""
    rows = inputs.verify
    with jax.named_scope("verify"):
        tokens, emitted, chosen, top_ids, top_lps = verify.verify_rows(
            logits, state.prompt_mask, state.output_counts, inputs.slot_ids, inputs.suppressed,
            inputs.want_logprobs, inputs.sampling, rows.draft, rows.run_start, inputs.sample,
            MAX_LOGPROBS, rows.draft_probs, rows.group_start)
        last_token, output_counts = verify.record_run_tokens(
            state.last_token, state.output_counts, inputs.slot_ids, rows.run_start, emitted,
            tokens)
    state = SlotState(last_token=last_token, output_counts=output_counts,
                      prompt_mask=state.prompt_mask)
    return StepOutputs(tokens, chosen, top_ids, top_lps, emitted), kv, state


# ---- scoring: log-probs of given next tokens, nothing sampled ----

def _score(graphdef, param_treedef, setting, param_leaves, kv, inputs: ScoreInputs):
    model, hidden, kv = _hidden(graphdef, param_treedef, setting, param_leaves, kv, inputs.tokens,
                                inputs.metadata)
    with setting[0].activate():
        logits = model.logits(hidden[inputs.score_index])  # [rows, vocab_rows]: score rows only
    rows = logits.shape[0]

    def with_top():
        return sampling.logprobs(logits, inputs.target, MAX_LOGPROBS)

    def without_top():
        chosen, _, _ = sampling.logprobs(logits, inputs.target, 0)
        return (chosen, jnp.zeros((rows, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((rows, MAX_LOGPROBS), jnp.float32))

    chosen, top_ids, top_lps = jax.lax.cond(inputs.want_top.any(), with_top, without_top)
    return ScoreOutputs(chosen, top_ids, top_lps), kv
