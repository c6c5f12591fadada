"""A request and its sequences, as the host loop tracks them.

A request with `n > 1` has n sequences that share the prompt (the first prefills it, the others
share its blocks: see scheduler.py). Each sequence moves WAITING -> RUNNING -> FINISHED, and back
to WAITING if preempted (its KV is recomputed from prompt + outputs when it runs again, after
whatever prefix its replica still caches). On a prefill engine of a disaggregated pair a
sequence moves RUNNING -> HANDOFF after its first token: it holds its KV blocks, no slot, and
waits for the decode engine to take it over (jaxserve/engine/handoff.py). Two counters matter:

- `num_computed`: tokens whose KV is written (or scheduled to be, in a step in flight), cache
  hits included;
- `num_scheduled_outputs`: output tokens sampled or being sampled in a step in flight, which is
  ahead of `len(output_ids)` (tokens read back) by the steps in flight.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HANDOFF = "handoff"  # prefilled, waiting for another engine to take it over
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request, index: int, seed: int):
        self.request = request
        self.index = index
        self.seed = seed
        self.output_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if request.params.logprobs is not None \
            else None
        self.cumulative_logprob = 0.0
        self.status = Status.WAITING
        self.replica: int | None = None  # the DP replica whose KV shard holds the sequence
        self.blocks: list[int] = []  # block ids local to that replica's shard
        self.num_named_blocks = 0  # leading blocks already in the prefix cache (or taken from it)
        self.block_hashes: list[bytes] | None = None  # of its full blocks, computed on demand
        self.slot: int | None = None
        self.num_computed = 0
        self.num_scheduled_outputs = 0
        self.recompute_len = len(request.prompt_ids)  # tokens to prefill when (re)admitted
        # a preempted sequence's KV kept in host memory (cache.swap_preempted): its blocks as
        # `gather_blocks` returns them, covering its first `num_computed` tokens at preemption
        self.host_kv: dict | None = None
        self.host_kv_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.detokenizer = None  # set by the engine when a tokenizer exists
        self.num_processed = 0  # outputs turned into text (output processing may run behind)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def total_len(self) -> int:
        """Prompt plus every output sampled or in flight."""
        return len(self.request.prompt_ids) + self.num_scheduled_outputs

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.recompute_len

    def prefill_token(self, i: int) -> int:
        prompt = self.request.prompt_ids
        return prompt[i] if i < len(prompt) else self.output_ids[i - len(prompt)]

    @property
    def stops_at_first_token(self) -> bool:
        """Its first sampled token is its last (max_tokens 1, or the context is full)."""
        return self.request.max_tokens == 1

    @property
    def done_scheduling(self) -> bool:
        """No more tokens to sample: max_tokens or the context is used up."""
        params = self.params
        handoff = self.request.handoff_after
        return (params.max_tokens is not None
                and self.num_scheduled_outputs >= params.max_tokens) \
            or self.total_len >= self.request.max_model_len \
            or (handoff is not None and self.num_scheduled_outputs >= handoff)

    def completion(self) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=self.text, token_ids=list(self.output_ids),
                                finish_reason=self.finish_reason,
                                logprobs=None if self.logprobs is None else list(self.logprobs),
                                cumulative_logprob=self.cumulative_logprob
                                if self.logprobs is not None else None,
                                stop_reason=self.stop_reason)


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 seeds: list[int], max_model_len: int, prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_model_len = max_model_len
        # output tokens per sequence at most: max_tokens, or what the context leaves
        self.max_tokens = min(params.max_tokens or max_model_len, max_model_len - len(prompt_ids))
        self.prompt_hashes: list[bytes] | None = None  # of the prompt's full blocks, on demand
        self.cached_prompt_tokens: int | None = None  # prompt tokens found cached at admission
        # a prefill engine's request: its sequences leave for the decode engine after this
        # many outputs (None: it runs to the end here)
        self.handoff_after: int | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        self.sequences = [Sequence(self, i, seed) for i, seed in enumerate(seeds)]

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences)

    def output(self) -> RequestOutput:
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=list(self.prompt_ids),
                             outputs=[s.completion() for s in self.sequences],
                             finished=self.finished, metrics=self.metrics,
                             num_cached_tokens=self.cached_prompt_tokens or 0)


@dataclasses.dataclass(frozen=True)
class TokenStop:
    """A stop that a sampled token's id decides (EOS, a stop token, max_tokens, a full
    context): the finish reason, the stop reason, and whether a stop string found in that
    token's text still wins over it (it does over a length stop, not over a stop token)."""

    finish_reason: str
    stop_reason: int | None = None
    text_stop_wins: bool = False


@dataclasses.dataclass
class SampledToken:
    """One sample row's token, applied to its sequence (see Scheduler.update)."""

    seq: Sequence
    row: int  # in the step's outputs
    token: int
    index: int  # 1-based, among the sequence's outputs
    stop: TokenStop | None  # the sequence is finished by this token's id
