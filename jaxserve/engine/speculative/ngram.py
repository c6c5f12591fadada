"""Prompt lookup (n-gram) proposals: what followed the last n tokens the last time they occurred.

For n from `max_n` down to `min_n`, the sequence's last n tokens (prompt and outputs) are looked
for earlier in the same tokens; at the latest earlier match, the up to k tokens that followed
are proposed. Nothing matches: no proposal (the step decodes one token as without speculation).
With a token tree, the continuations of several earlier occurrences fill its branches.
Host only, numpy over the sequence's ids; the draft distribution is a point mass on each
proposed token (jaxserve/runtime/verify.py).
"""

from __future__ import annotations

import numpy as np

from jaxserve.engine.speculative.proposals import Proposals
from jaxserve.token_tree import TokenTree


def lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` (length in [min_n, max_n]) found; [] when none occurs."""
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n:]
        # windows[i] = tokens[i:i + n] for every start i whose window ends before the suffix
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if len(starts):
            follow = starts[-1] + n
            return tokens[follow:follow + k].tolist()
    return []


def lookup_all(tokens: np.ndarray, k: int, min_n: int, max_n: int, limit: int) -> list[list[int]]:
    """Up to `limit` distinct continuations (of up to k tokens): what followed each earlier
    occurrence of the suffix, longest suffixes first, latest occurrences first. The first is
    `lookup`'s."""
    total, found = len(tokens), []
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
        for start in np.flatnonzero((windows == tokens[total - n:]).all(axis=1))[::-1]:
            follow = tokens[start + n:start + n + k].tolist()
            if follow and follow not in found:
                found.append(follow)
                if len(found) == limit:
                    return found
    return found


class NgramProposer:
    def __init__(self, k: int, min_n: int, max_n: int, tree: TokenTree | None = None):
        """tree: propose a token tree of this shape (several earlier occurrences' continuations)
        instead of one chain."""
        self.k, self.min_n, self.max_n, self.tree = k, min_n, max_n, tree

    def propose(self, seq) -> list[int]:
        """Proposals for a sequence whose outputs are all read back."""
        tokens = np.asarray(seq.request.prompt_ids + seq.output_ids, np.int32)
        return lookup(tokens, self.k, self.min_n, self.max_n)

    def propose_all(self, seqs: list) -> Proposals:
        if self.tree is None:
            return Proposals({seq: self.propose(seq) for seq in seqs})
        out = Proposals({})
        for seq in seqs:
            tokens = np.asarray(seq.request.prompt_ids + seq.output_ids, np.int32)
            branches = self.tree.branches(lookup_all(tokens, self.tree.max_depth, self.min_n,
                                                     self.max_n, self.tree.size))
            out.tokens[seq] = branches[0] if branches else []
            if len(branches) > 1:
                out.branches[seq] = branches[1:]
        return out

    idle = True  # nothing held between steps

    def dispatched(self, plan) -> None:
        """Nothing runs beside the target's step."""

    def verified(self, runs) -> None:
        """Lookups start from the tokens alone: nothing to keep from a step."""
