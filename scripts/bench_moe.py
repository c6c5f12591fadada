"""MoE strategies side by side: dense vs alltoall vs allgather prefill throughput across tokens
per step, on simulated devices and on one; the crossover; decode at small batch
(`jaxserve.bench.moe`, --help).

    python scripts/bench_moe.py --json benchmarks/moe.json          # defaults (a few minutes)
    python scripts/bench_moe.py --quick                              # tiny sizes (seconds)
"""

from jaxserve.bench import moe
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = moe.parse_args()
    simulate_cpu_devices(args.devices, cpu_only=True)  # before jax is imported
    moe.main(args)
