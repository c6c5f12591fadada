"""Replicated vs sequence-parallel sampling, side by side: the decode step's time and the bytes
its collectives move at each TP degree (`jaxserve.bench.sampling`, --help).

    python scripts/bench_sampling.py --json benchmarks/sampling.json     # tp = 1, 2, 4, 8
    python scripts/bench_sampling.py --degrees 1,2 --batch 8 --repeats 1  # quick
"""

from jaxserve.bench import sampling
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = sampling.parse_args()
    simulate_cpu_devices(args.devices)  # before jax is imported
    sampling.main(args)
