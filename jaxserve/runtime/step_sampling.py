"""A step's sampling over its sample rows, replicated or sequence-parallel.

Under tensor parallelism the LM head leaves the logits split by vocabulary ([rows, vocab / t]
on each of t devices). Two ways to sample from them (`LLM(..., sampling=...)`):

- "replicated": every device samples every row of its replica: the whole vocabulary of every
  row is gathered onto every device (one all-gather of [rows, vocab]). The sampling work does
  not shrink as t grows: the Amdahl term of the step. (The gather is written out: left to
  itself, XLA's partitioner reduces over the split vocabulary with all-reduces, splits the
  penalty state's updates by vocabulary and gathers that [slots, vocab] state every step, or,
  asked for whole-vocabulary logits, gathers the LM head's weights instead.)
- "sequence_parallel": one all-to-all turns [rows, vocab / t] into [rows / t, vocab] (each
  device gets whole rows), each device applies penalties, draws and computes logprobs for its
  own rows only, and one all-gather per dtype collects the sampled tokens and logprobs
  ([rows, 1 + top-N] each). Sampling work per device shrinks by t; the bytes moved are the
  logits once instead of t times.

A row's token depends only on its own logits, settings, seed and counter (jaxserve/runtime/
sampling.py), so both give the same tokens and logprobs. Rows are padded inside the program
with neutral rows (greedy, no penalty, the trash slot) that are dropped again, to a multiple of
t for the all-to-all and of ROW_GROUP for the math: the engine's shapes do not change. On a
mesh both modes run per device under shard_map, each device on its own replica's rows (so a DP
replica never sees another's logits); where the vocabulary is not split they are the same
program.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxserve.runtime import sampling, slots
from jaxserve.runtime.sampling import SamplingInputs
from jaxserve.settings import SAMPLING_MODES
from jaxserve.sharding import Layout

DEFAULT_SAMPLING = "sequence_parallel"
# XLA:CPU vectorizes a reduction over a small vocabulary across rows, 8 at a time, and a row's
# rounding then depends on whether it falls in such a group: both modes sample over rows padded
# to a multiple of 8, so they round alike (a large vocabulary rounds alike either way).
ROW_GROUP = 8
# A padding row's settings: greedy, no filters, no penalties (SamplingInputs.from_params' pad row)
_NEUTRAL = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "seed": 0, "counter": 0}


def check_mode(mode: str) -> str:
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {mode!r}")
    return mode


def sample_rows(mode: str, layout: Layout, logits, prompt_mask, output_counts, slot_ids,
                suppressed, want_logprobs, inputs: SamplingInputs, num_top: int):
    """Penalties, suppressed tokens, the draw and logprobs of every sample row.

    logits f32[rows, vocab_rows]; prompt_mask / output_counts [replicas x (slots + 1),
    vocab_rows], split over the replicas (each shard's last row is its trash row: see slots.py);
    slot_ids (global ids), want_logprobs, inputs: per row; suppressed
    i32[rows, S] (vocab_rows = none). Returns (tokens i32[rows], chosen logprob f32[rows],
    top ids i32[rows, num_top], top logprobs f32[rows, num_top]).
    """
    with jax.named_scope("sampling"):
        return _sample_rows(mode, layout, num_top, logits, prompt_mask, output_counts, slot_ids,
                            suppressed, want_logprobs, inputs)


def _sample_rows(mode, layout, num_top, *args):
    if layout.num_devices == 1:
        return _sample(*args, num_top=num_top)
    axes = layout.sampling_row_axes()
    rows = layout.partition(("batch",))
    if mode == "replicated" or not axes:  # (no axes: the vocabulary is whole already)
        per_device = functools.partial(_sample_all_rows, axes, num_top)
    else:
        per_device = functools.partial(_sample_own_rows, axes, layout.axis_size(axes), num_top)
    # The logits come in as the LM head left them (each device a slice of the vocabulary), so
    # the one collective on them is the mode's own, written below. The slot state comes in as
    # each replica's own shard (see slots.py): it never moves.
    with layout.activate():
        return jax.shard_map(functools.partial(_own_slots, per_device), mesh=layout.mesh,
                             in_specs=(layout.partition(("batch", "vocab")), rows, rows, rows,
                                       rows, rows, rows),
                             out_specs=(rows,) * 4, check_vma=False)(*args)


def _own_slots(per_device, logits, prompt_mask, output_counts, slot_ids, *rest):
    """Per device: the rows' global slot ids turned into rows of its replica's slot shard."""
    return per_device(logits, prompt_mask, output_counts,
                      slots.local_rows(slot_ids, prompt_mask.shape[0]), *rest)


def _sample(logits, prompt_mask, output_counts, slot_ids, suppressed, want_logprobs,
            inputs: SamplingInputs, num_top: int):
    """The sampling math over whatever rows it is given (all of them, or one device's)."""
    b = logits.shape[0]
    processed = sampling.apply_penalties(logits, prompt_mask, output_counts, slot_ids, inputs)
    processed = processed.at[jnp.arange(b)[:, None], suppressed].set(-jnp.inf, mode="drop")
    tokens = sampling.sample(processed, inputs)
    chosen, top_ids, top_lps = sampling.logprobs_if_wanted(logits, tokens, want_logprobs, num_top)
    return tokens, chosen, top_ids, top_lps


def _pad_rows(x, rows: int, fill):
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=fill)


def _neutral_rows(rows: int, prompt_mask, slot_ids, suppressed, want_logprobs, inputs, take):
    """The row inputs padded with neutral rows to `rows`, then `take` applied to each."""
    trash, vocab = prompt_mask.shape[0] - 1, prompt_mask.shape[1]
    inputs = SamplingInputs(**{f.name: take(_pad_rows(getattr(inputs, f.name), rows,
                                                      _NEUTRAL[f.name]))
                               for f in dataclasses.fields(inputs)})
    return (take(_pad_rows(slot_ids, rows, trash)), take(_pad_rows(suppressed, rows, vocab)),
            take(_pad_rows(want_logprobs, rows, False)), inputs)


def _sample_padded(num_top, logits, prompt_mask, output_counts, slot_ids, suppressed,
                   want_logprobs, inputs):
    """`_sample` over the rows padded to a multiple of ROW_GROUP (padding dropped after)."""
    rows = logits.shape[0]
    padded = -(-rows // ROW_GROUP) * ROW_GROUP
    row_inputs = _neutral_rows(padded, prompt_mask, slot_ids, suppressed, want_logprobs, inputs,
                               lambda x: x)
    out = _sample(_pad_rows(logits, padded, 0.0), prompt_mask, output_counts, *row_inputs,
                  num_top=num_top)
    return tuple(x[:rows] for x in out)


def _sample_all_rows(axes, num_top, logits, *rest):
    """Per device, inside shard_map: the whole vocabulary of every row of its replica gathered,
    every row sampled."""
    if axes:
        logits = jax.lax.all_gather(logits, axes, axis=1, tiled=True)
    return _sample_padded(num_top, logits, *rest)


def _sample_own_rows(axes, t, num_top, logits, prompt_mask, output_counts, slot_ids, suppressed,
                     want_logprobs, inputs):
    """Per device, inside shard_map: its replica's rows with its share of the vocabulary in;
    its own rows sampled over the whole vocabulary; the replica's results out."""
    here = jax.lax.axis_index(axes)
    rows = logits.shape[0]
    own = -(-rows // t)  # rows this device samples
    # [rows, vocab / t] -> [rows / t, vocab]: row block i of every device's shard goes to
    # device i, the shards joined in device order (the vocabulary's order).
    logits = jax.lax.all_to_all(_pad_rows(logits, own * t, 0.0), axes, 0, 1, tiled=True)
    mine = _neutral_rows(own * t, prompt_mask, slot_ids, suppressed, want_logprobs, inputs,
                         lambda x: jax.lax.dynamic_slice_in_dim(x, here * own, own))
    mine_inputs = mine[3]
    tokens, chosen, top_ids, top_lps = _sample_padded(num_top, logits, prompt_mask,
                                                      output_counts, *mine[:3], mine_inputs)
    # Only the results travel: one gather of the integers, one of the floats.
    ints = jnp.concatenate([tokens[:, None], top_ids], axis=1)
    floats = jnp.concatenate([chosen[:, None], top_lps], axis=1)
    ints = jax.lax.all_gather(ints, axes, axis=0, tiled=True)[:rows]
    floats = jax.lax.all_gather(floats, axes, axis=0, tiled=True)[:rows]
    return ints[:, 0], floats[:, 0], ints[:, 1:], floats[:, 1:]
