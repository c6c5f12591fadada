"""Paged attention: the step's attention metadata and the op that writes and reads the KV cache.

Layers call `paged_attention(q, k, v, cache_layer, metadata)`; only this module knows the cache
layout (pages, block tables, slots). A platform kernel (Pallas paged attention on GPU, ragged
paged attention on TPU) can replace `_reference_attention` behind the same call without
touching a model; on CPU, decode rows over float32 pages attend in a C++ kernel
(`_decode_kernel_applies`), the rest in the XLA loop below.

The step is one flat, token-major batch. Per DP replica (the replicas' segments are
concatenated, so splitting the token axis over `dp` hands each device its own replica's part):

    tokens:  [ decode tokens (one per decoding sequence) | prefill query tiles ]
    rows:    [ one row per decode token                  | one row per tile    ]

A *query tile* holds `tile` consecutive prefill tokens of ONE sequence (a prefill chunk is split
into tiles, its last tile padded). Each row reads its own sequence's context through its block
table, `chunk_blocks` blocks per loop iteration, for only as many iterations as the longest
context in the step needs: the context read follows the real lengths, never `max_model_len`.
A decode row reads its context once for one query; a tile reads it once for `tile` queries.
(Tiles of one sequence re-read the same context: cheap next to the matmuls, and it keeps every
row the same shape. Decodes are not tiles: they would pay `tile` times the attention work.)

The reference op is plain XLA and runs per device inside `shard_map` (logical names, see
`jaxserve.sharding.shard_map_logical`): a replica's tokens only ever touch its own shard of the
pool, and under TP each device attends with its own heads. Block ids and slots in the metadata
are local to the replica's shard.

The row layout (`by_row_kind`), the chunked context reads (`read_chunk`) and the online softmax
(`online_softmax`) serve the latent-attention op too (`jaxserve/ops/latent_attention.py`).

Token trees (jaxserve/token_tree.py): a decode row may be a node of a speculative tree. Its
position (RoPE) is its depth past the sequence's last token, but it is written to its own KV
slot, and it sees the context before the tree plus the tree's slots whose bits its
`tree_mask` sets (its ancestors and itself): `tree_start` is the row's first tree slot. Rows
outside a tree have tree_start past any key (so only causality applies) and mask 0; a step
without trees carries no tree arrays at all (its programs are unchanged).

Quantized KV (jaxserve/kv_cache.py `KVFormat`): the op encodes this step's k, v into the pool's
format as it writes them (values plus a scale per token and head beside them) and decodes each
context chunk it reads into the compute dtype, so the rest of the step never sees the format.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import kv_cache
from jaxserve.ops import cpu_kernels
from jaxserve.sharding import active_num_devices, shard_map_logical

CONTEXT_CHUNK_TOKENS = 128  # context tokens read per loop iteration (rounded to whole blocks)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Built once per step on the host (`build_metadata`); every layer reads the same one."""

    positions: jax.Array  # i32[tokens]; -1 = padding
    slots: jax.Array  # i32[tokens]: cache slot each token's K/V is written to (block*bs + offset)
    block_tables: jax.Array  # i32[rows, table_width]: decode rows first, then query tiles
    context_lens: jax.Array  # i32[rows]: context tokens the row reads (0 = padding row)
    decode_rows: int = dataclasses.field(metadata=dict(static=True))  # per replica
    chunk_blocks: int = dataclasses.field(metadata=dict(static=True))
    # None: loop over as many chunks as this step needs (a dynamic trip count). An int: always
    # that many (a static loop, which reverse-mode autodiff supports; used in training).
    static_chunks: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    tree_start: jax.Array | None = None  # i32[rows]: the row's first tree slot (see above)
    tree_mask: jax.Array | None = None  # i32[rows]: tree slots (bits from tree_start) it sees


def metadata_axes(md: AttentionMetadata) -> AttentionMetadata:
    """The logical axes of each metadata array (same tree structure as `md`)."""
    tree = ("batch",) if md.tree_start is not None else None
    return dataclasses.replace(md, positions=("batch",), slots=("batch",),
                               block_tables=("batch", None), context_lens=("batch",),
                               tree_start=tree, tree_mask=tree)


