"""The engine on its own thread, for online serving: submit, stream, abort, drain, fail.

Threads: one *engine thread* owns the `Engine` and is the only one that touches it (the engine is
not thread-safe, and device dispatch from one thread keeps the step order deterministic). Server
handler threads talk to it through a queue of commands (`Submit`, `SubmitScore`, `Abort`,
`Stop`: small dataclasses, each handled by one method) and read results from per-request
`RequestStream` queues. Submitting waits for the engine thread to accept the request, so
validation errors reach the caller synchronously; the wait is at most one engine step.

Deltas are published from wherever the engine's output processor makes text (this thread, or
its own worker: see jaxserve/engine/output_processor.py); a request's Final is sent from this
thread once the engine hands the finished request back, after its last delta. One lock guards
the streams between the two.

Streaming text never holds a partial UTF-8 character (the detokenizer holds it back) and, when
the request has stop strings, holds back the last len(longest stop) - 1 characters until they
cannot start a stop string, so text already sent is never taken back.

Scoring (`score`) runs on the engine thread too, one scoring step after each engine step, oldest
run first (see jaxserve/engine/scoring.py): its KV blocks come from the same block pools as the
requests', so the pool is never raced for; a run whose next piece finds no free blocks waits
for requests to finish. Its future resolves to the finished `ScoreRun`.

If `Engine.step` (or a scoring step) raises, the loop marks itself failed, ends every open stream
and score with the error and refuses new work: a half-updated engine is never trusted again.
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

from jaxserve.engine.engine import Engine
from jaxserve.engine.scoring import ScoreJob, ScoreRun
from jaxserve.engine.sequence import Request, Sequence
from jaxserve.outputs import RequestMetrics
from jaxserve.sampling_params import SamplingParams


class LoopState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class ScoreAborted(Exception):
    """A scoring run was aborted (its client left, or the server shut down)."""


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class NotAccepting(Exception):
    """The loop is draining, stopped or failed."""


@dataclasses.dataclass
class Delta:
    index: int  # which of the request's n sequences
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None


@dataclasses.dataclass
class Final:
    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str  # any text held back until the end (stop-string look-ahead, trailing bytes)
    metrics: RequestMetrics | None = None
    cached_prompt_tokens: int = 0  # of the request's prompt, found in the prefix cache


@dataclasses.dataclass
class Failure:
    error: BaseException


class RequestStream:
    """What a handler reads: Delta / Final per sequence, or one Failure."""

    def __init__(self, request_id: str, num_sequences: int):
        self.request_id = request_id
        self.events: queue.Queue = queue.Queue()
        self.open_sequences = num_sequences

    def get(self, timeout: float | None = None):
        return self.events.get(timeout=timeout)


# ---- commands: handler threads -> the engine thread ----

@dataclasses.dataclass(frozen=True)
class Submit:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None
    future: Future  # -> the request's RequestStream


@dataclasses.dataclass(frozen=True)
class SubmitScore:
    run_id: str
    jobs: list[ScoreJob]
    future: Future  # -> the finished ScoreRun


@dataclasses.dataclass(frozen=True)
class Abort:
    request_id: str  # a request's or a scoring run's id
    future: Future  # -> whether something was aborted


@dataclasses.dataclass(frozen=True)
class Stop:
    future: None = None  # nobody waits: `stop` joins the thread


Command = Submit | SubmitScore | Abort | Stop


class _SeqCursor:
    """How much of a sequence was already streamed."""

    def __init__(self):
        self.tokens = 0
        self.text = 0


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 256,
                 on_step: Callable[[EngineLoop, float], None] | None = None):
        self.engine = engine
        self.engine.output.on_updates = self._publish
        self.max_queue = max_queue
        # metrics hook, called on the engine thread after each step, and with step time 0.0
        # after commands that leave the engine idle (so gauges see the last abort)
        self.on_step = on_step
        self.state = LoopState.SERVING
        self.error: BaseException | None = None
        self._commands: queue.Queue[Command] = queue.Queue()
        self._handlers: dict[type, Callable] = {Submit: self._handle_submit,
                                                SubmitScore: self._handle_score,
                                                Abort: self._handle_abort}
        self._streams: dict[str, RequestStream] = {}
        self._cursors: dict[int, _SeqCursor] = {}
        self._pending = 0  # submitted, not yet accepted by the engine thread
        self._scoring: dict[str, tuple[ScoreRun, Future]] = {}  # run id -> run, in arrival order
        self._lock = threading.Lock()
        self._streams_lock = threading.Lock()  # _streams and _cursors: see the module docstring
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    # ---- called from handler threads ----
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               prompt: str | None = None) -> RequestStream:
        self._admit()
        future: Future = Future()
        self._commands.put(Submit(request_id, prompt_ids, params, prompt, future))
        return future.result()

    def score(self, run_id: str, jobs: list[ScoreJob]) -> Future:
        """Queue a scoring run (jobs validated, see `LLM.prepare_score`); the future resolves to
        the finished ScoreRun, or raises ScoreAborted / NotAccepting / the engine's error.
        `abort(run_id)` stops it."""
        self._admit()
        future: Future = Future()
        self._commands.put(SubmitScore(run_id, jobs, future))
        return future

    def _admit(self) -> None:
        with self._lock:
            if self.state is not LoopState.SERVING:
                raise NotAccepting(f"the engine is {self.state.value}")
            queued = self._pending + self.engine.num_waiting + len(self._scoring)
            if queued >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._pending += 1

    def abort(self, request_id: str) -> bool:
        future: Future = Future()
        self._commands.put(Abort(request_id, future))
        return future.result()

    def drain(self) -> None:
        """Stop accepting; requests already in run to completion."""
        with self._lock:
            if self.state is LoopState.SERVING:
                self.state = LoopState.DRAINING

    def fail(self, error: BaseException) -> None:
        """Fail from outside the engine thread, which may be stuck in a step that will never
        finish (another process of the engine was lost): refuse new work and end every open
        stream and score with `error`."""
        self.error = error
        self._fail_all(error, LoopState.FAILED)

    def stop(self, timeout: float = 10.0) -> None:
        self._commands.put(Stop())
        self._thread.join(timeout)

    # ---- the engine thread ----
    def _busy(self) -> bool:
        return self.state is not LoopState.FAILED and (self.engine.has_unfinished()
                                                       or bool(self._scoring))

    def _run(self) -> None:
        while True:
            idle = not self._busy()
            timeline = self.engine.timeline
            try:
                if idle:
                    timeline.lap("other")
                    command = self._commands.get(timeout=0.05)
                else:
                    command = self._commands.get_nowait()
            except queue.Empty:
                command = None
            if idle:
                timeline.lap("idle")
            handled = False
            while command is not None:
                if isinstance(command, Stop):
                    self._fail_all(NotAccepting("the server stopped"), LoopState.STOPPED)
                    self.engine.output.close()
                    return
                self._handlers[type(command)](command)
                handled = True
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self._busy():
                if handled and self.state is not LoopState.FAILED and self.on_step is not None:
                    try:  # no step follows (e.g. an abort emptied the engine): let metrics see it
                        self.on_step(self, 0.0)
                    except Exception as e:
                        self.error = e
                        self._fail_all(e, LoopState.FAILED)
                continue
            try:
                t0 = time.perf_counter()
                if self.engine.has_unfinished():
                    for request in self.engine.step():
                        self._close(request, None)
                if self._scoring:
                    self._score_step()
                if self.on_step is not None:
                    self.on_step(self, time.perf_counter() - t0)
            except Exception as e:  # the engine can no longer be trusted
                self.error = e
                self._fail_all(e, LoopState.FAILED)

    def _score_step(self) -> None:
        """One step of the oldest scoring run (which frees its blocks as its pieces finish)."""
        run_id, (run, future) = next(iter(self._scoring.items()))
        if run.step() is None and not self.engine.has_unfinished():
            # every block is free, yet the next piece does not fit: validation rules this out
            del self._scoring[run_id]
            run.release()
            future.set_exception(RuntimeError("scoring found no free KV blocks for its next "
                                              "piece"))
        elif run.done:
            del self._scoring[run_id]
            future.set_result(run)

    def _accepted(self, future: Future) -> bool:
        """A submission reached the engine thread; False (and the future failed) when the
        engine failed meanwhile."""
        with self._lock:
            self._pending -= 1
        if self.state is LoopState.FAILED:
            future.set_exception(NotAccepting("the engine failed"))
            return False
        return True

    def _handle_submit(self, command: Submit) -> None:
        if not self._accepted(command.future):
            return
        try:
            request = self.engine.add_request(command.request_id, command.prompt_ids,
                                              command.params, command.prompt)
        except Exception as e:  # validation: the caller reports it
            command.future.set_exception(e)
            return
        stream = RequestStream(command.request_id, len(request.sequences))
        with self._streams_lock:
            self._streams[command.request_id] = stream
            for seq in request.sequences:
                self._cursors[id(seq)] = _SeqCursor()
        command.future.set_result(stream)

    def _handle_score(self, command: SubmitScore) -> None:
        if not self._accepted(command.future):
            return
        if command.run_id in self._scoring:
            command.future.set_exception(ValueError(f"run id {command.run_id!r} is already in "
                                                    f"use"))
        else:
            self._scoring[command.run_id] = (ScoreRun(self.engine, command.jobs), command.future)

    def _handle_abort(self, command: Abort) -> None:
        request = self.engine.abort(command.request_id)
        if request is not None:
            self._close(request, "abort")
        scoring = self._scoring.pop(command.request_id, None)
        if scoring is not None:
            run, run_future = scoring
            run.release()
            run_future.set_exception(ScoreAborted(f"scoring {command.request_id!r} was aborted"))
        command.future.set_result(request is not None or scoring is not None)

    def _publish(self, updated: list[Sequence]) -> None:
        """Deltas of the sequences that got new text (the output processor's hook)."""
        with self._streams_lock:
            for seq in dict.fromkeys(updated):  # each sequence once, in order
                stream = self._streams.get(seq.request.request_id)
                cursor = self._cursors.get(id(seq))
                if stream is None or cursor is None:
                    continue
                hold = max((len(s) for s in seq.params.stop), default=1) - 1 \
                    if seq.finish_reason is None else 0
                text_end = max(cursor.text, len(seq.text) - hold)
                tokens = seq.output_ids[cursor.tokens:seq.num_processed]
                if tokens or text_end > cursor.text:
                    logprobs = None if seq.logprobs is None else \
                        seq.logprobs[cursor.tokens:seq.num_processed]
                    stream.events.put(Delta(seq.index, tokens, seq.text[cursor.text:text_end],
                                            logprobs))
                    cursor.tokens, cursor.text = seq.num_processed, text_end

    def _close(self, request: Request, reason: str | None) -> None:
        with self._streams_lock:
            stream = self._streams.pop(request.request_id, None)
            if stream is None:
                return
            for seq in request.sequences:
                cursor = self._cursors.pop(id(seq), _SeqCursor())
                stream.events.put(Final(seq.index, reason or seq.finish_reason or "abort",
                                        len(request.prompt_ids), len(seq.output_ids),
                                        seq.text[cursor.text:], request.metrics,
                                        request.cached_prompt_tokens or 0))

    def _fail_all(self, error: BaseException, state: LoopState) -> None:
        with self._lock:
            self.state = state
        with self._streams_lock:
            for request_id, stream in list(self._streams.items()):
                stream.events.put(Failure(error))
            self._streams.clear()
            self._cursors.clear()
        for run, future in self._scoring.values():
            run.release()
            future.set_exception(error)
        self._scoring.clear()
        while True:  # requests that never reached the engine
            try:
                future = self._commands.get_nowait().future
            except queue.Empty:
                break
            if future is not None and not future.done():
                future.set_exception(NotAccepting(f"the engine is {state.value}"))
