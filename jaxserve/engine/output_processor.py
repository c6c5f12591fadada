"""Output processing: read-back tokens -> each sequence's outputs, stop checks, streaming.

Two parts, split by what the scheduler needs to know at once:

- the *token part*, on the engine thread right after readback: append the token id and apply
  the stops a token id decides (EOS, stop_token_ids, max_tokens, the context is full). Those
  free the sequence's slot and blocks before the next step is planned.
- the *text part*: logprobs, detokenization, stop strings, streaming updates. Where it runs is
  `OutputProcessor.mode` (the setting "auto", the default, resolves by platform: `check_mode`):
    "inline"  right after the token part, on the engine thread: the next step's dispatch waits
              for it (with many streams, it is on the critical path);
    "thread"  on a worker thread, while the engine thread plans and dispatches the next step.
              The engine thread holds the GIL only while it schedules, builds and dispatches;
              it releases it while it waits on the device, which is when the worker runs. The
              worker hands the GIL back every few sequences so it never delays a dispatch long.

A stop string found by the text part in thread mode finishes its sequence late: the engine
thread learns it at its next `collect`, drops the tokens sampled after the stop (as it always
drops the token a step in flight samples after any stop: vLLM's async-scheduling trade) and
frees the slot then. Outputs are token for token the same in both modes.

Ownership in thread mode: the engine thread owns `output_ids` (it appends and truncates) and
`status`; the text part owns `text`, `logprobs`, `cumulative_logprob`, the detokenizer,
`num_processed` and the finish reason (except "abort", which the engine sets). A finished
request is handed back only through the engine thread, after any truncation, so its output is
final when the caller sees it; streaming deltas carry only tokens the text part has processed.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from jaxserve.engine.sequence import Request, Sequence, Status

if TYPE_CHECKING:
    from jaxserve.engine.engine import Engine

OUTPUT_PROCESSING = ("auto", "inline", "thread")
DEFAULT_OUTPUT_PROCESSING = "auto"
YIELD_EVERY = 8  # sequences the worker processes between handing the GIL back
POLL_EVERY = 16  # sequences the inline text part processes between device polls

# (sequence, row of the step's outputs, token, its 1-based index among the outputs, and the
# token part's verdict: None, or (finish reason, stop reason, whether stop strings still win))
Item = tuple[Sequence, int, int, int, "tuple[str, object, bool] | None"]


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
    def __init__(self, engine: Engine, mode: str = DEFAULT_OUTPUT_PROCESSING):
        self.engine = engine
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
    def read_back(self, rows: list[tuple[int, Sequence]], arrays: dict[str, np.ndarray],
                  now: float) -> list[Request]:
        """Apply one step's read-back tokens; returns the requests that finished (inline mode;
        thread mode hands them back from `collect`)."""
        items = self._token_part(rows, arrays, now)
        if self.mode == "inline":
            self._text_part(arrays, items, poll=self.engine.timeline.poll)
            return self.collect()
        if items:
            self._ensure_worker()
            self._work.put((arrays, items))
        return []

    def collect(self) -> list[Request]:
        """Apply what the text part decided since the last call: late stops (drop the tokens
        after them, free the slot) and finished requests, which are returned."""
        engine, finished = self.engine, []
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return finished
            if kind == "error":
                raise RuntimeError("output processing failed") from payload
            if kind == "stop":
                seq, n = payload
                late = len(seq.output_ids) - n
                if late > 0:
                    del seq.output_ids[n:]
                    engine.counters["generated_tokens"] -= late
                    engine.counters["discarded_tokens"] += late
                if seq.status is not Status.FINISHED:
                    engine.scheduler.finish(seq)
            else:
                request = payload
                if engine.requests.get(request.request_id) is request:  # not aborted
                    request.metrics.finished_time = time.perf_counter()
                    del engine.requests[request.request_id]
                    finished.append(request)

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

    def _token_part(self, rows, arrays, now) -> list[Item]:
        engine = self.engine
        tokens = arrays["tokens"].tolist()
        items: list[Item] = []
        for r, seq in rows:
            if seq.status is Status.FINISHED:  # stopped while this step was in flight
                engine.counters["discarded_tokens"] += 1
                continue
            token = tokens[r]
            seq.output_ids.append(token)
            engine.scheduler.name_blocks(seq)  # its full blocks join the prefix cache
            n = len(seq.output_ids)
            engine.counters["generated_tokens"] += 1
            metrics = seq.request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            verdict = self._token_verdict(seq, token, n)
            if verdict is not None:
                engine.scheduler.finish(seq)
            items.append((seq, r, token, n, verdict))
        return items

    def _token_verdict(self, seq: Sequence, token: int, n: int):
        """The stops a token id decides, in the order they take effect: (finish reason, stop
        reason, whether a stop string in this token's text still wins)."""
        params = seq.params
        if token in self.engine.eos_ids and not params.ignore_eos and n > params.min_tokens - 1:
            return ("stop", None, False)
        if token in params.stop_token_ids and n > params.min_tokens - 1:
            return ("stop", token, False)
        if (params.max_tokens is not None and n >= params.max_tokens) or \
                len(seq.request.prompt_ids) + n >= self.engine.max_model_len:
            return ("length", None, True)
        return None

    # ---- the text part (engine thread inline, else the worker) ----
    def _text_part(self, arrays, items: list[Item], poll=None, pause=None) -> None:
        updated = []
        for i, item in enumerate(items):
            if self._text(arrays, item):
                updated.append(item[0])
            if poll is not None and i % POLL_EVERY == POLL_EVERY - 1:
                poll()
            if pause is not None and i % YIELD_EVERY == YIELD_EVERY - 1:
                pause()
        if updated and self.on_updates is not None:
            self.on_updates(updated)
        for seq in updated:
            request = seq.request
            if seq.finish_reason is not None and all(s.finish_reason is not None
                                                     for s in request.sequences):
                self._events.put(("done", request))

    def _text(self, arrays, item: Item) -> bool:
        """One token's text; returns whether the sequence changed."""
        seq, row, token, n, verdict = item
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
        if verdict is not None and not verdict[2]:
            return self._finish(seq, verdict[0], verdict[1])
        if params.stop and n >= params.min_tokens:
            longest = max(len(s) for s in params.stop)
            start = max(0, text_before - longest + 1)
            hits = [(i, s) for s in params.stop if (i := seq.text.find(s, start)) >= 0]
            if hits:
                index, stop = min(hits)
                seq.text = seq.text[:index]
                if verdict is None:  # the token part let it run: the engine must stop it
                    self._events.put(("stop", (seq, n)))
                return self._finish(seq, "stop", stop, flush=False)
        if verdict is not None:
            return self._finish(seq, verdict[0], verdict[1])
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
        timeline = self.engine.timeline
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
                self._events.put(("error", e))
            finally:
                self._work.task_done()


def _yield_gil() -> None:
    time.sleep(0)
