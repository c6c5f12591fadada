"""The prompts benchmarks send: random token ids (no bos/eos/pad ids), the mixed workload of
varied prompt and output lengths, and system prompts shared by many requests. All seeded."""

from __future__ import annotations

import numpy as np

FIRST_ID = 3  # ids below are unk/bos/eos of jaxserve's sentencepiece models


def random_prompts(rng, vocab: int, lengths) -> list[list[int]]:
    return [rng.integers(FIRST_ID, vocab, size=n).tolist() for n in lengths]


def mixed_workload(n: int, seed: int, vocab: int):
    """n requests: prompt lengths uniform in 16..1024, output lengths uniform in 16..512."""
    rng = np.random.default_rng(seed + 1)
    prompt_lens = rng.integers(16, 1024, size=n, endpoint=True)
    out_lens = rng.integers(16, 512, size=n, endpoint=True)
    return random_prompts(rng, vocab, prompt_lens), [int(x) for x in out_lens]


def shared_prefix_prompts(seed: int, vocab: int, prefixes: int, prefix_len: int, requests: int,
                          suffix_min: int, suffix_max: int) -> list[list[int]]:
    """`requests` prompts, each one of `prefixes` system prompts (uniformly drawn) followed by a
    suffix of suffix_min..suffix_max random ids."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(FIRST_ID, vocab, size=prefix_len).tolist() for _ in range(prefixes)]
    return [systems[int(rng.integers(prefixes))]
            + rng.integers(FIRST_ID, vocab, size=int(rng.integers(suffix_min,
                                                                  suffix_max + 1))).tolist()
            for _ in range(requests)]
