"""Validate the performance model on this machine: predicted next to measured, in one run
(`jaxserve.bench.validate_perf`, --help).

    python scripts/validate_perf.py --calibrate jaxserve/perf/hardware/cpu-local.yaml \
        --json benchmarks/validate_perf-cpu.json
    python scripts/validate_perf.py --profile /tmp/cpu.yaml        # an existing profile
"""

from jaxserve.bench import validate_perf
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    simulate_cpu_devices(2, cpu_only=True)  # for the mesh cases; before jax is imported
    validate_perf.main()
