"""MoE strategies side by side: dense vs alltoall vs allgather prefill throughput across tokens
per step, the crossover, decode at small batch. The benchmark is `jaxserve.bench.moe`; `--help`
lists the flags, with examples.
"""

from jaxserve.bench import moe
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = moe.parse_args()
    simulate_cpu_devices(args.devices, cpu_only=True)  # before jax is imported
    moe.main(args)
