"""Prefix caching benchmark: a shared-prefix workload with and without the prefix cache, and
prefix-aware against round-robin routing over two DP replicas. The benchmark is
`jaxserve.bench.prefix`; `--help` lists the flags, with examples.
"""

from jaxserve.bench import prefix
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    # two simulated CPU devices for the routing part (one device runs the caching part, which
    # the second does not slow down)
    simulate_cpu_devices(2)
    prefix.main()
