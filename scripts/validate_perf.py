"""Validate the performance model on this machine: predicted next to measured, in one run. The
benchmark is `jaxserve.bench.validate_perf`; `--help` lists the flags, with examples.
"""

from jaxserve.bench import validate_perf
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    simulate_cpu_devices(2, cpu_only=True)  # for the mesh cases; before jax is imported
    validate_perf.main()
