"""Where the per-sequence slot state lives on a mesh, and the per-replica code that touches it.

The slot state (`SlotState` in runner.py: last sampled token, prompt mask, output counts) is
indexed by slot. The engine numbers slots globally: DP replica r owns slots r*S .. r*S + S - 1
(S slots per replica) and padding rows name one trash slot, R*S. On the device the slot axis is
split over the replicas like `batch`: replica r's shard holds its own S slots and a trash row
of its own (S + 1 rows), so the [slots, vocab] penalty state never crosses replicas. Left to
itself, XLA's partitioner would keep that state replicated and all-reduce its updates every
step (R x [slots, vocab], tens of MB at dp=8); here every read and write runs per replica under
shard_map, with the global ids turned into rows of the replica's own shard (`local_rows`).

A replica only ever sees its own sequences' ids (the step's rows are laid out replica after
replica) and the trash id; anything outside its range lands on its trash row.
This module holds no request objects and does no host work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxserve.sharding import Layout, axis_index_logical, shard_map_logical

_ROWS = ("batch",)  # the slot axis splits like a step's sequences: one shard per replica
_ROWS_VOCAB = ("batch", None)


def rows_per_replica(num_slots: int, replicas: int) -> int:
    """Rows of one replica's shard: its slots (num_slots / replicas) and its trash row."""
    if num_slots % replicas:
        raise ValueError(f"{num_slots} slots do not split evenly over {replicas} DP replicas")
    return num_slots // replicas + 1


def shard_row(slot: int, slots_per_replica: int) -> int:
    """The row of the whole slot-state array that holds this (global) slot."""
    replica, local = divmod(slot, slots_per_replica)
    return replica * (slots_per_replica + 1) + local


def slot_sharding(layout: Layout, shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of a slot-state array (leading dim: the replicas' shards, one after
    another)."""
    return layout.sharding(_ROWS + (None,) * (len(shape) - 1), shape, "slot state")


def local_rows(slot_ids: jax.Array, num_rows: int) -> jax.Array:
    """Global slot ids -> rows of this replica's shard of `num_rows` rows (inside shard_map, or
    on one device); ids of no slot of this replica (the trash id) -> its trash row."""
    slots = num_rows - 1
    local = slot_ids - axis_index_logical("batch") * slots
    return jnp.where((local >= 0) & (local < slots), local, slots)


def slot_tokens(layout: Layout, last_token: jax.Array, token_slot: jax.Array,
                tokens: jax.Array) -> jax.Array:
    """The step's input tokens [tokens], a decode token taken from its slot's last sampled
    token (token_slot >= 0) instead of `tokens`."""
    def per_replica(last_token, token_slot, tokens):
        from_slot = last_token[local_rows(token_slot, last_token.shape[0])]
        return jnp.where(token_slot >= 0, from_slot, tokens)

    with layout.activate():
        return shard_map_logical(per_replica, (_ROWS,) * 3, _ROWS)(last_token, token_slot,
                                                                    tokens)


def record_samples(layout: Layout, last_token: jax.Array, output_counts: jax.Array,
                   slot_ids: jax.Array, sample: jax.Array,
                   tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each sampling row's token becomes its slot's last token and is counted among its
    outputs (rows that do not sample write the trash row)."""
    def per_replica(last_token, output_counts, slot_ids, sample, tokens):
        rows = local_rows(slot_ids, last_token.shape[0])
        target = jnp.where(sample, rows, last_token.shape[0] - 1)
        return (last_token.at[target].set(tokens),
                output_counts.at[target, tokens].add(1))

    with layout.activate():
        return shard_map_logical(per_replica, (_ROWS, _ROWS_VOCAB) + (_ROWS,) * 3,
                                 (_ROWS, _ROWS_VOCAB))(last_token, output_counts, slot_ids,
                                                       sample, tokens)


def set_rows(layout: Layout, prompt_mask: jax.Array, output_counts: jax.Array,
             slots: jax.Array, mask_rows: jax.Array,
             count_rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slots i32[k] (global ids, any replica's) start with mask_rows bool[k, vocab] and
    count_rows i32[k, vocab]: every replica takes the rows of its own slots."""
    def per_replica(prompt_mask, output_counts, slots, mask_rows, count_rows):
        rows = local_rows(slots, prompt_mask.shape[0])
        return prompt_mask.at[rows].set(mask_rows), output_counts.at[rows].set(count_rows)

    with layout.activate():
        whole = ((None,), (None, None), (None, None))  # every replica sees every row
        return shard_map_logical(per_replica, (_ROWS_VOCAB, _ROWS_VOCAB) + whole,
                                 (_ROWS_VOCAB, _ROWS_VOCAB))(prompt_mask, output_counts, slots,
                                                             mask_rows, count_rows)
