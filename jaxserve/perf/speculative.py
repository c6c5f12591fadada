"""Speculative decoding in the performance model: acceptance rate in, tokens per step and step
time out.

Each decoding sequence verifies k proposals per step, each kept with probability `acceptance`
(independently, as Leviathan et al. model it), so a step gains

    tau = (1 - a^(k+1)) / (1 - a)          tokens per sequence (k + 1 when a = 1)

and runs k + 1 tokens per sequence through the target (the verify step). A draft model costs k
decode steps of its own per round, after the verify (synchronous, on the target's devices) or
beside it (`asynchronous`: the draft on devices of its own, SwiftSpec's pipeline, off the critical
path unless it is the slower of the two). Prompt lookup has no draft (`draft=None`). The engine's
step time is then that of one round; TPOT = round time / tau. Device-free, like all of perf/.
"""

from __future__ import annotations

import dataclasses

from jaxserve.perf.step import Chunk, Deployment, decode_chunk


@dataclasses.dataclass(frozen=True)
class Speculation:
    acceptance: float  # probability that a proposal is kept
    num_speculative_tokens: int  # k
    draft: Deployment | None = None  # None: proposals cost nothing (prompt lookup)
    asynchronous: bool = False  # the draft runs beside the verify, on devices of its own

    def __post_init__(self):
        a, k = self.acceptance, self.num_speculative_tokens
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ValueError(f"acceptance must be a number in [0, 1], got {a!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_speculative_tokens must be a positive integer, got {k!r}")

    @property
    def tokens_per_step(self) -> float:
        a, k = self.acceptance, self.num_speculative_tokens
        return k + 1.0 if a == 1 else (1 - a ** (k + 1)) / (1 - a)

    def verify_chunks(self, context: float, batch: float) -> list[Chunk]:
        """The target's part of a round: every sequence runs its last token and k proposals."""
        context = int(round(context))
        return [Chunk(context, context + self.num_speculative_tokens + 1, batch)]

    def draft_s(self, context: float, batch: float) -> float:
        """The draft's part of a round: k decode steps at the batch."""
        if self.draft is None:
            return 0.0
        return self.num_speculative_tokens * self.draft.step([decode_chunk(context, batch)]).total_s

    def round_s(self, verify_s: float, context: float, batch: float) -> float:
        draft = self.draft_s(context, batch)
        return max(verify_s, draft) if self.asynchronous else verify_s + draft
