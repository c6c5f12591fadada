"""Specification of request sampling: `SamplingParams` validation and the jitted
sampler, penalties and logprobs of `jaxserve.runtime.sampling`.

Oracles are numpy/torch re-computations of the intended maths, never the code
under test. Random draws use fixed seeds, so results are deterministic; the
statistical bounds are loose so a correct sampler passes for any seeds, while a
wrong distribution (missing temperature, wrong filter set) fails by far.
This file must not need a GPU or a network, and must stay well under a minute.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.runtime.sampling import (SamplingInputs, apply_penalties, first_max, logprobs,
                                       sample)
from jaxserve.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams

sample_jit = jax.jit(sample)
penalties_jit = jax.jit(lambda logits, mask, counts, inputs: apply_penalties(logits, mask, counts, None, inputs))
logprobs_jit = jax.jit(logprobs, static_argnums=2)


@jax.jit
def step(logits, prompt_mask, output_counts, inputs):
    """Penalties then sampling, as the engine's decode step composes them."""
    return sample(apply_penalties(logits, prompt_mask, output_counts, None, inputs), inputs)


def inputs_for(params, seeds=None, counters=None, batch_size=None) -> SamplingInputs:
    seeds = list(range(len(params))) if seeds is None else seeds
    counters = [0] * len(params) if counters is None else counters
    return SamplingInputs.from_params(params, seeds, counters, batch_size or len(params))


def draws(logits_row: np.ndarray, count: int, **params) -> np.ndarray:
    """`count` independent tokens for one logits row: one batch row per seed."""
    batch = np.broadcast_to(np.asarray(logits_row, np.float32), (count, len(logits_row)))
    inputs = inputs_for([SamplingParams(**params)] * count, seeds=list(range(count)),
                        counters=[3] * count)
    return np.asarray(sample_jit(jnp.asarray(batch), inputs))


def filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution the sampler must draw from, in float64 numpy."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k > 0:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    if top_p < 1.0:
        cumulative = np.cumsum(p[order])
        # The test inputs must not sit on a boundary that float32 could flip.
        assert np.min(np.abs(cumulative - top_p)) > 1e-3, "ambiguous top_p boundary"
        needed = int(np.searchsorted(cumulative, top_p)) + 1  # first prefix with mass >= p
        p[order[needed:]] = 0.0
        p /= p.sum()
    if min_p > 0.0:
        p[p < min_p * p.max()] = 0.0
        p /= p.sum()
    return p


LOGITS_8 = np.array([2.0, 1.5, 1.2, 0.7, 0.3, 0.0, -0.5, -1.3], np.float32)


# --------------------------------------------------------------------------- params


INVALID_PARAMS = [
    # (constructor kwargs, field named in the message, error type)
    ({"temperature": float("nan")}, "temperature", ValueError),
    ({"temperature": float("inf")}, "temperature", ValueError),
    ({"temperature": -0.1}, "temperature", ValueError),
    ({"temperature": True}, "temperature", TypeError),
    ({"temperature": "1"}, "temperature", TypeError),
    ({"top_p": 0.0}, "top_p", ValueError),
    ({"top_p": 1.5}, "top_p", ValueError),
    ({"top_p": float("nan")}, "top_p", ValueError),
    ({"top_k": 0.5}, "top_k", TypeError),
    ({"top_k": True}, "top_k", TypeError),
    ({"top_k": -5}, "top_k", ValueError),
    ({"min_p": -0.1}, "min_p", ValueError),
    ({"min_p": 1.1}, "min_p", ValueError),
    ({"n": 0}, "n", ValueError),
    ({"n": MAX_N + 1}, "n", ValueError),
    ({"n": 1.0}, "n", TypeError),
    ({"repetition_penalty": 0.0}, "repetition_penalty", ValueError),
    ({"repetition_penalty": -1.0}, "repetition_penalty", ValueError),
    ({"repetition_penalty": float("inf")}, "repetition_penalty", ValueError),
    ({"presence_penalty": 2.5}, "presence_penalty", ValueError),
    ({"presence_penalty": float("nan")}, "presence_penalty", ValueError),
    ({"frequency_penalty": -3}, "frequency_penalty", ValueError),
    ({"seed": -1}, "seed", ValueError),
    ({"seed": 2**63}, "seed", ValueError),
    ({"seed": 1.5}, "seed", TypeError),
    ({"stop": 3}, "stop", TypeError),
    ({"stop": ["ok", 3]}, "stop", TypeError),
    ({"stop": {"a"}}, "stop", TypeError),
    ({"stop": ""}, "stop", ValueError),
    ({"stop": ["ok", ""]}, "stop", ValueError),
    ({"stop": ["x"] * 17}, "stop", ValueError),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ValueError),
    ({"stop_token_ids": [2, 1.5]}, "stop_token_ids", TypeError),
    ({"stop_token_ids": 5}, "stop_token_ids", TypeError),
    ({"max_tokens": 0}, "max_tokens", ValueError),
    ({"max_tokens": 2.0}, "max_tokens", TypeError),
    ({"min_tokens": -1}, "min_tokens", ValueError),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens", ValueError),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", ValueError),
    ({"logprobs": -1}, "logprobs", ValueError),
    ({"ignore_eos": "yes"}, "ignore_eos", TypeError),
    ({"skip_special_tokens": 1}, "skip_special_tokens", TypeError),
]


