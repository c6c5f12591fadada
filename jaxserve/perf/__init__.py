"""The analytical performance model: where a step's time goes on hardware we may not have.

For a model config, a mesh and rules, a precision per role and a workload, `jaxserve.perf`
predicts per-step prefill and decode time (each op the max of its FLOP time and its byte time,
plus the collectives the rules imply, plus the host's non-scalable term), KV capacity per
device, throughput, TTFT, TPOT and cost per million tokens; `plan` ranks layouts for a number of
devices. Model shapes come from our own config and rules (`shapes`, `jaxserve.rules`,
`jaxserve.placement.fit_to_layout`), FLOPs from `jaxserve.flops`: the model sizes what the engine
runs, never a copy of it.

Modules: `profiles` (hardware profiles, `hardware/*.yaml`), `shapes` (what a model holds),
`collectives` (ring and tree formulas), `step` (one step's time), `energy` (its joules), `workload`
(what users ask for), `serving` (a workload on one layout), `plan` (ranking layouts), `calibrate` (measuring
this machine). Nothing here imports jax except `calibrate`, which measures with it.
"""
