"""What generation and scoring return (vLLM-shaped): plain data, no behaviour, importable by every
layer."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else \
            self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else \
            self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which of the request's n sequences
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    # one {token_id: logprob} per generated token (top-N plus the chosen one), when asked for
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held at admission

    @property
    def text(self) -> str:
        """The first sequence's text (the only one when n == 1)."""
        return self.outputs[0].text


class TopToken(NamedTuple):
    """One of the most likely next tokens after a prompt (`LLM.score` with top_n)."""

    token_id: int
    logprob: float
    text: str | None  # the token decoded alone (None without a tokenizer)


@dataclasses.dataclass
class CandidateScore:
    token_ids: list[int]
    text: str | None  # the candidate as given, when given as text
    logprob: float  # log P(candidate | prompt): the sum of token_logprobs
    token_logprobs: list[float]  # log P(token j | prompt + the candidate's tokens before j)


@dataclasses.dataclass
class ScoreOutput:
    """What `LLM.score` returns per prompt: its candidates' scores in the order given, and the
    top_n most likely next tokens after it (most likely first)."""

    prompt: str | None
    prompt_token_ids: list[int]
    candidates: list[CandidateScore]
    top: list[TopToken]
