"""Simulated CPU devices for a benchmark: XLA reads the device count once, when jax starts, so
this runs before anything imports jax. Never imports jax itself."""

from __future__ import annotations

import os
import sys

COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulate_cpu_devices(count: int, cpu_only: bool = False) -> None:
    """Ask XLA for `count` host devices, unless a count was given already (XLA_FLAGS) or jax
    is already running (too late to change). cpu_only: run on the CPU even where an
    accelerator exists (JAX_PLATFORMS, unless set)."""
    if cpu_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules or COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {COUNT_FLAG}={count}").strip()