def chunk_blocks_for(block_size: int) -> int:
    return max(1, CONTEXT_CHUNK_TOKENS // block_size)


def table_width(max_blocks_per_seq: int, block_size: int) -> int:
    """Block-table columns: every sequence's blocks, rounded up to whole context chunks."""
    cb = chunk_blocks_for(block_size)
    return math.ceil(max_blocks_per_seq / cb) * cb


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict[str, jax.Array],
                    md: AttentionMetadata, scale: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Write this step's k, v into the cache, then attend.

    All of the step's writes land before any row reads, so a row may read blocks that another
    row of the step wrote: a prefill chunk's later tiles read its earlier ones, and a scoring
    candidate reads its prompt's blocks (jaxserve/engine/scoring.py). A replacement kernel must
    keep that.

    q [tokens, q_heads, head_dim]; k, v [tokens, kv_heads, head_dim];
    cache {"k", "v"}: [kv_blocks, block_size, kv_heads, head_dim], and in a scaled format
    {"k_scale", "v_scale"}: [kv_blocks, block_size, kv_heads].
    Returns (out [tokens, q_heads, head_dim], the updated cache).
    """
    # a scale buffer has no head_dim axis
    page_axes = {name: PAGE_AXES[:pages.ndim] for name, pages in cache.items()}
    fn = shard_map_logical(
        lambda q, k, v, cache, md: _reference_attention(q, k, v, cache, md, scale),
        in_axes=(("batch", "q_heads", "head_dim"), ("batch", "kv_heads", "head_dim"),
                 ("batch", "kv_heads", "head_dim"), page_axes, metadata_axes(md)),
        out_axes=(("batch", "q_heads", "head_dim"), page_axes))
    return fn(q, k, v, cache, md)


PAGE_AXES = ("kv_blocks", None, "kv_heads", "head_dim")


def _write(pages: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    # Indexed by (block, offset), not through a token-major reshape of the pool: with one KV
    # head on a device, XLA:CPU laid that reshape out with the head axis moved and then copied
    # every layer's whole pool back, twice a step.
    bs = pages.shape[1]
    return pages.at[slots // bs, slots % bs].set(new.astype(pages.dtype))


def _reference_attention(q, k, v, cache, md: AttentionMetadata, scale: float):
    fmt = kv_cache.format_of(cache)
    stored = kv_cache.encode_buffers(fmt, {"k": k, "v": v})  # quantized on write
    pages = write_pages(cache, stored, md.slots)

    def attend(kind, queries, positions, tables, context_lens, tree):
        return _attend_rows(queries, positions, tables, context_lens, pages, fmt, scale, md,
                            tree)

    return by_row_kind(md, q, attend), pages


def write_pages(cache: dict, stored: dict, slots: jax.Array) -> dict:
    """Each token's stored buffers into its slot, in every page buffer."""
    return {name: _write(cache[name], new, slots) for name, new in stored.items()}


def by_row_kind(md: AttentionMetadata, q: jax.Array, attend) -> jax.Array:
    """Lay the step's token-major queries q [tokens, ...] out as rows and attend each kind:
    `attend(kind, q [rows, queries, ...], positions [rows, queries], tables, context_lens,
    tree)` -> [rows, queries, ...out], with kind "decode" (one query per row; `tree`: the rows'
    (tree_start, tree_mask) when the step has trees, else None) or "prefill" (query tiles; tree
    None).
    Returns the outputs token-major again, [tokens, ...out]."""
    tokens = q.shape[0]
    rows, d = md.block_tables.shape[0], md.decode_rows
    parts = []
    tree = (md.tree_start, md.tree_mask) if md.tree_start is not None else None
    if d:
        parts.append(attend("decode", q[:d, None], md.positions[:d, None], md.block_tables[:d],
                            md.context_lens[:d], tree and (tree[0][:d], tree[1][:d])))
    if rows > d:
        tile = (tokens - d) // (rows - d)
        parts.append(attend("prefill", q[d:].reshape((rows - d, tile) + q.shape[1:]),
                            md.positions[d:].reshape(rows - d, tile), md.block_tables[d:],
                            md.context_lens[d:], None))
    return jnp.concatenate([p.reshape((-1,) + p.shape[2:]) for p in parts], axis=0)


def read_chunk(pages, fmt, name: str, ids: jax.Array, dtype) -> jax.Array:
    """Blocks `ids` [rows, chunk_blocks] of one page buffer, decoded into `dtype`:
    [rows, chunk_blocks * block_size, ...per-token shape]."""
    chunk_pages = {n: gather_blocks(pages[n], ids)
                   for n in (name, name + kv_cache.SCALE_SUFFIX) if n in pages}
    out = kv_cache.decode_buffer(fmt, chunk_pages, name, dtype)
    return out.reshape((ids.shape[0], -1) + out.shape[3:])


def gather_blocks(pages: jax.Array, ids: jax.Array) -> jax.Array:
    """`pages[ids]`: whole blocks of one page buffer, the one place that decides how. On CPU, a
    copy kernel where it builds (`ops.cpu_kernels`): XLA:CPU's gather computes each element's
    source in a scalar loop, and up to half of a decode row's attention went to it (one layer
    of the 55M model, one decode row: 167 -> 72 us at context 100, 230 -> 157 at 192, same
    bytes; BENCHMARKS.md, "CPU kernels against llama.cpp"). Elsewhere XLA's gather."""
    if jax.default_backend() == "cpu" and cpu_kernels.available():
        return _copied_blocks(pages, ids)
    return pages[ids]


@jax.custom_vjp
def _copied_blocks(pages: jax.Array, ids: jax.Array) -> jax.Array:
    return cpu_kernels.gather_blocks(pages, ids)


def _copied_blocks_fwd(pages, ids):
    return cpu_kernels.gather_blocks(pages, ids), (ids, pages)


def _copied_blocks_bwd(residuals, grad):
    """What autodiff gives `pages[ids]` (training differentiates through the pool): the
    gradient added back into each block read."""
    ids, pages = residuals
    return jnp.zeros_like(pages).at[ids].add(grad.astype(pages.dtype)), None


_copied_blocks.defvjp(_copied_blocks_fwd, _copied_blocks_bwd)


def online_softmax(chunk_scores, positions, context_lens, md: AttentionMetadata, chunk: int,
                   acc_shape: tuple[int, ...], tree=None) -> jax.Array:
    """Softmax-weighted sums over each row's context, one chunk of `chunk` tokens at a time,
    causal by position (a tree node's row: by its tree mask, `_visible`). `chunk_scores(j)` gives context chunk j's (scaled float32 scores
    [rows, *heads, queries, chunk], and `weigh(p)`: the chunk's values weighted by p, float32
    [rows, *heads, queries, width]); `acc_shape` is that of the result."""
    def body(j, carry):
        m, l, acc = carry  # acc_shape less its last dim (acc: acc_shape), float32
        s, weigh = chunk_scores(j)
        key_pos = j * chunk + jnp.arange(chunk)
        visible = _visible(key_pos, positions, tree)  # [rows, queries, chunk]
        visible = visible.reshape(visible.shape[:1] + (1,) * (s.ndim - 3) + visible.shape[1:])
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(m - m_safe)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + weigh(p)
        return m_new, l, acc

    init = (jnp.full(acc_shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(acc_shape[:-1], jnp.float32), jnp.zeros(acc_shape, jnp.float32))
    if md.static_chunks is not None:
        num_chunks = md.static_chunks
    else:
        num_chunks = (jnp.max(context_lens) + chunk - 1) // chunk
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding rows: 0, not NaN


def chunk_ids(tables: jax.Array, j, md: AttentionMetadata) -> jax.Array:
    """Block ids of context chunk j of each row: [rows, chunk_blocks]."""
    cb = md.chunk_blocks
    return jax.lax.dynamic_slice_in_dim(tables, j * cb, cb, axis=1)


def _visible(key_pos, positions, tree):
    """[rows, queries, chunk]: which keys each query sees (causal by position; a tree node:
    the context before its tree, and its ancestors' and its own slots)."""
    causal = key_pos[None, None, :] <= positions[:, :, None]
    if tree is None:
        return causal
    start, mask = tree
    offset = key_pos[None, :] - start[:, None]  # [rows, chunk]
    in_tree = (offset >= 0) & (offset < 32)
    bit = (mask[:, None] >> jnp.clip(offset, 0, 31)) & 1
    seen = (offset < 0)[:, None, :] & causal | (in_tree & (bit == 1))[:, None, :]
    return seen


def _decode_kernel_applies(q, pages, fmt, md: AttentionMetadata, tree) -> bool:
    """Whether decode rows attend in the CPU kernel (`cpu_kernels.decode_attention`), the one
    place this is decided: one float32 query per row, float32 pages, no token tree, a dynamic
    chunk loop (not training's static one), on CPU where the kernels build. XLA's loop gathers
    every chunk of blocks into a copy and transposes it for its dots: at batch 32 of the 55M
    model that was ~16 of the float32 decode step's ~73 thread-ms (BENCHMARKS.md, "A decode
    attention kernel"). Elsewhere (GPU, quantized KV, trees, prefill tiles) XLA's loop below."""
    _, nq, heads, head_dim = q.shape
    kv_heads = pages["k"].shape[2]
    return (nq == 1 and tree is None and md.static_chunks is None and not fmt.scaled
            and q.dtype == jnp.float32 and pages["k"].dtype == jnp.float32
            and heads // kv_heads <= cpu_kernels.ATTENTION_MAX_GROUP
            and head_dim <= cpu_kernels.ATTENTION_MAX_HEAD_DIM
            and jax.default_backend() == "cpu" and cpu_kernels.available())


def _attend_rows(q, positions, tables, context_lens, pages, fmt, scale, md, tree=None):
    """Each row's queries [rows, queries, q_heads, head_dim] attend to the row's context, causally
    by position (or by its tree mask: `tree` = (tree_start, tree_mask) per row), with an online
    softmax over chunks of `chunk_blocks` blocks."""
    rows, nq, heads, head_dim = q.shape
    _, bs, kv_heads, _ = pages["k"].shape
    group = heads // kv_heads
    if _decode_kernel_applies(q, pages, fmt, md, tree):
        out = cpu_kernels.decode_attention(q[:, 0], pages["k"], pages["v"], tables,
                                           positions[:, 0], context_lens, scale,
                                           threads=active_num_devices() == 1)
        return out[:, None]
    q = q.reshape(rows, nq, kv_heads, group, head_dim)

    def chunk_scores(j):
        ids = chunk_ids(tables, j, md)
        keys = read_chunk(pages, fmt, "k", ids, q.dtype)  # [rows, chunk, kv_heads, head_dim]
        values = read_chunk(pages, fmt, "v", ids, q.dtype)
        s = jnp.einsum("rqkgd,rckd->rkgqc", q, keys, preferred_element_type=jnp.float32) * scale
        return s, lambda p: jnp.einsum("rkgqc,rckd->rkgqd", p.astype(values.dtype), values,
                                       preferred_element_type=jnp.float32)

    out = online_softmax(chunk_scores, positions, context_lens, md, md.chunk_blocks * bs,
                         (rows, kv_heads, group, nq, head_dim), tree)
    # [rows, kv_heads, group, queries, head_dim] -> [rows, queries, q_heads, head_dim]
    return out.transpose(0, 3, 1, 2, 4).reshape(rows, nq, heads, head_dim).astype(q.dtype)


# ---- host side: the metadata of one step, from per-row descriptions ----

@dataclasses.dataclass
class ChunkRow:
    """One sequence's tokens in a step (a decode token, or a prefill chunk) on one replica."""

    start: int  # position of the first token
    length: int
    block_table: list[int]  # local block ids covering positions [0, start + length)
    # a tree node (a one-token decode row): (its KV slot index, the tree's first slot index,
    # its ancestor mask); see the module docstring
    tree: tuple[int, int, int] | None = None


def build_metadata(replicas: list[tuple[list[ChunkRow], list[ChunkRow]]], decode_rows: int,
                   prefill_tokens: int, tile: int, block_size: int, width: int,
                   static_chunks: int | None = None, trees: bool = False
                   ) -> tuple[AttentionMetadata, np.ndarray]:
    """Lay out each replica's (decodes, prefill chunks) in the step's buckets.

    decode_rows / prefill_tokens: per-replica bucket sizes (prefill_tokens a multiple of tile).
    Returns the metadata (numpy leaves) and, per replica and row, the flat index of each chunk's
    first token: [replicas, decode_rows + prefill chunks] (-1 = none); callers place their
    token ids with it. trees: the metadata carries tree arrays (decode rows may be tree nodes).
    """
    tiles = prefill_tokens // tile
    tokens = decode_rows + prefill_tokens
    rows = decode_rows + tiles
    n = len(replicas)
    positions = np.full((n, tokens), -1, np.int32)
    tables = np.zeros((n, rows, width), np.int32)
    context = np.zeros((n, rows), np.int32)
    write = np.full((n, tokens), -1, np.int32)  # KV slot index of each token (-1: padding)
    tree_start = np.full((n, rows), np.iinfo(np.int32).max, np.int32)
    tree_mask = np.zeros((n, rows), np.int32)
    starts = []
    for r, (decodes, chunks) in enumerate(replicas):
        if len(decodes) > decode_rows:
            raise ValueError(f"{len(decodes)} decodes do not fit {decode_rows} decode rows")
        first = []
        for i, row in enumerate(decodes):
            positions[r, i] = row.start
            tables[r, i, :len(row.block_table)] = row.block_table
            write[r, i] = row.start if row.tree is None else row.tree[0]
            context[r, i] = write[r, i] + 1
            if row.tree is not None:
                tree_start[r, i], tree_mask[r, i] = row.tree[1:]
            first.append(i)
        t = decode_rows  # next free token
        for row in chunks:
            n_tiles = -(-row.length // tile)
            if t + n_tiles * tile > tokens:
                raise ValueError(f"prefill chunks need more than {prefill_tokens} tokens")
            positions[r, t:t + row.length] = np.arange(row.start, row.start + row.length)
            write[r, t:t + row.length] = positions[r, t:t + row.length]
            for k in range(n_tiles):
                tr = decode_rows + (t - decode_rows) // tile + k
                tables[r, tr, :len(row.block_table)] = row.block_table
                context[r, tr] = row.start + min(row.length, (k + 1) * tile)
            first.append(t)
            t += n_tiles * tile
        starts.append(first)
    # slot of every token; padding (position -1) writes to the null block
    pos = np.maximum(write, 0)
    token_row = np.concatenate([np.arange(decode_rows),
                                decode_rows + np.arange(prefill_tokens) // tile])
    block = tables[np.arange(n)[:, None], token_row[None, :], pos // block_size]
    slots = np.where(write >= 0, block * block_size + pos % block_size, 0).astype(np.int32)
    width_starts = max((len(s) for s in starts), default=0)
    first_index = np.full((n, max(width_starts, 1)), -1, np.int32)
    for r, s in enumerate(starts):
        first_index[r, :len(s)] = s
    md = AttentionMetadata(positions=positions.reshape(-1), slots=slots.reshape(-1),
                           block_tables=tables.reshape(n * rows, width),
                           context_lens=context.reshape(-1), decode_rows=decode_rows,
                           chunk_blocks=chunk_blocks_for(block_size), static_chunks=static_chunks,
                           tree_start=tree_start.reshape(-1) if trees else None,
                           tree_mask=tree_mask.reshape(-1) if trees else None)
    return md, first_index
