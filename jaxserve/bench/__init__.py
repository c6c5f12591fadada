"""Measuring jaxserve: the benchmarks, their workloads, the peers they compare against, and
the floors the machine allows.

What scripts/, the notebooks and the tests import. Each file of scripts/ is a thin command
over one benchmark here; a benchmark's argument parser lives beside it (`parse_args`, `main(argv)`)
so tests and notebooks run it with the same flags a user types. Modules:

  devices      simulated CPU devices, set before jax is imported
  machine      what machine this is and how loaded: CpuWatch, the load gate, machine facts
  timing       best-of / median statistics and the engine's readback loop
  floors       read bandwidth, matmul peaks, the decode step's bytes and FLOPs, the bare
               matmul stack: what the hardware allows
  workloads    random prompts, the mixed and shared-prefix workloads
  models       random models for benchmarks (HF transformers copies and jaxserve-only ones)
  hf_models    tiny random HF reference models of every family (parity checks and tests)
  peers        other engines run on the same workload: HF transformers, llama.cpp
               (llama-batched-bench on GGUF copies of the same weights)
  formats      precision formats by name, as settings overrides on the float32 baseline
  steps        the engine's own decode step driven from outside; probes on the engine loop
  runs         an `LLM` loaded and run as a user gets it, timed
  report       tables, number formatting and JSON writing
  plots        figures (matplotlib, imported when a plot is drawn)
  hlo          what a compiled program's collectives move, read from its HLO text
  accuracy     each precision format against float32: logit error, greedy agreement,
               perplexity on held-out sources
  offline, offline_parts, offline_precision, serving, serving_metrics, serving_client,
  tp_sweep, sampling, moe, prefix, validate_perf, validate_published, fit_published,
  gpu_check: one benchmark each (`main(argv)`)
  training     the recipe that trains the embedded tiny checkpoint

Layering: this package may import the API, the engine and everything below them; nothing in
jaxserve outside it imports `jaxserve.bench`. Importing it, or any benchmark module here,
imports no jax, torch, transformers or matplotlib: the functions that need them import them,
so a benchmark can still set XLA_FLAGS after its arguments are parsed, and the base install is
enough to import the package. (`training` is jax code throughout and imports jax; nothing
chooses devices before a training run.)
"""
