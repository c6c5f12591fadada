"""Where each engine step's time goes: host phases and device occupancy, in a ring buffer.

Host phases tile the engine thread's wall-clock time: each `lap(phase)` closes the span since the
previous lap, so the spans add up to the time since `reset()`. Phases:

  schedule   the scheduler's plan (admission, budgets, preemption)
  build      plan -> the step's input arrays (the step builder)
  dispatch   handing the compiled program to the runtime (returns before the device finishes)
  wait       blocking until the oldest step in flight is done
  readback   copying its tokens (and logprobs) to the host
  process    output processing: tokens -> text, stop checks, streaming
  other      the caller's own work between engine steps
  idle       nothing to do (a server waiting for requests): left out of the Amdahl table

Device occupancy is inferred, never synced for: a step is on the device from when it is
dispatched (or the step before it is done, if later) until the host first *sees* it done, at
the end of a wait or at any lap where the step's output says `is_ready()` (a non-blocking
poll, well under a microsecond). When every dispatched step is done and the next is not yet
dispatched, the device has nothing queued: an idle gap. A step is seen done at the next lap
or poll, so gaps are never overstated.

Amdahl's law for tensor parallelism charges the work that does not shrink with the TP degree:
here, the host-only time (busy wall time minus device time: the device waited for the host)
against the device fraction. `summary()` gives that table over the ring's window;
`chrome_trace()` the same spans in the trace-event format (Perfetto, chrome://tracing).

Only the engine thread calls `lap`, `poll`, `dispatched`; other threads (an output processor)
record their own spans with `span`. Nothing here blocks or touches a device.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

PHASES = ("schedule", "build", "dispatch", "wait", "readback", "process", "other", "idle")
HOST_TRACK = "engine thread"
DEFAULT_CAPACITY = 8192  # host spans kept; about 1000 steps of 7 phases


@dataclasses.dataclass
class DeviceStep:
    step: int
    dispatched: float  # when the program was handed over (end of its dispatch phase)
    label: dict[str, Any]
    probe: Any = None  # an output array of the step: is_ready() says the step is done
    done: float | None = None  # when the host first saw it done


class Timeline:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock=time.perf_counter):
        self.capacity = capacity
        self.clock = clock
        self.totals: collections.Counter = collections.Counter()  # phase -> seconds, whole run
        self._profile: JaxProfileWindow | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new window now (the ring and the totals are cleared)."""
        now = self.clock()
        self.origin = now
        self._last = now
        self.spans: collections.deque = collections.deque(maxlen=self.capacity)
        self.devices: collections.deque[DeviceStep] = collections.deque(maxlen=self.capacity)
        self.pending: collections.deque[DeviceStep] = collections.deque()
        self.others: collections.deque = collections.deque(maxlen=self.capacity)
        self.totals.clear()
        self.steps = 0

    # ---- recording (engine thread) ----
    def lap(self, phase: str) -> float:
        """Close the span since the last lap as `phase`; returns now. A stretch of idle laps
        is kept as one span (the serve loop laps `other` and `idle` each time it waits for a
        request: an `other` between two idle spans is part of the stretch), so waiting does
        not push the steps out of the ring."""
        now = self.clock()
        spans = self.spans
        if phase == "idle" and spans and spans[-1][0] == "other" and len(spans) > 1 \
                and spans[-2][0] == "idle":
            _, start, end = spans.pop()
            self.totals["other"] -= end - start
            self.totals["idle"] += end - start
        if phase == "idle" and spans and spans[-1][0] == "idle":
            spans[-1] = ("idle", spans[-1][1], now)
        else:
            spans.append((phase, self._last, now))
        self.totals[phase] += now - self._last
        self._last = now
        if self.pending:
            self._poll(now)
        return now

    def poll(self) -> None:
        """See whether steps in flight are done (cheap; call inside long phases)."""
        if self.pending:
            self._poll(self.clock())

    def _poll(self, now: float) -> None:
        while self.pending and self.pending[0].probe.is_ready():
            step = self.pending.popleft()
            step.done, step.probe = now, None

    def dispatched(self, probe, **label) -> None:
        """A step was just dispatched; `probe` is one of its outputs."""
        self.steps += 1
        step = DeviceStep(self.steps, self._last, label, probe)
        self.devices.append(step)
        self.pending.append(step)
        if self._profile is not None:
            self._profile.on_dispatch(self.steps)

    def span(self, track: str, name: str, start: float, end: float, **args) -> None:
        """A span of another thread's work (thread-safe: one deque append)."""
        self.others.append((track, name, start, end, args))

    # ---- jax.profiler ----
    def capture_jax_profile(self, log_dir: str | Path, first_step: int, num_steps: int) -> None:
        """Record a `jax.profiler` trace of the steps first_step .. first_step + num_steps - 1
        (1 = the next step dispatched) into log_dir."""
        if first_step < 1:
            raise ValueError(f"the first profiled step must be >= 1, got {first_step}")
        self._profile = JaxProfileWindow(Path(log_dir), self.steps + first_step, num_steps)
        if first_step == 1:
            self._profile.start()

    def close(self) -> None:
        """Stop a jax.profiler capture still running (the run ended inside the window)."""
        if self._profile is not None:
            self._profile.stop()

    # ---- reading ----
    def _device_intervals(self) -> tuple[list[tuple[float, float, DeviceStep]],
                                         list[tuple[float, float]]]:
        """Busy intervals (start, end, step) of steps seen done, and the idle gaps between
        them (the device had nothing queued)."""
        busy, gaps = [], []
        previous_done = None
        for step in list(self.devices):
            if step.done is None:
                break
            start = step.dispatched if previous_done is None else max(step.dispatched,
                                                                      previous_done)
            if previous_done is not None and step.dispatched > previous_done:
                gaps.append((previous_done, step.dispatched))
            busy.append((start, max(start, step.done), step))
            previous_done = max(start, step.done)
        return busy, gaps

    def _window(self) -> tuple[float, float]:
        """The time the ring still covers: from the oldest kept host span (or, once the device
        ring has dropped steps, the oldest kept step's dispatch, if later) to the newest span.
        Phases, steps and device time are all counted over this one window."""
        lo, hi = self.spans[0][1], self.spans[-1][2]
        if self.devices and self.devices[0].step > 1:  # older steps were dropped
            lo = max(lo, self.devices[0].dispatched)
        return lo, hi

    def summary(self) -> dict[str, Any]:
        """The Amdahl table over the window: per phase, seconds, ms per step, the part spent
        while the device had nothing queued (exposed: on the critical path), and its share of
        the busy wall time (idle excluded); then device time and the host-only fraction. The
        steps are those dispatched inside the window, so once the ring wraps the per-step
        figures still divide the window's seconds by the window's steps."""
        if not self.spans:
            return {"steps": 0, "wall_s": 0.0, "phases": {}}
        lo, hi = self._window()
        spans = [(p, max(s, lo), e) for p, s, e in self.spans if e > lo]
        busy, gaps = self._device_intervals()
        in_window = [step for _, _, step in busy if step.dispatched >= lo]
        busy_s = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e, _ in busy)
        # The device had nothing queued from the window's start to the first dispatch (when
        # no kept step precedes it), and from the last step seen done to the next dispatch
        # (or the end); a step still in flight at the end keeps it busy from its dispatch on.
        first = next(iter(self.devices), None)
        edge_gaps = [(lo, first.dispatched if first is not None else hi)]
        still = [s for s in self.devices if s.done is None]
        if busy:
            last_done = busy[-1][1]
            edge_gaps.append((max(lo, last_done), still[0].dispatched if still else hi))
        if still:
            busy_s += max(0.0, hi - max(still[0].dispatched, busy[-1][1] if busy else lo, lo))
        idle_device = sorted(gaps + [g for g in edge_gaps if g[1] > g[0]])
        phases: dict[str, dict[str, float]] = {}
        for name in PHASES:
            mine = [(s, e) for p, s, e in spans if p == name]
            if not mine:
                continue
            total = sum(e - s for s, e in mine)
            phases[name] = {"seconds": total, "exposed_s": _overlap(mine, idle_device)}
        idle = phases.get("idle", {}).get("seconds", 0.0)
        wall = hi - lo
        busy_wall = wall - idle
        steps = max(1, len(in_window))
        for name, row in phases.items():
            row["ms_per_step"] = 1e3 * row["seconds"] / steps
            row["exposed_ms_per_step"] = 1e3 * row["exposed_s"] / steps
            row["share"] = row["seconds"] / busy_wall if busy_wall > 0 and name != "idle" else 0.0
        host_only = max(0.0, busy_wall - busy_s)
        return {
            "steps": len(in_window), "wall_s": wall, "busy_wall_s": busy_wall, "idle_s": idle,
            "device_s": busy_s, "host_only_s": host_only,
            "device_fraction": busy_s / busy_wall if busy_wall > 0 else 0.0,
            "host_only_fraction": host_only / busy_wall if busy_wall > 0 else 0.0,
            "device_ms_per_step": 1e3 * busy_s / steps,
            "host_only_ms_per_step": 1e3 * host_only / steps,
            "phases": phases,
        }

    def chrome_trace(self) -> dict[str, Any]:
        """The window in Chrome's trace-event format (JSON object form): host phases on the
        engine thread's track, other threads' spans on theirs, device steps and idle gaps on
        the device's; the Amdahl summary under "otherData"."""
        us = lambda t: round((t - self.origin) * 1e6, 3)  # noqa: E731
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "host"}},
            {"name": "process_name", "ph": "M", "pid": 2, "tid": 0, "args": {"name": "device"}},
            {"name": "thread_name", "ph": "M", "pid": 2, "tid": 1, "args": {"name": "steps"}}]
        tids = {HOST_TRACK: 1}
        for phase, start, end in list(self.spans):
            events.append({"name": phase, "cat": "host", "ph": "X", "ts": us(start),
                           "dur": us(end) - us(start), "pid": 1, "tid": 1})
        for track, name, start, end, args in list(self.others):
            tid = tids.setdefault(track, len(tids) + 1)
            events.append({"name": name, "cat": "host", "ph": "X", "ts": us(start),
                           "dur": us(end) - us(start), "pid": 1, "tid": tid, "args": args})
        events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": n}}
                   for n, tid in tids.items()]
        busy, gaps = self._device_intervals()
        for start, end, step in busy:
            events.append({"name": f"step {step.step}", "cat": "device", "ph": "X",
                           "ts": us(start), "dur": us(end) - us(start), "pid": 2, "tid": 1,
                           "args": step.label})
        for start, end in gaps:
            events.append({"name": "idle (nothing queued)", "cat": "device", "ph": "X",
                           "ts": us(start), "dur": us(end) - us(start), "pid": 2, "tid": 1})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"amdahl": self.summary()}}

    def write_chrome_trace(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.chrome_trace()))
        return path


