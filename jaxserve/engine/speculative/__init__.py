"""Speculative decoding, the host side: proposers that guess each decoding sequence's next tokens.

A proposer returns, per sequence, up to k proposed tokens; the scheduler fits them into the
step's budget, the step builder lays each sequence's last token and its proposals out as
consecutive one-token rows (every row reads the KV that the earlier rows of the step wrote, so
the rows of a sequence are causal), and the step program verifies them all on the device
(jaxserve/runtime/verify.py): greedy rows keep proposals equal to the target's argmax,
sampled rows accept by rejection sampling, so the tokens follow the target's distribution
exactly. Rejected proposals' KV is never committed: the sequence's length and blocks simply
end at the accepted path (Scheduler.update). Proposers: `ngram` (prompt lookup, ngram.py) and
`draft` (a smaller model of the same vocabulary, draft.py).

A proposer reads only token ids on the host and returns, for a batch of decoding sequences,
each one's proposals (`propose_all`); it hears when the target's step is dispatched
(`dispatched`: a draft on devices of its own proposes the next step's tokens beside it) and
what each sequence kept once the step is read back (`verified`); it says when it holds
nothing for any sequence (`idle`: an engine whose sequences all fell back then skips it
altogether and steps as the plain engine does); it never calls a model
directly (the draft proposer dispatches its runner's compiled programs). A draft on the
target's devices leaves its proposals there: the plan gets their number (`DeviceDrafts`), and
the proposer's `fill_step` lays them out as the verify step's inputs on the device.
"""

from __future__ import annotations

from jaxserve.engine.speculative.draft import DraftProposer
from jaxserve.engine.speculative.ngram import NgramProposer
from jaxserve.settings import SchedulerSettings, SpeculativeSettings


def make_proposer(settings: SpeculativeSettings | None, limits: SchedulerSettings,
                  draft_runner=None) -> NgramProposer | DraftProposer | None:
    """The proposer `settings` name (None: no speculation). draft_runner: the draft model's
    ModelRunner, for method 'draft' (LLM loads it)."""
    if settings is None:
        return None
    k = settings.num_speculative_tokens
    if settings.method == "ngram":
        return NgramProposer(k, settings.prompt_lookup_min, settings.prompt_lookup_max,
                             settings.token_tree)
    if settings.method == "draft":
        if draft_runner is None:
            raise ValueError(f"speculative method 'draft' needs the draft model "
                             f"{settings.model!r} loaded (LLM loads it)")
        return DraftProposer(draft_runner, limits, k, ahead=settings.mesh is not None)
    raise ValueError(f"speculative method {settings.method!r} is not supported; "
                     f"use 'ngram' or 'draft'")