@pytest.mark.parametrize(("kwargs", "field", "error"), INVALID_PARAMS,
                         ids=[f"{f}={k[f]!r}"[:40] for k, f, _ in INVALID_PARAMS])
def test_invalid_field_fails_construction_naming_field_and_value(kwargs, field, error):
    with pytest.raises(error) as caught:
        SamplingParams(**kwargs)
    message = str(caught.value)
    assert message.startswith(field + " "), message
    assert repr(kwargs[field]) in message, message


def test_error_message_reads_naturally():
    with pytest.raises(ValueError, match=r"^temperature must be a finite number >= 0, got nan$"):
        SamplingParams(temperature=float("nan"))


VALID_PARAMS = [
    # (constructor kwargs, {field: value after construction})
    ({}, {"n": 1, "temperature": 1.0, "top_k": 0, "stop": (), "stop_token_ids": (),
          "max_tokens": 16, "logprobs": None, "seed": None}),
    ({"n": 4, "temperature": 0}, {"n": 4, "temperature": 0.0}),  # vLLM allows n > 1 greedy
    ({"temperature": 1}, {"temperature": 1.0}),
    ({"top_k": -1}, {"top_k": 0}),
    ({"top_k": 1, "top_p": 1.0, "min_p": 1.0}, {"top_k": 1, "top_p": 1.0, "min_p": 1.0}),
    ({"top_p": 1e-6}, {"top_p": 1e-6}),
    ({"stop": "###"}, {"stop": ("###",)}),
    ({"stop": ["a", "bc"]}, {"stop": ("a", "bc")}),
    ({"stop": ["x"] * 16}, {"stop": ("x",) * 16}),
    ({"stop_token_ids": [0, 2]}, {"stop_token_ids": (0, 2)}),
    ({"max_tokens": None, "min_tokens": 100}, {"max_tokens": None, "min_tokens": 100}),
    ({"max_tokens": 5, "min_tokens": 5}, {"min_tokens": 5}),
    ({"logprobs": 0}, {"logprobs": 0}),
    ({"logprobs": MAX_LOGPROBS}, {"logprobs": MAX_LOGPROBS}),
    ({"seed": 0}, {"seed": 0}),
    ({"seed": 2**63 - 1}, {"seed": 2**63 - 1}),
    ({"presence_penalty": -2, "frequency_penalty": 2.0}, {"presence_penalty": -2.0}),
    ({"repetition_penalty": 1e-3}, {"repetition_penalty": 1e-3}),
    ({"temperature": np.float32(0.5), "top_k": np.int64(3)}, {"temperature": 0.5, "top_k": 3}),
]


@pytest.mark.parametrize(("kwargs", "expected"), VALID_PARAMS)
def test_valid_params_construct_and_normalise(kwargs, expected):
    params = SamplingParams(**kwargs)
    for field, value in expected.items():
        got = getattr(params, field)
        assert got == value and type(got) is type(value), (field, got)


def test_params_cannot_be_changed_without_revalidation():
    params = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = -1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(params, temperature=-1.0)


def test_greedy_means_temperature_zero():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="temprature") as caught:
        SamplingParams.from_dict({"temperature": 0.5, "temprature": 1.0, "zz": 1})
    assert "zz" in str(caught.value) and "'temperature'" not in str(caught.value)
    with pytest.raises(TypeError):
        SamplingParams.from_dict([("temperature", 0.5)])  # type: ignore[arg-type]


