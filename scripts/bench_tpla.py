"""TPLA against exact MLA: logit error, perplexity, greedy agreement, KV bytes per device and
decode step time against context, with no transform, Hadamard and PCA (`--part accuracy`, the
benchmark `jaxserve.bench.tpla`); or the bare decode step and KV bytes per device at long
contexts, GQA vs MLA vs TPLA (`--part contexts`, `jaxserve.bench.tpla_contexts`). `--help`
lists the flags.
"""

from jaxserve.bench import tpla
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    args = tpla.parse_args()
    simulate_cpu_devices(max(args.tp), cpu_only=True)  # before jax is imported
    if args.part == "contexts":
        from jaxserve.bench import tpla_contexts
        tpla_contexts.main(args)
    else:
        tpla.main(args)
