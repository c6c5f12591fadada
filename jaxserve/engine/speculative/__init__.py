"""Speculative decoding, the host side: proposers that guess each decoding sequence's next tokens.

A proposer returns, per sequence, up to k proposed tokens; the scheduler fits them into the
step's budget, the step builder lays each sequence's last token and its proposals out as
consecutive one-token rows (every row reads the KV that the earlier rows of the step wrote, so
the rows of a sequence are causal), and the step program verifies them all on the device
(jaxserve/runtime/verify.py): greedy rows keep proposals equal to the target's argmax,
sampled rows accept by rejection sampling, so the tokens follow the target's distribution
exactly. Rejected proposals' KV is never committed: the sequence's length and blocks simply
end at the accepted path (Scheduler.update).

A proposer reads only token ids on the host; it never calls a model directly.
"""

from __future__ import annotations

from jaxserve.engine.speculative.ngram import NgramProposer
from jaxserve.settings import SpeculativeSettings


def make_proposer(settings: SpeculativeSettings | None) -> NgramProposer | None:
    """The proposer `settings` name (None: no speculation)."""
    if settings is None:
        return None
    if settings.method == "ngram":
        return NgramProposer(settings.num_speculative_tokens, settings.prompt_lookup_min,
                             settings.prompt_lookup_max)
    raise ValueError(f"speculative method {settings.method!r} is not supported yet; "
                     f"use 'ngram'")