def test_from_dict_builds_validated_params():
    d = {"temperature": 0.5, "top_k": 40, "stop": ["\n"], "seed": 7, "max_tokens": 64}
    assert SamplingParams.from_dict(d) == SamplingParams(**d)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


def test_validate_for_model():
    SamplingParams(stop_token_ids=[99], max_tokens=128).validate_for_model(100, 128)
    with pytest.raises(ValueError, match=r"stop_token_ids.*\b100\b"):
        SamplingParams(stop_token_ids=[5, 100]).validate_for_model(100, 128)
    with pytest.raises(ValueError, match=r"max_tokens.*\b129\b"):
        SamplingParams(max_tokens=129).validate_for_model(100, 128)
    SamplingParams(max_tokens=None).validate_for_model(100, 128)


def test_seed_for_sequence():
    assert [SamplingParams(seed=10).seed_for(i, 999) for i in range(3)] == [10, 11, 12]
    assert SamplingParams().seed_for(2, 999) == 999
    assert SamplingParams(seed=2**63 - 1).seed_for(1, 0) == 0  # stays a valid seed


# --------------------------------------------------------------------------- batch inputs


def test_from_params_pads_with_greedy_neutral_rows():
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1,
                             repetition_penalty=1.2, presence_penalty=0.5,
                             frequency_penalty=-0.5),
              None,
              SamplingParams(top_k=10**12)]
    inputs = SamplingInputs.from_params(params, [2**40 + 5, 1, 3], [4, 0, 9], batch_size=5)
    np.testing.assert_array_equal(inputs.temperature, np.float32([0.7, 0, 1, 0, 0]))
    np.testing.assert_array_equal(inputs.top_k, [5, 0, 2**31 - 1, 0, 0])
    np.testing.assert_array_equal(inputs.top_p, np.float32([0.9, 1, 1, 1, 1]))
    np.testing.assert_array_equal(inputs.min_p, np.float32([0.1, 0, 0, 0, 0]))
    np.testing.assert_array_equal(inputs.repetition_penalty, np.float32([1.2, 1, 1, 1, 1]))
    np.testing.assert_array_equal(inputs.presence_penalty, np.float32([0.5, 0, 0, 0, 0]))
    np.testing.assert_array_equal(inputs.frequency_penalty, np.float32([-0.5, 0, 0, 0, 0]))
    np.testing.assert_array_equal(inputs.seed, [[2**8, 5], [0, 1], [0, 3], [0, 0], [0, 0]])
    np.testing.assert_array_equal(inputs.counter, [4, 0, 9, 0, 0])
    expected_dtypes = {"seed": np.uint32, "counter": np.int32, "top_k": np.int32}
    for field in dataclasses.fields(SamplingInputs):
        array = getattr(inputs, field.name)
        assert array.dtype == expected_dtypes.get(field.name, np.float32), field.name
        assert array.shape[0] == 5


def test_from_params_rejects_bad_batches():
    one = [SamplingParams()]
    with pytest.raises(ValueError, match="batch_size"):
        SamplingInputs.from_params(one * 3, [0] * 3, [0] * 3, batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        SamplingInputs.from_params(one, [], [0], batch_size=2)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        SamplingInputs.from_params(one, [2**63], [0], batch_size=2)
    with pytest.raises(OverflowError):
        SamplingInputs.from_params(one, [-1], [0], batch_size=2)


def test_empty_batch_is_all_greedy():
    inputs = SamplingInputs.from_params([], [], [], batch_size=3)
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    np.testing.assert_array_equal(sample_jit(logits, inputs), logits.argmax(-1))


# --------------------------------------------------------------------------- sampling


def test_greedy_rows_take_argmax_with_ties_to_lowest_id():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 1000)).astype(np.float32)
    logits[0, [7, 300, 999]] = 50.0  # a three-way tie
    expected = logits.argmax(-1)
    assert expected[0] == 7
    greedy = SamplingParams(temperature=0, top_k=3, seed=1)  # filters do not apply to greedy
    all_greedy = inputs_for([greedy] * 6)
    np.testing.assert_array_equal(sample_jit(logits, all_greedy), expected)
    # The same rows next to sampled rows (the other runtime branch).
    mixed = inputs_for([greedy, SamplingParams(top_p=0.5), greedy,
                        SamplingParams(temperature=2.0), greedy, SamplingParams(min_p=0.2)])
    np.testing.assert_array_equal(np.asarray(sample_jit(logits, mixed))[::2], expected[::2])


