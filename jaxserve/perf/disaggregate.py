"""Colocated engines against prefill/decode splits, each role's precision chosen on its own.

`jaxserve plan --disaggregate`: every precision is tried for the colocated engines (one
precision for both stages) and for each role of a split, and every prefill precision is paired
with every decode precision (bf16 prefill with int8-KV decode, say). A split's handoff moves
each prompt's KV in the decode engine's KV format (the sender converts before it sends, so an
8-bit decode KV moves half the bytes of a 16-bit one) over the interconnect between the pools:
`link` when given (a bandwidth to try), else the profile's intra-host link when both pools fit
in one host and its inter-host link when not. The handoff adds to TTFT; it does not slow
either role's steps (the transfer overlaps the next prefill).
"""

from __future__ import annotations

from jaxserve.config import ModelConfig
from jaxserve.perf.plan import (SLO, Candidate, Plan, PlanError, _disaggregated, _roles,
                                engine_layouts, plan, precision_label, t_e_of)
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import Hardware, Link
from jaxserve.perf.step import Deployment
from jaxserve.perf.workload import Workload
from jaxserve.rules import ShardingError

# tried when no precisions are named: those of them whose products the hardware has
DEFAULT_PRECISIONS = ("bfloat16", "kv=float8", "weights=int8,kv=int8", "float8")


def interconnect(hardware: Hardware, gb_per_s: float) -> Link:
    """The link between the pools at `gb_per_s` GB/s per device, one direction (the profile's
    inter-host latency)."""
    if isinstance(gb_per_s, bool) or not isinstance(gb_per_s, (int, float)) or not gb_per_s > 0:
        raise PlanError(f"interconnect bandwidth must be a positive number of GB/s, "
                        f"got {gb_per_s!r}")
    return Link(gb_per_s * 1e9, hardware.inter_host.latency)


def role_precisions(hardware: Hardware, names: list[str] | None) -> list[Precision]:
    """The precisions to try: `names` (each one the hardware must compute in), else the
    defaults the hardware can compute in."""
    if not names:
        out = [Precision.parse(n) for n in DEFAULT_PRECISIONS]
        out = [p for p in out if p.compute in hardware.peak_flops]
        if not out:
            raise PlanError(f"hardware {hardware.name!r} computes in none of the default "
                            f"precisions {', '.join(DEFAULT_PRECISIONS)}: name some")
        return out
    out = []
    for name in names:
        p = Precision.parse(name)
        if p.compute not in hardware.peak_flops:
            raise PlanError(f"precision {name!r}: hardware {hardware.name!r} has no {p.compute} "
                            f"products (it has {', '.join(hardware.peak_flops)})")
        if p not in out:
            out.append(p)
    return out


def plan_disaggregated(config: ModelConfig, devices: int, hardware: Hardware,
                       workload: Workload, precisions: list[str] | None = None,
                       slo: SLO | None = None, link: Link | None = None,
                       model_name: str = "model") -> Plan:
    """Every colocated layout in each precision and every prefill/decode split in each pair of
    role precisions, ranked as `plan` ranks (SLO met first, then output tokens per second),
    then by TPOT and TTFT."""
    roles = role_precisions(hardware, precisions)
    slo = slo or SLO()
    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    sides = {}
    for p in roles:
        colocated = plan(config, devices, hardware, workload, p, p, slo, disaggregated=False,
                         model_name=model_name)
        for c in colocated.candidates:
            c.prefill_precision = c.decode_precision = precision_label(p)
        candidates += colocated.candidates
        skipped.update({f"{k} [{precision_label(p)}]": v for k, v in colocated.skipped.items()})
        sides[p] = ([], [])
        for _, _, mesh, rules in engine_layouts(config, devices) if devices > 1 else []:
            try:
                d = Deployment(config, mesh, rules, hardware, p)
            except ShardingError:
                continue  # named in `skipped` by the colocated plan
            _roles(config, mesh, rules, hardware, p, p, workload, d, *sides[p])
    for p in roles:
        for q in roles:
            candidates += _disaggregated(sides[p][0], sides[q][1], devices, hardware, workload,
                                         slo, link)
    # ties in throughput (a role's precision that is not the bottleneck): lower latency first
    candidates.sort(key=lambda c: (not c.meets_slo, -c.output_tokens_per_s, c.tpot_s,
                                   c.ttft_s))
    t_e, by_tp = t_e_of(candidates)
    return Plan(model_name, devices, hardware, workload, roles[0], roles[0], slo, candidates,
                skipped, t_e, by_tp, role_precisions=roles)

