"""Warm-up: when each step program is compiled, so that requests do not wait on compiles.

A step runs in one of a few bucketed shapes (jaxserve/engine/step_builder.py), each a program to
compile (seconds each on a CPU). The mode (`LLM(compilation=...)`, `--compilation`, or
`$JAXSERVE_COMPILATION` when neither says) decides when:

- "background" (the default): before the engine takes requests, ONE shape that holds every
  step of the first requests -- a prefill of one `max_prefill_chunk` with a few decodes beside
  it (one compile: a start is seconds, not one compile per bucket) -- and then, on a thread, the
  rest: the smallest decode bucket (a lone request's decodes: in the first shape each costs up
  to 20 times more on a 55M model), the largest shape (every step fits in it, so from then on
  no step waits), the side programs (penalties, `n > 1` copies), the other decode buckets, the
  prefill buckets. Until a step's own bucket is compiled the step
  runs in the cheapest compiled shape that holds it (`StepBuilder.covering`: a step after a
  prefix cache hit, whose bucket is smaller than the full prompt's, runs in a larger one); only
  a step that no compiled shape holds waits (`steps_waiting_for_compile`).
- "upfront": every program before the engine takes requests (what `LLM.warmup()` does).
- "on_use": each program the first time a step needs it; that step waits.

With the persistent compilation cache (jaxserve/runtime/compile_cache.py) each of these loads
what an earlier start compiled instead of compiling it.

A speculative engine has a second family: its decode-only steps in which nobody proposes run
the plain engine's programs (`plain`, a StepBuilder without speculation), compiled last by the
thread (and with the rest upfront); until a plain program is compiled such a step runs in the
speculative family, as any step whose bucket is not compiled runs in one that is
(`plain_shape`).

The thread only compiles; the runner makes sure a shape is compiled once whoever asks first.
It stops between two compiles when asked (`stop`, and at interpreter exit): a compile in
progress cannot be interrupted, so stopping waits for it.
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import threading
import time
import weakref
from typing import Any

from jaxserve.engine.step_builder import SMALL_MIXED_DECODES, StepBuilder
from jaxserve.runtime.runner import ModelRunner, StepInputs
from jaxserve.settings import COMPILATION_MODES

MODES = COMPILATION_MODES
DEFAULT_MODE = "background"
ENV = "JAXSERVE_COMPILATION"

_RUNNING: weakref.WeakSet[ShapeCompiler] = weakref.WeakSet()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"compilation must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def resolve_mode(mode: str | None) -> str:
    """The mode a setting means: None = `$JAXSERVE_COMPILATION`, else the default."""
    if mode is None:
        value = os.environ.get(ENV)
        if value and value not in MODES:
            raise ValueError(f"${ENV} must be one of {', '.join(MODES)}, got {value!r}")
        return value or DEFAULT_MODE
    return check_mode(mode)


class ShapeCompiler:
    """Compiles an engine's step programs in the order above and says, per step, which
    compiled shape it runs in."""

    def __init__(self, runner: ModelRunner, builder: StepBuilder, mode: str,
                 first_prefill_tokens: int, side_programs: tuple[int, int],
                 plain: StepBuilder | None = None):
        """first_prefill_tokens: the prefill a first request needs in one step (one chunk).
        side_programs: (slot rows, block copies) of the programs beside the step. plain: a
        speculative engine's builder of plain decode-only steps."""
        self.runner = runner
        self.builder = builder
        self.plain = plain
        self._plain_inputs: dict[int, StepInputs] = {}
        self.mode = check_mode(mode)
        self.side_programs = side_programs
        self.first = [builder.shape_for(min(SMALL_MIXED_DECODES, builder.decode_buckets[-1]),
                                        min(first_prefill_tokens, builder.prefill_buckets[-1]))]
        self.largest = max(builder.shapes(), key=lambda s: (s[1], s[0]))  # every step fits
        self.counters: collections.Counter[str] = collections.Counter()
        self.background_s: float | None = None  # how long the thread took, once it is done
        self.error: BaseException | None = None
        self._inputs: dict[tuple[int, int], StepInputs] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the order ----
    def background_order(self) -> list[tuple[int, int]]:
        """The shapes the thread compiles, in order (the side programs go after the largest)."""
        shapes = self.builder.shapes()
        lone_decode = (self.builder.decode_buckets[0], 0)
        rest = sorted(shapes, key=lambda s: (s[1] > 0, s[1], s[0]))
        order = list(dict.fromkeys([lone_decode, self.largest] + rest))
        return [s for s in order if s not in self.first]

    def _step_inputs(self, shape: tuple[int, int]) -> StepInputs:
        if shape not in self._inputs:
            self._inputs[shape] = self.builder.idle(*shape)
        return self._inputs[shape]

    def is_compiled(self, shape: tuple[int, int]) -> bool:
        return self.runner.has_step(self._step_inputs(shape))

    def _plain_step_inputs(self, decode_rows: int) -> StepInputs:
        if decode_rows not in self._plain_inputs:
            self._plain_inputs[decode_rows] = self.plain.idle(decode_rows, 0)
        return self._plain_inputs[decode_rows]

    def _all_plain_inputs(self) -> list[StepInputs]:
        return [self._plain_step_inputs(d) for d in self.plain.decode_buckets] \
            if self.plain is not None else []

    # ---- running ----
    def start(self) -> None:
        """Compile what the mode compiles before the engine takes requests (and start the
        thread)."""
        if self.mode == "upfront":
            self.compile_all(threads=os.cpu_count() or 1)
        elif self.mode == "background":
            self.runner.compile_steps([self._step_inputs(s) for s in self.first],
                                      threads=min(len(self.first), os.cpu_count() or 1))
            self._thread = threading.Thread(target=self._run, name="jaxserve-warmup",
                                            daemon=True)
            _RUNNING.add(self)
            self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            order = self.background_order()
            jobs = [functools.partial(self.runner.compile_steps, [self._step_inputs(s)], 1)
                    for s in order]
            jobs.insert(order.index(self.largest) + 1 if self.largest in order else 0,
                        functools.partial(self.runner.compile_side_programs, *self.side_programs))
            jobs += [functools.partial(self.runner.compile_steps, [inputs], 1)
                     for inputs in self._all_plain_inputs()]
            for job in jobs:
                if self._stop.is_set():
                    return
                job()
            self.background_s = time.perf_counter() - t0
        except BaseException as e:  # steps compile what is missing themselves, and raise it
            self.error = e

    def stop(self) -> None:
        """Stop the thread after the compile in progress (the rest then compile on use)."""
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        """Wait until the thread is done; raise what stopped it, if anything did."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"compiling step programs in the background failed: "
                               f"{self.error}") from self.error

    def compile_all(self, threads: int) -> int:
        """Compile every program the engine can use now, `threads` at a time (the thread,
        if running, stops first); returns how many were new."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        shapes = [self._step_inputs(s) for s in self.builder.shapes()] + self._all_plain_inputs()
        return (self.runner.compile_steps(shapes, threads)
                + self.runner.compile_side_programs(*self.side_programs))

    # ---- per step ----
    def shape_for(self, decodes: int, prefill_tokens: int) -> tuple[int, int]:
        """The shape a step of `decodes` decodes and `prefill_tokens` prefill tokens runs in:
        its bucket if that is compiled, else the cheapest compiled shape that holds it, else its
        bucket all the same (the step waits for its compile)."""
        bucket = self.builder.shape_for(decodes, prefill_tokens)
        if self.is_compiled(bucket):
            return bucket
        if self.mode != "on_use":
            for shape in self.builder.covering(decodes, prefill_tokens):
                if self.is_compiled(shape):
                    self.counters["steps_in_larger_shape"] += 1
                    return shape
        self.counters["steps_waiting_for_compile"] += 1
        return bucket

    def plain_shape(self, decodes: int) -> tuple[int, int] | None:
        """The shape a speculative engine's decode-only step without proposals runs in with the
        plain programs: its plain bucket, once compiled (on_use: always); None: not yet (the
        step runs in the speculative family)."""
        if self.plain is None:
            return None
        shape = self.plain.shape_for(decodes, 0)
        if self.mode == "on_use" or self.runner.has_step(self._plain_step_inputs(shape[0])):
            return shape
        return None

    def stats(self) -> dict[str, Any]:
        shapes = self.builder.shapes()
        return {"compilation": self.mode,
                "step_shapes_compiled": sum(self.is_compiled(s) for s in shapes),
                "step_shapes": len(shapes),
                "steps_in_larger_shape": self.counters["steps_in_larger_shape"],
                "steps_waiting_for_compile": self.counters["steps_waiting_for_compile"],
                "background_compile_s": (None if self.background_s is None
                                         else round(self.background_s, 3))}


@atexit.register
def _stop_all() -> None:
    """A compile must not be running while the interpreter shuts down under it."""
    for compiler in list(_RUNNING):
        compiler._stop.set()
    for compiler in list(_RUNNING):
        if compiler._thread is not None:
            compiler._thread.join()
