"""Prefix caching benchmark: a shared-prefix workload with and without the prefix cache, and
prefix-aware against round-robin routing over two DP replicas (`jaxserve.bench.prefix`, --help).

    python scripts/bench_prefix.py --json benchmarks/bench_prefix-DATE-cpu.json   # ~6 minutes
    python scripts/bench_prefix.py --requests 256                 # twice the requests (~11 min)
    python scripts/bench_prefix.py --quick                        # a small workload (~1.5 min)
"""

from jaxserve.bench import prefix
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    # two simulated CPU devices for the routing part (one device runs the caching part, which
    # the second does not slow down)
    simulate_cpu_devices(2)
    prefix.main()
