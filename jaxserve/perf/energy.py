"""Energy of a step and per output token: joules on compute, device memory and interconnect.

    compute       FLOPs x joules per FLOP of the product's dtype
    memory        bytes read and written in device memory (weights, KV pages) x joules per byte
    interconnect  bytes each device sends in the step's collectives x joules per byte of the
                  link they cross (`collectives.traffic`)

for every device of a replica. The per-FLOP and per-byte figures are the profile's `energy`
block, each cited in its `sources`; a profile without one has no energy figures. Not counted:
the host, idle and static (leakage) power, cooling. Nothing here is measured, and no CPU run
can check it: it is the traffic the model already counts, priced in joules.
"""

from __future__ import annotations

import dataclasses

from jaxserve.perf import collectives
from jaxserve.perf.serving import Operating
from jaxserve.perf.step import Deployment, StepTime


@dataclasses.dataclass(frozen=True)
class Joules:
    compute: float
    memory: float
    interconnect: float

    @property
    def total(self) -> float:
        return self.compute + self.memory + self.interconnect

    def scaled(self, k: float) -> Joules:
        return Joules(self.compute * k, self.memory * k, self.interconnect * k)

    def __add__(self, other: Joules) -> Joules:
        return Joules(self.compute + other.compute, self.memory + other.memory,
                      self.interconnect + other.interconnect)

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "total": self.total}


def step_joules(d: Deployment, step: StepTime) -> Joules | None:
    """What one replica's devices spend on `step`; None without energy figures."""
    e = d.hardware.energy
    if e is None:
        return None
    intra = inter = 0.0
    for c in step.collectives:
        sent_intra, sent_inter = collectives.traffic(c.kind, c.nbytes, c.group, d.hardware)
        intra, inter = intra + sent_intra * c.calls, inter + sent_inter * c.calls
    devices = d.devices_per_replica
    return Joules(step.flops * e.per_flop[d.precision.compute] * devices,
                  step.bytes * e.per_memory_byte * devices,
                  (intra * e.per_intra_host_byte + inter * e.per_inter_host_byte) * devices)


def per_output_token(d: Deployment, op: Operating) -> Joules | None:
    """An engine at its operating point: its step (all replicas) over the output tokens the
    step yields. A colocated step carries its share of prefill chunks, so they are in it."""
    j = step_joules(d, op.step)
    tokens_per_step = op.output_tokens_per_s * op.step.total_s
    if j is None or tokens_per_step <= 0:
        return None
    return j.scaled(d.replicas / tokens_per_step)


def prefill_per_request(d: Deployment, op: Operating) -> Joules | None:
    """A prefill-only engine: its step (all replicas) over the prompts the step finishes."""
    j = step_joules(d, op.step)
    requests_per_step = op.requests_per_s * op.step.total_s
    if j is None or requests_per_step <= 0:
        return None
    return j.scaled(d.replicas / requests_per_step)
