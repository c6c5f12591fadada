"""Speculative decoding with proposals drawn from a full draft distribution q.

Oracles: the verified tokens follow the target's exact distribution p whatever q is (chi-square
against p, computed here in numpy from the logits, with all filters applied to p and q alike);
a draft equal to the target keeps every proposal; a seeded request gives the same tokens alone
and in a batch.
"""

import numpy as np
import pytest
from scipy import stats

from jaxserve.sampling_params import SamplingParams

VOCAB = 12


def _kept_probs(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The sampler's distribution at temperature 1 with top_p (jaxserve/runtime/sampling.py)."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def _chi_square_p(seen: np.ndarray, expected: np.ndarray) -> float:
    counts = np.bincount(seen, minlength=len(expected))
    assert counts[expected == 0].sum() == 0, "a token the filters drop was drawn"
    support = expected > 0
    wanted = expected[support] * len(seen)
    statistic = ((counts[support] - wanted) ** 2 / wanted).sum()
    return float(stats.chi2.sf(statistic, support.sum() - 1))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_drafts_verified_follow_the_target_distribution(top_p):
    """4000 seeds, one batch row each of a run of three rows: two proposals d1 ~ q1, d2 ~ q2
    from a draft that disagrees with the target (other logits), then the bonus row. The run's
    first token must follow p1 and, given d1 was kept, its second p2 (chi-square against the
    exact filtered distributions; false-alarm rate 1e-3 per comparison, 4e-3 over the four).
    Checked by hand to fail when the rule is wrong, by editing `_accept_sampled` in
    jaxserve/runtime/verify.py: keeping every proposal gives first-token p = 0.0 (top_p 1)
    or draws a token top_p drops (0.8); drawing a rejected row's token from p instead of the
    residual, p = 5e-100 and 6e-160."""
    import jax
    import jax.numpy as jnp

    from jaxserve.runtime import verify
    from jaxserve.runtime.sampling import SamplingInputs

    rng = np.random.default_rng(0)
    target = rng.normal(0, 1.5, (3, VOCAB))
    drafter = target[:2] + rng.normal(0, 1.5, (2, VOCAB))  # disagrees
    p = np.stack([_kept_probs(row, top_p) for row in target])
    q = np.stack([_kept_probs(row, top_p) for row in drafter])
    num, rows = 4000, 3
    proposals = np.stack([rng.choice(VOCAB, num, p=q[j]) for j in range(2)], axis=1)
    draft = np.concatenate([proposals, np.full((num, 1), -1)], axis=1).reshape(-1)
    draft_probs = np.tile(np.concatenate([q, np.zeros((1, VOCAB))]), (num, 1))
    run_start = np.repeat(np.arange(0, rows * num, rows), rows)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    sampling = SamplingInputs.from_params([params] * rows * num,
                                          np.repeat(np.arange(num), rows).tolist(),
                                          [5, 6, 7] * num, rows * num)
    n = rows * num
    no_state = jnp.zeros((1, VOCAB), bool), jnp.zeros((1, VOCAB), jnp.int32)
    tokens, emitted, *_ = jax.jit(verify.verify_rows, static_argnums=(10,))(
        np.tile(target, (num, 1)).astype(np.float32), *no_state, np.zeros(n, np.int32),
        np.full((n, 1), VOCAB, np.int32), np.zeros(n, bool), sampling,
        draft.astype(np.int32), run_start.astype(np.int32), np.ones(n, bool), 0,
        draft_probs.astype(np.float32))
    tokens, emitted = np.asarray(tokens).reshape(num, rows), np.asarray(emitted).reshape(num, 3)
    p_value = _chi_square_p(tokens[:, 0], p[0])
    assert p_value > 1e-3, f"first token: chi-square p = {p_value:.2e}"
    kept = emitted[:, 1]  # the second row emits iff the first kept its proposal
    assert 0.2 < kept.mean() < 0.9  # both branches are taken often
    assert emitted[:, 0].all() and (tokens[kept, 0] == proposals[kept, 0]).all()
    p_value = _chi_square_p(tokens[kept, 1], p[1])
    assert p_value > 1e-3, f"second token: chi-square p = {p_value:.2e}"
