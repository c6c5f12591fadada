"""The step timeline: host phases tile the run's wall-clock time, the device's busy time and idle
gaps follow from non-blocking polls, the Amdahl table adds up, and the Chrome trace is valid
trace-event JSON (from the API and from `jaxserve generate --profile-out`)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine.timeline import Timeline, format_amdahl

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Probe:
    """Stands in for a step's output array."""

    def __init__(self):
        self.ready = False

    def is_ready(self):
        return self.ready


def run_two_steps(timeline, clock):
    """other 0-1, schedule 1-2, build 2-3, dispatch 3-4 (step 1 queued at 4), wait 4-6 (done),
    readback 6-7, process 7-9, other 9-10, schedule 10-11, build 11-12, dispatch 12-13 (step 2
    queued at 13), wait 13-14 (done), readback 14-15, process 15-16."""
    probes = [Probe(), Probe()]
    laps = [(1, "other"), (2, "schedule"), (3, "build"), (4, "dispatch"), "queue", "ready",
            (6, "wait"), (7, "readback"), (9, "process"), (10, "other"), (11, "schedule"),
            (12, "build"), (13, "dispatch"), "queue", "ready", (14, "wait"), (15, "readback"),
            (16, "process")]
    queued = ready = 0
    for lap in laps:
        if lap == "queue":
            timeline.dispatched(probes[queued], decode_rows=1)
            queued += 1
        elif lap == "ready":
            probes[ready].ready = True
            ready += 1
        else:
            clock.now = lap[0]
            timeline.lap(lap[1])


def test_device_time_and_idle_gaps_come_from_polls_at_phase_boundaries():
    clock = FakeClock()
    timeline = Timeline(clock=clock)
    run_two_steps(timeline, clock)
    s = timeline.summary()
    assert s["steps"] == 2 and s["wall_s"] == 16 and s["busy_wall_s"] == 16
    assert s["device_s"] == 3  # [4, 6] and [13, 14]
    assert s["host_only_s"] == 13 and s["host_only_fraction"] == pytest.approx(13 / 16)
    phases = s["phases"]
    assert sum(row["seconds"] for row in phases.values()) == 16
    # the device had nothing queued over [0, 4], [6, 13] and [14, 16]
    assert phases["wait"]["exposed_s"] == 0
    assert phases["process"]["seconds"] == 3 and phases["process"]["exposed_s"] == 3
    assert phases["dispatch"]["exposed_s"] == 2
    assert "host only" in format_amdahl(s)


def test_a_step_finishing_inside_a_long_phase_is_seen_at_its_end():
    clock = FakeClock()
    timeline = Timeline(clock=clock)
    probe = Probe()
    clock.now = 1
    timeline.lap("dispatch")
    timeline.dispatched(probe)
    probe.ready = True  # done at some time in [1, 5]: seen at the next lap
    clock.now = 5
    timeline.lap("process")
    assert timeline.summary()["device_s"] == 4


def test_idle_time_is_left_out_of_the_amdahl_table():
    clock = FakeClock()
    timeline = Timeline(clock=clock)
    clock.now = 100
    timeline.lap("idle")  # a server with nothing to do
    run_two_steps(timeline, FakeClockFrom(clock, 100))
    s = timeline.summary()
    assert s["idle_s"] == 100 and s["busy_wall_s"] == 16 and s["device_s"] == 3


class FakeClockFrom:
    """Sets `clock` to base + t."""

    def __init__(self, clock, base):
        self.clock, self.base = clock, base

    @property
    def now(self):
        return self.clock.now - self.base

    @now.setter
    def now(self, t):
        self.clock.now = self.base + t


def test_the_ring_keeps_the_latest_steps():
    clock = FakeClock()
    timeline = Timeline(capacity=8, clock=clock)
    for i in range(1, 50):
        clock.now = i
        timeline.lap("schedule")
    assert len(timeline.spans) == 8 and timeline.totals["schedule"] == 49


def run_six_second_steps(timeline, clock, count, start=0.0):
    """`count` steps of schedule 1 s, dispatch 1 s (queued at its end), wait 3 s (seen done at
    its end), process 1 s: four spans and 6 s a step, the device busy 3 s of them."""
    t = start
    for _ in range(count):
        probe = Probe()
        for seconds, phase in ((1, "schedule"), (1, "dispatch"), (3, "wait"), (1, "process")):
            if phase == "wait":
                probe.ready = True
            t += seconds
            clock.now = t
            timeline.lap(phase)
            if phase == "dispatch":
                timeline.dispatched(probe)
    return t