def test_tiny_temperature_picks_the_top_token_without_nan():
    logits = np.random.default_rng(2).normal(size=(4, 300)).astype(np.float32) * 30
    inputs = inputs_for([SamplingParams(temperature=1e-30, top_p=0.9),
                         SamplingParams(temperature=1e-30),
                         SamplingParams(temperature=1e-7, min_p=0.5),
                         SamplingParams(temperature=1e-7, top_k=3)])
    np.testing.assert_array_equal(sample_jit(logits, inputs), logits.argmax(-1))


def test_top_k_never_leaves_the_top_k():
    logits = np.random.default_rng(3).normal(size=64).astype(np.float32)
    top5 = set(np.argsort(-logits)[:5].tolist())
    drawn = draws(logits, 4096, temperature=3.0, top_k=5)
    assert set(drawn.tolist()) == top5  # never outside, and every member reachable


@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.8, 0.95])
def test_top_p_support_is_smallest_set_reaching_p(top_p):
    p = filtered_probs(LOGITS_8, top_p=top_p)
    expected = set(np.flatnonzero(p).tolist())
    drawn = draws(LOGITS_8, 4096, top_p=top_p)
    assert set(drawn.tolist()) == expected


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # top_k=3 leaves masses ~(.46, .28, .21, ...) renormalised; top_p=0.7 then needs 2
    # tokens, whereas over the full distribution it would need 3.
    p = filtered_probs(LOGITS_8, top_k=3, top_p=0.7)
    assert np.count_nonzero(p) == 2 and np.count_nonzero(filtered_probs(LOGITS_8, top_p=0.7)) == 3
    drawn = draws(LOGITS_8, 2048, top_k=3, top_p=0.7)
    assert set(drawn.tolist()) == set(np.flatnonzero(p).tolist())


@pytest.mark.parametrize("min_p", [0.15, 0.4, 1.0])
def test_min_p_drops_tokens_below_fraction_of_top(min_p):
    expected = set(np.flatnonzero(filtered_probs(LOGITS_8, temperature=0.8, min_p=min_p)).tolist())
    drawn = draws(LOGITS_8, 4096, temperature=0.8, min_p=min_p)
    assert set(drawn.tolist()) == expected


@pytest.mark.parametrize("params", [
    {"temperature": 1.0},
    {"temperature": 0.5},
    {"temperature": 2.0, "top_k": 5},
    {"temperature": 1.5, "top_k": 8},  # k == vocab: no filtering
    {"top_p": 0.8},
    {"min_p": 0.1},
    {"temperature": 0.8, "top_k": 6, "top_p": 0.9, "min_p": 0.05},
])
def test_sampled_frequencies_match_filtered_softmax(params):
    expected = filtered_probs(LOGITS_8, **params)
    count = 8192
    observed = np.bincount(draws(LOGITS_8, count, **params), minlength=8)
    support = expected > 0
    assert observed[~support].sum() == 0
    chi2 = np.sum((observed[support] - count * expected[support]) ** 2
                  / (count * expected[support]))
    dof = max(int(support.sum()) - 1, 1)
    # chi2(7) > 36 has probability < 1e-5; a wrong temperature gives chi2 in the hundreds.
    assert chi2 < 3 * dof + 15, (chi2, observed, count * expected)


SEEDED_ROWS = [
    {"temperature": 1.0},
    {"temperature": 0.9, "top_k": 200, "top_p": 0.9, "min_p": 0.01},
]


