"""Output processing: applied tokens -> each sequence's text, logprobs, stop strings, streaming.

A read-back step is handled in two parts, split by what the scheduler needs to know at once:

- the *token part* is the scheduler's (`Scheduler.update`), on the engine thread right after
  readback: append the token id and apply the stops a token id decides (EOS, stop_token_ids,
  max_tokens, the context is full). Those free the sequence's slot and blocks before the next
  step is planned. It hands this processor the tokens it applied (`SampledToken`).
- the *text part*, here: logprobs, detokenization, stop strings, streaming updates. Where it
  runs is `OutputProcessor.mode` (the setting "auto", the default, resolves by platform:
  `check_mode`):
    "inline"  right after the token part, on the engine thread: the next step's dispatch waits
              for it (with many streams, it is on the critical path);
    "thread"  on a worker thread, while the engine thread plans and dispatches the next step.
              The engine thread holds the GIL only while it schedules, builds and dispatches;
              it releases it while it waits on the device, which is when the worker runs. The
              worker hands the GIL back every few sequences so it never delays a dispatch long.

The processor never touches the engine, the scheduler or their counters: it returns what it
decided (`Processed`: stops the token part let run, requests whose every sequence finished)
and the engine applies it. A stop string found by the text part in thread mode finishes its
sequence late: the engine learns it at its next `collect`, has the scheduler drop the tokens
sampled after the stop (as it always drops the token a step in flight samples after any stop:
vLLM's async-scheduling trade) and free the slot then. Outputs are token for token the same in
both modes.

Ownership in thread mode: the engine thread owns `output_ids` (it appends and truncates) and
`status`; the text part owns `text`, `logprobs`, `cumulative_logprob`, the detokenizer,
`num_processed` and the finish reason (except "abort", which the engine sets). A finished
request is handed back only through the engine thread, after any truncation, so its output is
final when the caller sees it; streaming deltas carry only tokens the text part has processed.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable

import numpy as np

from jaxserve.engine.sequence import Request, SampledToken, Sequence
from jaxserve.engine.timeline import Timeline
from jaxserve.settings import OUTPUT_PROCESSING_MODES

OUTPUT_PROCESSING = OUTPUT_PROCESSING_MODES
DEFAULT_OUTPUT_PROCESSING = "auto"
YIELD_EVERY = 8  # sequences the worker processes between handing the GIL back
POLL_EVERY = 16  # sequences the inline text part processes between device polls


@dataclasses.dataclass(frozen=True)
class LateStop:
    """A stop string ended `seq` at its `num_outputs`-th token, which the token part had let
    run: the tokens after it must go, and its slot and blocks."""

    seq: Sequence
    num_outputs: int


@dataclasses.dataclass(frozen=True)
class RequestDone:
    """Every sequence of the request has its final text and finish reason."""

    request: Request


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclasses.dataclass
class Processed:
    """What the text part decided since the last `collect`, for the engine to apply."""

    late_stops: list[LateStop] = dataclasses.field(default_factory=list)
    done: list[Request] = dataclasses.field(default_factory=list)


def check_mode(mode: str, platform: str | None = None) -> str:
    """The mode text is processed in, "inline" or "thread"; "auto" (the default) picks by the
    platform XLA computes on (`platform`, else JAX's default backend): "inline" on cpu, "thread"
    on accelerators. Why: on cpu the worker's Python competes with XLA's compute threads for the
    same cores, and the step loses more than the engine thread gains (BENCHMARKS.md: -8% output
    tokens/s on 2 cores); on a gpu or tpu the host cores idle while the device computes, so the
    text part fits into the engine thread's device waits and comes off its critical path. The
    accelerator half is reasoned from the cpu timeline (host-only time per step falls when the
    text part moves off the engine thread), not measured on an accelerator."""
    if mode not in OUTPUT_PROCESSING:
        raise ValueError(f"output_processing must be one of {', '.join(OUTPUT_PROCESSING)}, "
                         f"got {mode!r}")
    if mode != "auto":
        return mode
    if platform is None:
        import jax  # only to resolve "auto": validating a name needs no devices

        platform = jax.default_backend()
    return "inline" if platform == "cpu" else "thread"


class OutputProcessor:
    def __init__(self, timeline: Timeline, mode: str = DEFAULT_OUTPUT_PROCESSING):
        self.timeline = timeline  # device polls (inline) and the worker's spans
        self.mode = check_mode(mode)
        # Called with the sequences that got new text, from wherever the text part runs (a
        # streaming server publishes deltas from it).
        self.on_updates: Callable[[list[Sequence]], None] | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # text part -> engine thread
        self._work: queue.Queue | None = None
        self._worker: threading.Thread | None = None

    def set_mode(self, mode: str) -> None:
        """Process text another way from the next step on (what was handed over finishes)."""
        self.wait()
        self.mode = check_mode(mode)

    # ---- engine thread ----
    def process(self, arrays: dict[str, np.ndarray], sampled: list[SampledToken]) -> Processed:
        """The text of one step's applied tokens (`arrays`: the step's read-back outputs).
        Inline, returns what it decided; thread mode hands the work over and returns nothing
        yet (`collect` returns it later)."""
        if self.mode == "inline":
            self._text_part(arrays, sampled, poll=self.timeline.poll)
            return self.collect()
        if sampled:
            self._ensure_worker()
            self._work.put((arrays, sampled))
        return Processed()

    def collect(self) -> Processed:
        """What the text part decided since the last call (raises if it failed)."""
        out = Processed()
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return out
            if isinstance(event, _Failed):
                raise RuntimeError("output processing failed") from event.error
            if isinstance(event, LateStop):
                out.late_stops.append(event)
            else:
                out.done.append(event.request)

    @property
    def busy(self) -> bool:
        """Work handed to the worker is not done yet."""
        return self._work is not None and self._work.unfinished_tasks > 0

    def wait(self) -> None:
        """Block until the worker has processed everything handed to it."""
        if self._work is not None:
            self._work.join()

    def close(self) -> None:
        if self._worker is not None:
            self._work.put(None)
            self._worker.join()
            self._worker = self._work = None

    # ---- the text part (engine thread inline, else the worker) ----
    def _text_part(self, arrays, sampled: list[SampledToken], poll=None, pause=None) -> None:
        updated = []
        for i, item in enumerate(sampled):
            if self._text(arrays, item):
                updated.append(item.seq)
            if poll is not None and i % POLL_EVERY == POLL_EVERY - 1:
                poll()
            if pause is not None and i % YIELD_EVERY == YIELD_EVERY - 1:
                pause()
        if updated and self.on_updates is not None:
            self.on_updates(updated)
        for request in dict.fromkeys(seq.request for seq in updated):  # each once, in order
            if all(s.finish_reason is not None for s in request.sequences):
                self._events.put(RequestDone(request))

    def _text(self, arrays, item: SampledToken) -> bool:
        """One token's text; returns whether the sequence changed."""
        seq, row, token, n, stop = item.seq, item.row, item.token, item.index, item.stop
        if seq.finish_reason is not None:  # sampled after a stop the engine has not applied
            return False
        params = seq.params
        if seq.logprobs is not None:
            k = params.logprobs
            top = dict(zip(arrays["top_ids"][row, :k].tolist(),
                           arrays["top_logprobs"][row, :k].tolist()))
            chosen = float(arrays["logprob"][row])
            top[token] = chosen
            seq.logprobs.append(top)
            seq.cumulative_logprob += chosen
        text_before = len(seq.text)
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.push([token])
        seq.num_processed = n
        if stop is not None and not stop.text_stop_wins:
            return self._finish(seq, stop.finish_reason, stop.stop_reason)
        if params.stop and n >= params.min_tokens:
            longest = max(len(s) for s in params.stop)
            start = max(0, text_before - longest + 1)
            hits = [(i, s) for s in params.stop if (i := seq.text.find(s, start)) >= 0]
            if hits:
                index, stop_string = min(hits)
                seq.text = seq.text[:index]
                if stop is None:  # the token part let it run: the engine must stop it
                    self._events.put(LateStop(seq, n))
                return self._finish(seq, "stop", stop_string, flush=False)
        if stop is not None:
            return self._finish(seq, stop.finish_reason, stop.stop_reason)
        return True

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason, flush: bool = True) -> bool:
        if flush and seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()
        if seq.finish_reason is None:  # not aborted meanwhile
            seq.finish_reason, seq.stop_reason = reason, stop_reason
        return True

    # ---- the worker ----
    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._work = queue.Queue()
            self._worker = threading.Thread(target=self._run, name="jaxserve-output",
                                            daemon=True)
            self._worker.start()

    def _run(self) -> None:
        timeline = self.timeline
        while True:
            job = self._work.get()
            try:
                if job is None:
                    return
                t0 = timeline.clock()
                self._text_part(*job, pause=_yield_gil)
                timeline.span("output thread", "process", t0, timeline.clock(),
                              tokens=len(job[1]))
            except BaseException as e:  # noqa: BLE001  handed to the engine thread
                self._events.put(_Failed(e))
            finally:
                self._work.task_done()


def _yield_gil() -> None:
    time.sleep(0)