def test_a_wrapped_ring_divides_the_windows_seconds_by_the_windows_steps():
    """10 steps into a ring of 8 spans (and 8 device steps): the window is the last 2 steps,
    [48, 60] s. By hand: 2 steps dispatched at 50 and 56, busy [50, 53] and [56, 59], so device
    3000 ms/step, host only 3000 ms/step, schedule 1000 ms/step, wait 3000 ms/step, exposed
    schedule/dispatch/process 1000 ms/step each (nothing queued over [48, 50], [53, 56],
    [59, 60]). The summary before this test divided the window's seconds by the 8 steps the
    device ring kept: 250 ms/step of schedule; it fails there."""
    clock = FakeClock()
    timeline = Timeline(capacity=8, clock=clock)
    run_six_second_steps(timeline, clock, 10)
    s = timeline.summary()
    assert s["steps"] == 2 and s["wall_s"] == 12 and s["busy_wall_s"] == 12
    assert s["device_s"] == 6 and s["host_only_s"] == 6
    assert s["device_ms_per_step"] == 3000 and s["host_only_ms_per_step"] == 3000
    phases = s["phases"]
    assert {name: row["ms_per_step"] for name, row in phases.items()} == {
        "schedule": 1000, "dispatch": 1000, "wait": 3000, "process": 1000}
    assert {name: row["exposed_ms_per_step"] for name, row in phases.items()} == {
        "schedule": 1000, "dispatch": 1000, "wait": 0, "process": 1000}


def test_a_serving_loops_idle_stretch_keeps_the_steps_in_the_ring():
    """3 steps (18 s), then the serve loop waiting for requests: 1000 times `other` (0.5 s,
    its bookkeeping) and `idle` (0.5 s, the wait). The stretch is one idle span after one
    `other`, so a ring of 16 spans still holds the steps' 12: by hand, 3 steps, schedule
    1000 ms/step, idle 999.5 s (the `other` laps between idle ones are part of it), busy wall
    18.5 s. The timeline before this
    test kept a span per lap (2000 for the stretch), leaving no step in the ring; it fails
    there."""
    clock = FakeClock()
    timeline = Timeline(capacity=16, clock=clock)
    t = run_six_second_steps(timeline, clock, 3)
    for _ in range(1000):
        for phase in ("other", "idle"):
            t += 0.5
            clock.now = t
            timeline.lap(phase)
    s = timeline.summary()
    assert s["steps"] == 3 and s["idle_s"] == pytest.approx(999.5)
    assert s["busy_wall_s"] == pytest.approx(18.5) and s["device_s"] == 9
    assert s["phases"]["schedule"]["ms_per_step"] == 1000
    # the first `other` after the steps is the caller's work, the rest of the stretch idle
    assert s["phases"]["other"]["seconds"] == 0.5 and len(timeline.spans) == 14
    assert timeline.totals["idle"] == pytest.approx(999.5)
    assert timeline.totals["other"] == pytest.approx(0.5)

def assert_trace_events(trace):
    trace = json.loads(json.dumps(trace))  # plain JSON, nothing Python-only
    events = trace["traceEvents"]
    assert events and trace["displayTimeUnit"] == "ms"
    for e in events:
        assert {"name", "ph", "pid", "tid"} <= set(e)
        assert e["ph"] in ("X", "M")
        if e["ph"] == "X":
            assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0
    return events


@pytest.fixture(scope="module")
def llm(hf_model_dir):
    return LLM(hf_model_dir("llama")[1], max_model_len=128, block_size=8, max_num_seqs=8,
               max_num_batched_tokens=64)


def test_the_phases_add_up_to_the_wall_clock_time_of_a_run(llm):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, size=n).tolist() for n in (5, 40, 12, 70)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # compile outside the measured run
    steps_before = llm.engine.counters["steps"]
    llm.engine.timeline.reset()
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    s = llm.stats()["timeline"]
    assert s["steps"] == llm.engine.counters["steps"] - steps_before
    assert sum(row["seconds"] for row in s["phases"].values()) == pytest.approx(s["wall_s"])
    # not covered: validating the prompts before the first lap, building outputs after the last
    assert s["busy_wall_s"] == pytest.approx(wall, rel=0.05, abs=0.02)
    assert s["device_s"] + s["host_only_s"] == pytest.approx(s["busy_wall_s"])
    assert 0 < s["device_fraction"] <= 1
    events = assert_trace_events(llm.engine.timeline.chrome_trace())
    device_steps = [e for e in events if e["pid"] == 2 and e["name"].startswith("step ")]
    assert len(device_steps) == s["steps"]


def test_generate_writes_a_chrome_trace_and_a_jax_profile(tmp_path):
    trace, profile = tmp_path / "steps.json", tmp_path / "jax-profile"
    result = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli", "generate", "--prompt", "def main():",
         "--max-tokens", "12", "--temperature", "0", "--profile-out", str(trace),
         "--jax-profile", str(profile), "--jax-profile-steps", "2:3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "host only" in result.stderr
    events = assert_trace_events(json.loads(trace.read_text()))
    assert {e["name"] for e in events} >= {"schedule", "build", "dispatch", "wait", "process"}
    assert list(profile.rglob("*.xplane.pb"))


def test_a_bad_profile_window_is_refused_by_name():
    result = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli", "generate", "--prompt", "x",
         "--jax-profile", "/tmp/unused", "--jax-profile-steps", "ten"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "'ten'" in result.stderr
