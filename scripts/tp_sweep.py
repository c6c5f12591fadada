"""The TP-degree sweep: every split of G devices into r replicas x t-way tensor parallelism on
the same workload; Amdahl's p and the best degree t_e. The benchmark is `jaxserve.bench.tp_sweep`;
`--help` lists the flags, with examples.
"""

from jaxserve.bench import tp_sweep
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = tp_sweep.parse_args()
    simulate_cpu_devices(args.devices)  # before jax is imported
    tp_sweep.main(args)