@pytest.mark.parametrize("params", SEEDED_ROWS, ids=["plain", "filtered"])
def test_seeded_row_is_independent_of_row_index_and_neighbours(params):
    vocab, rows = 2048, 32
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(rows, vocab)) * 0.1).astype(np.float32)  # nearly flat
    seeds = [1000 + 7 * i for i in range(rows)]
    counters = list(range(rows))
    alone = inputs_for([SamplingParams(**params)] * rows, seeds, counters)
    no_penalty = (np.zeros((rows, vocab), bool), np.zeros((rows, vocab), np.int32))
    tokens_alone = np.asarray(step(logits, *no_penalty, alone))
    assert len(set(tokens_alone.tolist())) > rows // 2  # seeds and counters matter

    # The same rows shuffled into a bigger batch whose other rows are greedy,
    # filtered and penalised, so every runtime branch is taken.
    neighbours = [SamplingParams(temperature=0), SamplingParams(top_p=0.5, top_k=3),
                  SamplingParams(min_p=0.3, repetition_penalty=1.5, frequency_penalty=1.0),
                  SamplingParams(temperature=0.3, presence_penalty=-1.0)]
    batch = 2 * rows
    where = rng.permutation(batch)[:rows]
    params_b = [neighbours[i % len(neighbours)] for i in range(batch)]
    seeds_b, counters_b = list(range(batch)), [5] * batch
    logits_b = rng.normal(size=(batch, vocab)).astype(np.float32)
    for row, slot in enumerate(where):
        params_b[slot] = SamplingParams(**params)
        seeds_b[slot], counters_b[slot] = seeds[row], counters[row]
        logits_b[slot] = logits[row]
    prompt_mask = rng.random((batch, vocab)) < 0.1
    counts = rng.integers(0, 3, size=(batch, vocab)).astype(np.int32)
    prompt_mask[where], counts[where] = False, 0  # penalties would change those rows' logits
    mixed = inputs_for(params_b, seeds_b, counters_b)
    tokens_mixed = np.asarray(step(logits_b, prompt_mask, counts, mixed))
    np.testing.assert_array_equal(tokens_mixed[where], tokens_alone)


def test_seeded_row_with_penalties_is_reproducible_anywhere():
    vocab = 512
    rng = np.random.default_rng(5)
    logits = rng.normal(size=vocab).astype(np.float32)
    prompt = rng.random(vocab) < 0.2
    count = rng.integers(0, 3, size=vocab).astype(np.int32)
    params = SamplingParams(temperature=1.3, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.2)
    tokens = []
    for batch, slot in [(1, 0), (4, 3), (8, 2)]:
        others = np.random.default_rng(batch).normal(size=(batch, vocab)).astype(np.float32)
        others[slot] = logits
        masks = np.zeros((batch, vocab), bool)
        counts = np.zeros((batch, vocab), np.int32)
        masks[slot], counts[slot] = prompt, count
        row_params = [SamplingParams(temperature=0)] * batch
        row_params[slot] = params
        seeds = [9] * batch
        seeds[slot] = 12345
        inputs = inputs_for(row_params, seeds, [0] * batch)
        tokens.append(int(step(others, masks, counts, inputs)[slot]))
    assert tokens[0] == tokens[1] == tokens[2]


def test_seed_uses_all_63_bits_and_counter():
    vocab, rows = 4096, 16
    logits = np.zeros((rows, vocab), np.float32)  # uniform: tokens are pure randomness
    params = [SamplingParams()] * rows

    def tokens(seeds, counters):
        return np.asarray(sample_jit(logits, inputs_for(params, seeds, counters)))

    low = tokens([77] * rows, list(range(rows)))
    high = tokens([77 + 2**40] * rows, list(range(rows)))
    assert np.sum(low == high) <= 2  # the high word changes the stream
    assert len(set(low.tolist())) >= rows - 2  # so does the counter
    np.testing.assert_array_equal(tokens([77] * rows, list(range(rows))), low)  # reproducible
    repeated = tokens([5] * rows, [3] * rows)
    assert len(set(repeated.tolist())) == 1  # same (seed, counter) -> same token


def test_vocabulary_sort_only_runs_behind_a_runtime_branch():
    logits = jnp.zeros((2, 32), jnp.float32)
    jaxpr = jax.make_jaxpr(sample)(logits, inputs_for([SamplingParams()] * 2)).jaxpr

    def primitives(jaxpr, recurse):
        names = set()
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            if recurse:
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    names |= primitives(sub, True)
        return names

    assert "sort" not in primitives(jaxpr, recurse=False)
    assert "cond" in primitives(jaxpr, recurse=False)
    assert "sort" in primitives(jaxpr, recurse=True)


# --------------------------------------------------------------------------- penalties


def reference_penalties(logits, prompt_mask, counts, rep, presence, frequency):
    """vLLM's apply_penalties in float64 numpy."""
    out = logits.astype(np.float64)
    generated = counts > 0
    penalty = np.where(prompt_mask | generated, rep[:, None], 1.0)
    out = np.where(out > 0, out / penalty, out * penalty)
    out -= frequency[:, None] * counts
    out -= presence[:, None] * generated
    return out


