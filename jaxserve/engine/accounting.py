"""FLOPs accounting: per step, what the math needed next to what the compiled program executed.

*True* FLOPs come from `jaxserve.flops` over the step's real work: each decode token and prefill
chunk at its real position (attention over its real context, the experts it really used), the
LM head only where a token is sampled. *Executed* FLOPs are XLA's own count of the compiled
program for the step's shape (`cost_analysis()`, per device, times the devices), plus the
iterations of fixed-count loops it counts once (`jaxserve.ops.cost`): padding to the shape
bucket, padded sample rows, the dense MoE strategy, all-to-all capacity slack and grouped
matmuls that a platform lowers densely all show up there. A loop whose trip count depends on the
data (attention's context chunks) counts once, so executed attention is a lower bound.
The ratio true / executed is how much of the device's work was useful; true FLOPs over the
wall-clock time of the loop, against a peak the user gives, is model-FLOPs utilisation.
"""

from __future__ import annotations

import collections
from typing import Any

from jaxserve import flops
from jaxserve.config import ModelConfig

RECENT_STEPS = 1024


def step_true_flops(config: ModelConfig, plan) -> int:
    """FLOPs a planned step needs (call before the plan is committed: positions as planned)."""
    def run(seq) -> int:  # a decode and its proposals (speculative): a logits row each
        tokens = 1 + len(plan.drafts.get(seq, ()))
        return flops.chunk_flops(config, seq.total_len - 1, seq.total_len - 1 + tokens, tokens)

    total = sum(run(seq) for seq in plan.decodes)
    return total + sum(flops.chunk_flops(config, c.start, c.start + c.length,
                                         int(c.samples) + len(c.forks))  # a row per sampler
                       for c in plan.prefills)


class FlopsAccount:
    def __init__(self, config: ModelConfig, runner):
        self.config = config
        self.runner = runner
        self.true_flops = 0
        self.executed_flops = 0
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=RECENT_STEPS)

    def record(self, plan, inputs) -> None:
        self.add(step_true_flops(self.config, plan), self.runner.program_flops(inputs))

    def record_chunks(self, chunks: list[tuple[int, int, int]], inputs, kind: str) -> None:
        """A step of prefill chunks run by another program (`kind`, e.g. scoring): each chunk
        (first position, tokens, logit rows read)."""
        true = sum(flops.chunk_flops(self.config, start, start + n, rows)
                   for start, n, rows in chunks)
        self.add(true, self.runner.program_flops(inputs, kind))

    def add(self, true: int, executed: int) -> None:
        self.true_flops += true
        self.executed_flops += executed
        self.recent.append((true, executed))

    def stats(self, busy_s: float, peak_flops: float | None = None) -> dict[str, Any]:
        """`peak_flops`: one device's peak FLOP/s (for model-FLOPs utilisation)."""
        out: dict[str, Any] = {
            "true_flops": self.true_flops, "executed_flops": self.executed_flops,
            "useful_fraction": (round(self.true_flops / self.executed_flops, 4)
                                if self.executed_flops else None)}
        if peak_flops is not None:
            if not isinstance(peak_flops, (int, float)) or peak_flops <= 0:
                raise ValueError(f"peak_flops must be a positive number (FLOP/s of one device), "
                                 f"got {peak_flops!r}")
            devices = self.runner.layout.num_devices
            out["mfu"] = (self.true_flops / (busy_s * peak_flops * devices)) if busy_s else None
        return out
