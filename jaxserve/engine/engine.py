"""The host loop: schedule, dispatch compiled steps, read results back one step late.

One engine step is: ask the scheduler for a plan (tokens per sequence), let the step builder build
the step's arrays (numpy), dispatch the ONE program that runs the step's prefill chunks and decodes
together (it returns at once: JAX dispatch is asynchronous), and then read
back the *oldest* step in flight, so the device computes step n+1 while the host turns step n's
tokens into text, checks stop conditions and frees finished sequences. The sampled token of
each sequence stays on the device (`SlotState.last_token`), so dispatching n+1 never waits for
n's readback. A sequence that stops at step n has been given one extra token in n+1; that token
is dropped on readback (vLLM's async scheduling makes the same trade).

Stages return, the engine applies: the scheduler applies a step's tokens (`Scheduler.update`:
outputs, the stops a token id decides, freed slots and blocks) and says what it did; the output
processor returns the text part's late stops and finished requests (`Processed`), which the
engine hands to the scheduler and applies to its own request table and counters.

`max_steps_in_flight` bounds the steps dispatched and not yet read back. On simulated CPU
devices many collective-bearing programs in flight can starve XLA's rendezvous threads (on 2
cores, an unbounded decode loop aborted with "Termination timeout for all reduce"; jax-ml/jax#31818),
so the bound is a setting; 2 keeps one step of overlap.

Everything the host does is timed per phase (`stats()`), and step by step in `timeline`
(jaxserve/engine/timeline.py: host phases, device occupancy, idle gaps): that is the
non-scalable work that Amdahl's law charges tensor parallelism for. Turning tokens into text
is the output processor's job (jaxserve/engine/output_processor.py), inline or on a thread.

With speculation (`settings.speculative`, jaxserve/engine/speculative/) a step in which
sequences propose is planned only once every step before it is read back, and is read back
before the next is planned: the proposer reads each sequence's latest tokens, and how many
tokens a step keeps decides where the next one starts. When no decoding sequence is proposed
for (all fallen back) the engine steps as the plain engine does, `max_steps_in_flight` ahead:
a decode without proposals is a plain one (scheduler.py), and a decode-only step in which
nobody proposes runs the plain engine's program, in its decode buckets (`_layout`). A
draft model's round is dispatched right before the verify step it feeds, its proposals and q
laid out as the step's inputs on the device (`fill_step`): a round is two dispatches and one
readback. The auto fallback (jaxserve/engine/speculative/fallback.py) is fed from here: the
time of each decode step dispatched alone, from building its arrays to reading it back, and
the proposer's time per round (any that includes a compile left out).

Two small programs run beside the step, in dispatch order with it: before a step, the slot
state (penalties) of sequences admitted in it is set from their token ids; after it, blocks that
`n > 1` siblings shared until they diverge are copied (see scheduler.py).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine.accounting import FlopsAccount
from jaxserve.engine.id_pool import IdPool
from jaxserve.engine.block_pool import BlockPool, identity_hash
from jaxserve.engine.router import make_policy
from jaxserve.engine.scheduler import Scheduler, StepPlan
from jaxserve.engine.sequence import Request, Status
from jaxserve.engine.speculative import make_proposer
from jaxserve.engine.speculative.fallback import Fallback
from jaxserve.engine.speculative.proposals import Proposals
from jaxserve.engine.step_builder import QUERY_TILE, StepBuilder, StepLayout
from jaxserve.engine.output_processor import OutputProcessor, Processed
from jaxserve.engine.timeline import Timeline
from jaxserve.engine.warmup import ShapeCompiler, resolve_mode as resolve_compilation
from jaxserve.runtime.runner import MAX_SUPPRESSED, ModelRunner, StepOutputs
from jaxserve.sampling_params import SamplingParams
from jaxserve.settings import Settings


@dataclasses.dataclass
class _InFlight:
    layout: StepLayout
    outputs: StepOutputs
    dispatched: float = 0.0  # perf_counter when its arrays began to be built
    verifies: bool = False  # some sequence verifies proposals
    decode_only: bool = False
    alone: bool = False  # dispatched with nothing in flight and read back before the next
    compilations: int = 0  # the runner's, before the step was dispatched


class Engine:
    def __init__(self, runner: ModelRunner, config: ModelConfig, settings: Settings,
                 tokenizer=None, *, cache_identity: str = "", draft_runner=None):
        """settings: resolved (`LLM.settings`: max_model_len known); the limits of a step are
        its scheduler section, `self.config`. cache_identity names what writes the KV (model,
        dtype, layout): it seeds every prefix cache hash. The constructor returns once the
        programs `settings.compile.compilation` compiles first are compiled (see
        jaxserve/engine/warmup.py). draft_runner: the draft model's runner (speculative method
        'draft')."""
        limits = settings.scheduler
        if limits.max_model_len is None:
            raise ValueError("the engine needs max_model_len resolved (see LLM)")
        self.runner = runner
        self.model_config = config
        self.settings = settings
        self.config = limits
        self.max_model_len = limits.max_model_len
        self.tokenizer = tokenizer
        self.eos_ids = tuple(tokenizer.eos_ids if tokenizer is not None else config.eos_token_ids)
        replicas, seqs = runner.num_replicas, limits.max_num_seqs
        self.proposer = make_proposer(settings.speculative, limits, draft_runner)
        if self.proposer is not None and replicas > 1:
            raise ValueError(f"speculative decoding runs on one DP replica; the mesh has "
                             f"{replicas}: use a mesh without dp")
        spec = settings.speculative
        k = spec.step_rows - 1 if self.proposer is not None else 0  # rows past the last token
        self.tree_nodes = spec.token_tree.size if self.proposer is not None \
            and spec.token_tree is not None else 0
        self.fallback = Fallback(settings.speculative.auto_fallback) \
            if self.proposer is not None else None
        self.max_steps_in_flight = limits.max_steps_in_flight
        self.speculating = False  # this step's sequences propose: it is read back at once
        runner.init_slots(replicas * seqs)
        self.trash_slot = replicas * seqs
        self.router = make_policy(limits.routing, config, limits.max_num_batched_tokens)
        # Each DP replica owns its shard of the pool (local block ids), its own prefix cache
        # and its own slots.
        self.pools = [BlockPool(runner.blocks_per_replica, runner.block_size,
                                settings.cache.enable_prefix_caching) for _ in range(replicas)]
        self.scheduler = Scheduler(limits, self.pools,
                                   [IdPool(range(r * seqs, (r + 1) * seqs))
                                    for r in range(replicas)],
                                   tile=QUERY_TILE, router=self.router, model_config=config,
                                   root_hash=identity_hash(cache_identity),
                                   speculative=self.proposer is not None,
                                   swap=settings.cache.swap_preempted)
        self.builder = StepBuilder(limits, replicas, block_size=runner.block_size,
                                   trash_slot=self.trash_slot, vocab_rows=config.vocab_rows,
                                   eos_ids=self.eos_ids, speculative_tokens=k,
                                   sampled_drafts=getattr(self.proposer, "samples", False),
                                   trees=self.tree_nodes > 0)
        self.requests: dict[str, Request] = {}
        self.inflight: collections.deque[_InFlight] = collections.deque()
        self._seed_rng = np.random.default_rng()
        self.counters = collections.Counter()
        self.timers = collections.Counter()
        self.timeline = Timeline()
        # a speculative engine's decode-only steps in which nobody proposes: the plain layout
        # and programs (see the module docstring)
        self.plain_builder = StepBuilder(limits, replicas, block_size=runner.block_size,
                                         trash_slot=self.trash_slot,
                                         vocab_rows=config.vocab_rows, eos_ids=self.eos_ids) \
            if self.proposer is not None else None
        self.output = OutputProcessor(self.timeline, settings.sampling.output_processing)
        self.flops = FlopsAccount(config, runner)
        self.compiler = ShapeCompiler(runner, self.builder,
                                      resolve_compilation(settings.compile.compilation),
                                      limits.max_prefill_chunk,
                                      (self.builder.max_admissions,
                                       limits.max_prefill_rows), plain=self.plain_builder)
        self.compiler.start()

    # ---- requests ----
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, *, handoff_after: int | None = None) -> Request:
        """Queue a request. prompt_ids must already be validated (see LLM.validate_token_ids).
        handoff_after: a prefill engine's request, whose sequences leave for the decode engine
        after that many outputs (so this pool needs room for the prompt only)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params, handoff_after)
        seeds = [params.seed_for(i, int(self._seed_rng.integers(0, 2**63)))
                 for i in range(params.n)]
        request = Request(request_id, list(prompt_ids), params, seeds, self.max_model_len, prompt)
        request.handoff_after = handoff_after
        for seq in request.sequences:
            if self.tokenizer is not None:
                seq.detokenizer = self.tokenizer.incremental(
                    prompt_ids, skip_special_tokens=params.skip_special_tokens)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request

    def check_request(self, prompt_ids: list[int], params: SamplingParams,
                      handoff_after: int | None = None) -> None:
        """Raise, naming the value, if this engine cannot run the request (see add_request)."""
        params.validate_for_model(self.model_config.vocab_size, self.max_model_len)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has no tokenizer "
                             "(tokenizer.json or tokenizer.model)")
        if len(params.stop_token_ids) + len(self.eos_ids) > MAX_SUPPRESSED and params.min_tokens:
            raise ValueError(f"stop_token_ids: at most {MAX_SUPPRESSED - len(self.eos_ids)} with "
                             f"min_tokens, got {len(params.stop_token_ids)}")
        max_tokens = params.max_tokens if params.max_tokens is not None else \
            self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) is "
                             f"more than max_model_len ({self.max_model_len})")
        if max_tokens < 1:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) leaves no room to generate "
                             f"within max_model_len ({self.max_model_len})")
        blocks = self.pools[0]
        need = blocks.blocks_for(len(prompt_ids) + min(max_tokens, handoff_after or max_tokens))
        if need > blocks.capacity:
            raise ValueError(f"request needs {need} KV blocks but a replica's pool has "
                             f"{blocks.capacity}: raise kv_blocks or lower max_tokens")

    def abort(self, request_id: str) -> Request | None:
        """Stop a request now; its blocks and slot are free before the next step is planned."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        request.metrics.finished_time = time.perf_counter()
        return request

    def fail_sequence(self, seq, reason: str) -> Request | None:
        """End the sequence's request now with finish_reason "error" (`reason` as its stop
        reason); its blocks and slot are freed as by `abort`."""
        request = self.abort(seq.request.request_id)
        if request is not None:
            for s in request.sequences:
                if s.finish_reason == "abort":
                    s.finish_reason, s.stop_reason = "error", reason
        return request

    def clear_prefix_cache(self) -> None:
        """Forget every cached block (e.g. before something else writes the pool's pages)."""
        self.scheduler.clear_prefix_cache()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting to be admitted (the front ends' queue bound counts them)."""
        return len(self.scheduler.waiting)

    # ---- the loop ----
    def step(self) -> list[Request]:
        """One iteration: plan + dispatch a step, read back the oldest. Returns finished requests."""
        finished = self._apply(self.output.collect())
        t0 = self.timeline.lap("other")
        proposals, drained = self._proposals()
        finished += drained
        drafts = (proposals.tokens, proposals.branches) if proposals is not None else ()
        plan = self.scheduler.schedule(not self.inflight, *drafts)
        if plan.needs_preemption or (plan.empty and self.scheduler.has_work()
                                     and not self.inflight):
            finished += self.drain()  # preemption rewrites state that steps in flight use
            plan = self.scheduler.schedule(True, *drafts)
            if plan.empty and self.scheduler.has_work():
                self.scheduler.preempt_youngest()
                plan = self.scheduler.schedule(True, *drafts)
        if proposals is not None and proposals.probs:
            plan.draft_probs = {seq: proposals.probs[seq][:len(d)]
                                for seq, d in plan.drafts.items() if d and seq in proposals.probs}
        if self.scheduler.swap_out or self.scheduler.swap_in:
            self._swap()
        t1 = self.timeline.lap("schedule")
        self.timers["schedule_s"] += t1 - t0
        if not plan.empty:
            self.inflight.append(self._dispatch(plan))
            self.timers["dispatch_s"] += time.perf_counter() - t1
        bound = 1 if self.speculating else self.max_steps_in_flight
        if self.inflight and (len(self.inflight) >= bound or plan.empty):
            finished += self._read_back(self.inflight.popleft())
        elif plan.empty and self.output.busy:  # nothing to run until the text part catches up
            self.output.wait()
            finished += self._apply(self.output.collect())
        return finished

    def _swap(self) -> None:
        """Copy preempted sequences' KV to host memory, then swapped-in ones' back (see
        scheduler.py), before the step that reuses or reads those blocks is dispatched."""
        per_replica = self.runner.blocks_per_replica
        for seq, replica, blocks, _ in self.scheduler.swap_out:
            seq.host_kv = self.runner.gather_blocks([replica * per_replica + b for b in blocks])
            self.counters["swapped_out"] += 1
            self.counters["swap_bytes"] += sum(a.nbytes for a in seq.host_kv.values())
        for seq, replica, blocks in self.scheduler.swap_in:
            self.runner.scatter_blocks([replica * per_replica + b for b in blocks],
                                       {name: a[:, :len(blocks)]
                                        for name, a in seq.host_kv.items()})
            seq.host_kv = None
            self.counters["swapped_in"] += 1
        self.scheduler.swap_out.clear()
        self.scheduler.swap_in.clear()

    def drain(self) -> list[Request]:
        """Read back every step in flight."""
        finished: list[Request] = []
        while self.inflight:
            finished += self._read_back(self.inflight.popleft())
        return finished

    def _proposals(self) -> tuple[Proposals | None, list[Request]]:
        """Speculative: each decoding sequence's proposed next tokens, and the requests that
        finished in the steps read back first. Proposals start from read-back tokens, and a
        probe is timed alone: either reads every step in flight back first."""
        self.speculating = False
        if self.proposer is None:
            return None, []
        # a step that verified proposals leaves counters only its read back settles
        finished = self.drain() if any(s.verifies for s in self.inflight) else []
        probe, seqs = self._proposing()
        if (probe or seqs) and self.inflight:
            finished += self.drain()
            probe, seqs = self._proposing()
        self.speculating = probe or bool(seqs)
        if probe:  # a plain step, to measure the break-even
            return Proposals({}), finished
        if not seqs and self.proposer.idle:  # all fallen back: a plain engine's step
            return None, finished
        t0, compiled = time.perf_counter(), self.programs_compiled()
        out = self.proposer.propose_all(seqs)  # [] too: the draft frees what it holds
        elapsed = time.perf_counter() - t0
        self.timers["propose_s"] += elapsed
        if any(out.tokens.values()) and self.programs_compiled() == compiled:
            self.fallback.record_draft(elapsed)
        return out, finished

    def _proposing(self) -> tuple[bool, list]:
        """(a probe is wanted, the decoding sequences worth proposing for)."""
        decoding = [seq for seq in self.scheduler.running
                    if not seq.in_prefill and not seq.done_scheduling]
        if self.fallback.wants_probe(decoding):
            return True, []
        return False, self.fallback.proposing(decoding, self.scheduler.running)

    def programs_compiled(self) -> int:
        """Programs compiled so far, the draft's included: a time that includes a compile is
        no measure of a step's cost."""
        draft = getattr(self.proposer, "runner", None)
        return self.runner.compilations + (draft.compilations if draft is not None else 0)

    # ---- dispatch ----
    def _dispatch(self, plan: StepPlan) -> _InFlight:
        started, compiled = time.perf_counter(), self.runner.compilations
        layout = self._layout(plan)
        if layout.device_draft_rows:  # the draft's round, feeding the step on the device
            t0 = time.perf_counter()
            layout.inputs = dataclasses.replace(layout.inputs, verify=self.proposer.fill_step(
                layout.device_draft_rows, layout.inputs.verify))
            self.timers["propose_s"] += time.perf_counter() - t0
        now = self.timeline.lap("build")
        for seq in [c.seq for c in plan.prefills] + plan.decodes:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        slot_rows = self.builder.slot_rows(plan.admitted)
        self.flops.record(plan, layout.inputs)
        self.counters["prefill_tokens"] += sum(chunk.length for chunk in plan.prefills)
        self.scheduler.commit(plan)
        if slot_rows is not None:
            self.runner.set_slots(*slot_rows)
        outputs = self.runner.step(layout.inputs)  # one program: prefill chunks and decodes
        if self.proposer is not None:
            self.proposer.dispatched(plan)  # a draft may run beside the step
        if plan.copies:
            self.runner.copy_blocks(self.builder.copy_pairs(plan.copies))
        self.timeline.lap("dispatch")
        self.timeline.dispatched(outputs.tokens, decode_rows=len(plan.decodes),
                                 prefill_chunks=len(plan.prefills),
                                 tokens=int(layout.inputs.tokens.shape[0]))
        self.counters["steps"] += 1
        self.counters["prefill_steps"] += bool(plan.prefills)
        self.counters["decode_steps"] += bool(plan.decodes)
        return _InFlight(layout, outputs, started, plan.verifies,
                         bool(plan.decodes) and not plan.prefills, self.speculating and
                         not self.inflight, compiled)

    def _layout(self, plan: StepPlan) -> StepLayout:
        """The step's arrays: a speculative engine's decode-only step in which nobody proposes
        is laid out as the plain engine's, for its programs (once compiled)."""
        plain = None
        if self.plain_builder is not None and not plan.verifies and not plan.prefills:
            plain = self.compiler.plain_shape(len(plan.decodes))
        if plain is not None:
            return self.plain_builder.build(plan, lambda decodes, prefill_tokens: plain)
        return self.builder.build(plan, self.compiler.shape_for)

    # ---- read back ----
    def _read_back(self, step: _InFlight) -> list[Request]:
        t0 = time.perf_counter()
        step.outputs.tokens.block_until_ready()
        self.timeline.lap("wait")
        arrays = self._fetch(step.outputs, step.layout.wants_logprobs)
        t1 = self.timeline.lap("readback")
        self.timers["readback_wait_s"] += t1 - t0
        if self.fallback is not None:
            self._time_step(step, t1 - step.dispatched)
        update = self.scheduler.update(step.layout.sample_rows, arrays["tokens"], self.eos_ids,
                                       arrays.get("emitted"), step.layout.verify_rows,
                                       step.layout.run_starts if self.tree_nodes else None)
        if step.layout.tree_moves:
            self._commit_branches(step.layout, arrays["emitted"])
        self._count(update.generated, update.discarded)
        if update.verified_runs:
            self.counters["spec_proposed_tokens"] += update.proposed
            self.counters["spec_accepted_tokens"] += update.accepted
            self.counters["spec_verify_runs"] += update.verified_runs
            for seq, kept in update.runs:
                self.fallback.record_run(seq, kept)
            self.proposer.verified(update.runs)
        for sampled in update.sampled:
            metrics = sampled.seq.request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = t1
        finished = self._apply(self.output.process(arrays, update.sampled))
        self.timers["process_s"] += self.timeline.lap("process") - t1
        return finished

    def _apply(self, processed: Processed) -> list[Request]:
        """Apply what the output processor decided: drop the tokens after late stops (freeing
        those sequences), and hand back the finished requests that were not aborted."""
        for stop in processed.late_stops:
            late = self.scheduler.stop_late(stop.seq, stop.num_outputs)
            self._count(-late, late)
        finished = []
        for request in processed.done:
            if self.requests.get(request.request_id) is request:  # not aborted
                request.metrics.finished_time = time.perf_counter()
                del self.requests[request.request_id]
                finished.append(request)
        return finished

    def _count(self, generated: int, discarded: int) -> None:
        if generated:
            self.counters["generated_tokens"] += generated
        if discarded:
            self.counters["discarded_tokens"] += discarded

    @staticmethod
    def _fetch(out: StepOutputs, wants_logprobs: bool) -> dict[str, np.ndarray]:
        arrays = {"tokens": np.asarray(out.tokens)}
        if out.emitted is not None:
            arrays["emitted"] = np.asarray(out.emitted)
        if wants_logprobs:
            arrays.update(logprob=np.asarray(out.logprob), top_ids=np.asarray(out.top_ids),
                          top_logprobs=np.asarray(out.top_logprobs))
        return arrays

    def _commit_branches(self, layout: StepLayout, emitted: np.ndarray) -> None:
        """A token tree's kept branch other than the first: its nodes' KV moves from their tree
        slots to their positions (a few tokens; the rest of the tree is simply past the
        sequence's length), dispatched before the next step reads it."""
        moves = [move for row, move in layout.tree_moves.items() if emitted[row]]
        if moves:
            self.runner.copy_slots(self.builder.slot_pairs(moves, self.tree_nodes))
            self.counters["spec_tree_branch_commits"] += 1

    def _time_step(self, step: _InFlight, seconds: float) -> None:
        """A step dispatched alone and read back before the next is planned: building its
        arrays to reading it back is its time (steps in flight overlap, and are not timed)."""
        if step.verifies:
            self.timers["spec_verify_s"] += seconds
        if step.alone and step.decode_only and self.runner.compilations == step.compilations:
            self.fallback.record_step(seconds, step.verifies)

    def _speculative_stats(self) -> dict[str, Any]:
        """`spec_acceptance_rate`: proposals kept / proposals verified; `spec_tokens_per_step`:
        tokens a decoding sequence gained per step in which it verified proposals (kept
        proposals + the one the target adds). None until a proposal is verified.
        `spec_draft_s`: the proposer's time; `spec_verify_s`: the time of target steps that
        verified proposals (built to read back); the auto fallback's costs and break-even
        (jaxserve/engine/speculative/fallback.py)."""
        if self.proposer is None:
            return {}
        c = self.counters
        proposed, accepted, runs = (c["spec_proposed_tokens"], c["spec_accepted_tokens"],
                                    c["spec_verify_runs"])
        return {"spec_proposed_tokens": proposed, "spec_accepted_tokens": accepted,
                "spec_verify_runs": runs,
                "spec_acceptance_rate": round(accepted / proposed, 4) if proposed else None,
                "spec_tokens_per_step": round((accepted + runs) / runs, 4) if runs else None,
                "spec_draft_s": round(self.timers["propose_s"], 6),
                "spec_verify_s": round(self.timers["spec_verify_s"], 6),
                **self.fallback.stats(self.scheduler.running)}

    # ---- warm-up and stats ----
    def warmup(self) -> int:
        """Compile every step shape the engine can use now (a background warm-up stops and
        this finishes it); returns how many were compiled."""
        return self.compiler.compile_all(threads=os.cpu_count() or 1)

    @property
    def kv_blocks_used(self) -> int:
        """Blocks some sequence holds (cached blocks nobody holds are not counted)."""
        return sum(p.num_used for p in self.pools)

    @property
    def kv_blocks_total(self) -> int:
        """Blocks that sequences can use, over all DP replicas (null blocks excluded)."""
        return sum(p.capacity for p in self.pools)

    def stats(self, peak_flops: float | None = None) -> dict[str, Any]:
        """Counters since the engine started, its state now, host time per phase, and FLOPs
        (true and executed; model-FLOPs utilisation against `peak_flops`, one device's FLOP/s,
        when given). Tokens: `prefill_tokens` computed by prefill chunks;
        `prefix_cache_queries` looked up in the prefix cache at admission, `prefix_cache_hits`
        found there; `forked_sequences` took their prompt from a sibling (n > 1).
        `replica_load_flops`: per DP replica, the true FLOPs of the admitted work not yet
        done. `score_*`: the same for scoring runs (jaxserve/engine/scoring.py).
        `kv_cache_dtype`: the pool's format; `kv_bytes_per_token`: what one token takes in it,
        every layer, scales included, over all devices; `kv_token_capacity`: tokens the pool
        holds for sequences (null blocks excluded)."""
        scheduler = self.scheduler
        return {
            "compilations": self.runner.compilations,
            "prefill_tokens": 0, "generated_tokens": 0, "score_prefill_tokens": 0,
            "score_prefix_cache_queries": 0, "score_prefix_cache_hits": 0,
            **self.counters,
            "prefix_caching": self.pools[0].caching,
            "prefix_cache_queries": scheduler.counters["prefix_cache_queries"],
            "prefix_cache_hits": scheduler.counters["prefix_cache_hits"],
            "forked_sequences": scheduler.counters["forked_sequences"],
            "routing": self.router.name,
            "replica_load_flops": scheduler.replica_loads(),
            "preemptions": scheduler.num_preemptions,
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "kv_blocks_used": self.kv_blocks_used,
            "kv_blocks_cached": sum(p.num_cached for p in self.pools),
            "kv_blocks_total": self.kv_blocks_total,
            "kv_cache_dtype": self.settings.precision.kv_cache_dtype,
            "kv_bytes_per_token": self.runner.kv.nbytes() // (self.runner.kv.num_blocks
                                                              * self.runner.block_size),
            "kv_token_capacity": self.kv_blocks_total * self.runner.block_size,
            **self._speculative_stats(),
            **{k: round(v, 6) for k, v in self.timers.items()},
            **self.flops.stats(sum(self.timers.values()), peak_flops),
            **self.compiler.stats(),
        }
