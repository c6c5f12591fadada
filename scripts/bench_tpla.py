"""TPLA against exact MLA: logit error, perplexity, greedy agreement, KV bytes per device and
decode step time against context, with no transform, Hadamard and PCA. The benchmark is
`jaxserve.bench.tpla`; `--help` lists the flags.
"""

from jaxserve.bench import tpla
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = tpla.parse_args()
    simulate_cpu_devices(max(args.tp), cpu_only=True)  # before jax is imported
    tpla.main(args)
