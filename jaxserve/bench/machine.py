"""What machine a benchmark ran on, and how loaded it was: the facts every result file
carries (CPU model, versions, the commit), the CPU time other processes took while a part ran,
and the gate that waits for a quiet machine before a run whose peer collapses under load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# the checkout this package was imported from (its git commit goes into the results)
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return names[0] if names else None
    except OSError:
        return None


def usable_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def machine_info() -> dict:
    """This process's machine and the jax it runs (imports jax)."""
    import jax
    import jaxlib
    import numpy as np

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": usable_cpus() or os.cpu_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "XLA_FLAGS": os.environ.get("XLA_FLAGS")}
    for mod in ("flax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(SOURCE_ROOT), *a],  # noqa: E731
                                        capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = run("rev-parse", "HEAD") or None
        info["jaxserve_dirty"] = bool(run("status", "--porcelain", "--", "jaxserve"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def cpu_line(info: dict) -> str:
    """The run's first words about its machine, from `machine_info()`."""
    return f"CPU: {info['cpu_model']} ({info['cpus_usable']} usable), jax {info['jax']}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def client_machine_info() -> dict:
    """A load generator's machine, without importing jax (the server runs elsewhere)."""
    info = {"hostname": platform.node(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": usable_cpus()}
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["mem_total_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info["versions"] = {d: _version(d) for d in ("jaxserve", "jax", "jaxlib", "grpcio",
                                                 "protobuf", "numpy")}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True,
                             text=True, timeout=5)
        info["git_commit"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


class CpuWatch:
    """CPU time used by OTHER processes while a part runs: the usable CPUs' busy time in
    /proc/stat minus this process's own CPU time, in cores (0 = nothing else ran)."""

    def __init__(self):
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.clk = os.sysconf("SC_CLK_TCK")

    def _sample(self):
        busy = steal = 0
        try:
            with open("/proc/stat") as f:
                for line in f:
                    name, *vals = line.split()
                    if not name.startswith("cpu") or name == "cpu":
                        continue
                    if self.cpus is not None and int(name[3:]) not in self.cpus:
                        continue
                    v = [int(x) for x in vals]  # user nice system idle iowait irq softirq steal
                    busy += v[0] + v[1] + v[2] + v[5] + v[6]
                    steal += v[7] if len(v) > 7 else 0
        except (OSError, ValueError):
            return None
        t = os.times()  # this process and the children it waited for (a launched server)
        return (time.perf_counter(), busy / self.clk, steal / self.clk,
                t.user + t.system + t.children_user + t.children_system)

    def __enter__(self):
        self.start, self.result = self._sample(), None
        return self

    def __exit__(self, *exc):
        end = self._sample()
        if self.start is not None and end is not None and end[0] > self.start[0]:
            dt = end[0] - self.start[0]
            others = ((end[1] - self.start[1]) - (end[3] - self.start[3])) / dt
            self.result = {"others_cores": max(others, 0.0),
                           "steal_cores": (end[2] - self.start[2]) / dt,
                           "self_cores": (end[3] - self.start[3]) / dt, "seconds": dt,
                           "loadavg_end": os.getloadavg()}


def load_gate(max_load: float, load_wait: float, force: bool) -> dict:
    """Wait for a quiet machine; refuse a loaded one unless `force` (then flag the results)."""
    waited = 0.0
    load = os.getloadavg()[0]
    while load > max_load and waited < load_wait:
        print(f"load average {load:.2f} > --max-load {max_load}: waiting "
              f"({waited:.0f}/{load_wait:.0f} s)", flush=True)
        time.sleep(10)
        waited += 10
        load = os.getloadavg()[0]
    loaded = load > max_load
    if loaded and not force:
        sys.exit(f"refusing to run: 1-minute load average {load:.2f} > {max_load} (other "
                 "work would distort HF's numbers; wait for a quiet machine or pass --force to "
                 "run with the results flagged LOADED)")
    if loaded:
        print(f"WARNING: load average {load:.2f} > {max_load}; running anyway (--force), "
              "results flagged LOADED", file=sys.stderr, flush=True)
    return {"loadavg_start": os.getloadavg(), "max_load": max_load, "waited_s": waited,
            "loaded_at_start": loaded}


def wait_for_quiet(max_load: float, limit: float) -> dict:
    """Wait (up to `limit` s) while the load average is above `max_load`; never refuse."""
    waited = 0.0
    while os.getloadavg()[0] > max_load and waited < limit:
        time.sleep(10)
        waited += 10
    return {"loadavg_start": os.getloadavg(), "waited_s": waited,
            "loaded": os.getloadavg()[0] > max_load}
