"""Replicated vs sequence-parallel sampling, side by side: the decode step's time and the bytes
its collectives move at each TP degree. The benchmark is `jaxserve.bench.sampling`; `--help`
lists the flags, with examples.
"""

from jaxserve.bench import sampling
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = sampling.parse_args()
    simulate_cpu_devices(args.devices)  # before jax is imported
    sampling.main(args)
