"""The TP-degree sweep: every split of G devices into r replicas x t-way tensor parallelism on
the same workload; Amdahl's p and the best degree t_e (`jaxserve.bench.tp_sweep`, --help).

    python scripts/tp_sweep.py --devices 8 --csv sweep.csv --png sweep.png
    python scripts/tp_sweep.py --devices 8 --sampling sequence_parallel,replicated --json s.json
    python scripts/tp_sweep.py --devices 4 --model checkpoints/my-model --device-memory-mib 40000
    python scripts/tp_sweep.py --devices 8 --quick          # tiny model and workload (seconds)
"""

from jaxserve.bench import tp_sweep
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = tp_sweep.parse_args()
    simulate_cpu_devices(args.devices)  # before jax is imported
    tp_sweep.main(args)