def _overlap(spans: list[tuple[float, float]], gaps: list[tuple[float, float]]) -> float:
    """Total time of `spans` inside `gaps` (both sorted by start; gaps do not overlap)."""
    total, j = 0.0, 0
    for s, e in spans:
        while j < len(gaps) and gaps[j][1] <= s:
            j += 1
        k = j
        while k < len(gaps) and gaps[k][0] < e:
            total += max(0.0, min(e, gaps[k][1]) - max(s, gaps[k][0]))
            k += 1
    return total


def format_amdahl(summary: dict[str, Any]) -> str:
    """The summary as a text table: per phase ms/step, exposed ms/step, share of wall time."""
    if not summary.get("steps"):
        return "no steps recorded"
    lines = [f"{'phase':<10} {'ms/step':>9} {'exposed':>9} {'share':>7}"]
    for name, row in summary["phases"].items():
        if name == "idle":
            continue
        lines.append(f"{name:<10} {row['ms_per_step']:>9.3f} {row['exposed_ms_per_step']:>9.3f} "
                     f"{100 * row['share']:>6.1f}%")
    lines.append(f"{summary['steps']} steps over {summary['busy_wall_s']:.3f} s busy "
                 f"({summary['idle_s']:.3f} s idle): device {summary['device_ms_per_step']:.3f} "
                 f"ms/step ({100 * summary['device_fraction']:.1f}%), host only "
                 f"{summary['host_only_ms_per_step']:.3f} ms/step "
                 f"({100 * summary['host_only_fraction']:.1f}%)")
    return "\n".join(lines)


class JaxProfileWindow:
    """A `jax.profiler` trace of a window of steps (TensorBoard / Perfetto read the result)."""

    def __init__(self, log_dir: Path, first_step: int, num_steps: int):
        if num_steps < 1:
            raise ValueError(f"the profiled window needs at least one step, got {num_steps}")
        self.log_dir, self.first, self.last = log_dir, first_step, first_step + num_steps - 1
        self.running = False
        self._lock = threading.Lock()

    def on_dispatch(self, step: int) -> None:
        """Step `step` was just dispatched: start before the window's first, stop once the
        step after its last is dispatched."""
        if step == self.first - 1:
            self.start()
        elif step == self.last + 1:
            self.stop()

    def start(self) -> None:
        import jax

        with self._lock:
            if not self.running:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                jax.profiler.start_trace(str(self.log_dir))
                self.running = True

    def stop(self) -> None:
        import jax

        with self._lock:
            if self.running:
                jax.profiler.stop_trace()
                self.running = False
