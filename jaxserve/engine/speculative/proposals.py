"""What a proposer hands the step: proposed tokens, and for sampled drafts their distribution q.

A proposer that samples (its class says `samples = True`) draws the proposals of a request that
samples (temperature > 0) from its own distribution q, processed with the request's
SamplingParams exactly as the target's p is (penalties counting the request's outputs and the
round's earlier proposals, temperature, top_k / top_p / min_p), and hands q of each proposal to
the verify step, which accepts with min(1, p / q) and draws a rejection from the residual
(jaxserve/runtime/verify.py). Greedy proposals are point masses: the target keeps a proposal iff
it is the token it draws there, so greedy requests keep exactly their greedy tokens and seeded
ones their plain tokens. The draft model (draft.py) samples a sampling request's proposals
inside its one-program round (jaxserve/runtime/draft_runner.py) and hands q with them.

The draft's random numbers must be independent of the target's: each proposal round draws with
a seed derived from the request's seed and the number of its outputs at the round (`round_seed`),
so a seeded request's proposals, like its tokens, do not depend on the batch, and a round's
numbers decide emitted tokens at most once (every verified round emits at least one token, so
the count only grows). This module is host only: numpy, no device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0)
_MASK64 = (1 << 64) - 1


@dataclasses.dataclass
class Proposals:
    # Sequence -> list[int]: its proposals, in order (or DeviceDrafts: how many, on the device)
    tokens: dict
    # Sequence -> f32[len(tokens), vocab_rows]: q of each sampled proposal (absent: point masses)
    probs: dict = dataclasses.field(default_factory=dict)
    # Sequence -> a token tree's other branches, each a list of tokens after the last one
    branches: dict = dataclasses.field(default_factory=dict)


def draft_params(params: SamplingParams) -> SamplingParams:
    """What the draft samples a request's proposals with: the request's distribution settings
    (greedy stays greedy), without what only the target's outputs use (logprobs, stops)."""
    if params.temperature == 0:
        return GREEDY
    return SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                          min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                          presence_penalty=params.presence_penalty,
                          frequency_penalty=params.frequency_penalty)


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints that scatters nearby inputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def round_seed(seed: int, num_outputs: int) -> int:
    """The seed a draft draws one round's proposals with, in [0, 2**63)."""
    return _mix(_mix(seed ^ 0x5DEECE66D) ^ num_outputs) >> 1


def penalty_rows(slots: list[int], prompts: list[list[int]], outputs: list[list[int]],
                 num_rows: int, trash_slot: int, vocab_rows: int):
    """The draft's slot state for sequences whose proposals use penalties, as
    `ModelRunner.set_slots` takes it: the target's prompt mask and output counts (the round's
    program adds its own proposals), padded to `num_rows` rows naming the trash slot."""
    rows = np.full((num_rows,), trash_slot, np.int32)
    mask = np.zeros((num_rows, vocab_rows), np.bool_)
    counts = np.zeros((num_rows, vocab_rows), np.int32)
    for i, (slot, prompt, out) in enumerate(zip(slots, prompts, outputs)):
        rows[i] = slot
        mask[i, prompt] = True
        np.add.at(counts[i], out, 1)
    return rows, mask, counts