def test_penalties_follow_vllm_formulas():
    rows, vocab = 5, 300
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(rows, vocab)) * 3).astype(np.float32)
    prompt_mask = rng.random((rows, vocab)) < 0.2
    counts = np.where(rng.random((rows, vocab)) < 0.2, rng.integers(1, 5, (rows, vocab)), 0)
    counts = counts.astype(np.int32)
    params = [SamplingParams(repetition_penalty=1.3),
              SamplingParams(repetition_penalty=0.7, presence_penalty=0.5),
              SamplingParams(frequency_penalty=0.4, presence_penalty=-1.5),
              SamplingParams(repetition_penalty=2.0, presence_penalty=2.0, frequency_penalty=-2.0),
              SamplingParams()]
    inputs = inputs_for(params)
    got = np.asarray(penalties_jit(logits, prompt_mask, counts, inputs))
    expected = reference_penalties(logits, prompt_mask, counts,
                                   *(np.array([getattr(p, f) for p in params]) for f in
                                     ("repetition_penalty", "presence_penalty",
                                      "frequency_penalty")))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[4], logits[4])  # a row without penalties is untouched


def test_penalty_worked_example():
    logits = np.array([[2.0, -2.0, 2.0, 1.0]], np.float32)
    prompt_mask = np.array([[True, True, False, False]])
    counts = np.array([[0, 0, 0, 3]], np.int32)
    inputs = inputs_for([SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                                        frequency_penalty=0.1)])
    got = np.asarray(penalties_jit(logits, prompt_mask, counts, inputs))
    # seen positive: 2/2; seen negative: -2*2; unseen: kept; generated 3x: 1/2 - 0.3 - 0.5.
    np.testing.assert_allclose(got, [[1.0, -4.0, 2.0, -0.3]], rtol=1e-6)


def test_batch_without_penalties_returns_logits_unchanged():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 100)).astype(np.float32)
    got = penalties_jit(logits, rng.random((3, 100)) < 0.5,
                        rng.integers(0, 4, (3, 100)).astype(np.int32),
                        inputs_for([SamplingParams(), SamplingParams(temperature=0), None]))
    np.testing.assert_array_equal(got, logits)


# --------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("num_top", [0, 1, 5, MAX_LOGPROBS])
def test_logprobs_match_torch_log_softmax(num_top):
    rows, vocab = 4, 5000
    logits = (np.random.default_rng(8).normal(size=(rows, vocab)) * 3).astype(np.float32)
    token_ids = np.array([0, 17, 4999, 2500], np.int32)
    chosen, top_ids, top_logprobs = logprobs_jit(logits, token_ids, num_top)

    reference = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    np.testing.assert_allclose(chosen, reference[torch.arange(rows), token_ids].numpy(),
                               rtol=1e-5, atol=1e-5)
    assert top_ids.shape == top_logprobs.shape == (rows, num_top)
    assert top_ids.dtype == jnp.int32 and top_logprobs.dtype == jnp.float32
    if num_top:
        values, indices = torch.topk(reference, num_top, dim=-1)
        np.testing.assert_array_equal(top_ids, indices.numpy())
        np.testing.assert_allclose(top_logprobs, values.numpy(), rtol=1e-5, atol=1e-5)


def test_logprobs_worked_example():
    logits = np.array([[1.0, 2.0, 3.0]], np.float32)
    chosen, _, _ = logprobs_jit(logits, np.array([2], np.int32), 0)
    assert math.isclose(float(chosen[0]), 3.0 - math.log(math.e + math.e**2 + math.e**3),
                        rel_tol=1e-6)


def test_first_max_is_argmax_on_ties_nans_infinities_and_random_rows():
    """Greedy sampling's two-reduction argmax picks what jnp.argmax picks: the lowest id of a
    tied maximum, the first NaN, index 0 of an all -inf row, and on random rows of odd widths."""
    nan, inf = np.nan, np.inf
    rows = np.array([[1, 3, 3, 2, 0], [nan, 1, nan, 5, 0], [-inf] * 5, [2, nan, 9, 9, inf],
                     [0, inf, inf, 1, 2], [nan] * 5, [-1, -1, -1, -1, -1]], np.float32)
    rng = np.random.default_rng(0)
    for logits in (rows, rng.standard_normal((9, 2053)).astype(np.float32),
                   rng.integers(0, 3, (16, 37)).astype(np.float32)):
        got = np.asarray(jax.jit(first_max)(jnp.asarray(logits)))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
        assert got.dtype == np.int32
