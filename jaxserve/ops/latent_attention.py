"""Latent attention (MLA, DeepSeek-V2/V3): the op that writes each token's latent into the paged
cache and attends over it. Like `jaxserve.ops.attention` (whose metadata, row layout, chunked
context reads and online softmax it shares), it is the only code that knows the cache layout.

The cache (the model's spec, `models/deepseek.py` `latent_cache_spec`): per token and layer a
latent `c_kv` [kv_lora_rank] (logical axis `latent`) and one rope key `k_pe` [qk_rope_head_dim]
shared by every head; no head axis. Head h's key is [c_kv @ W_UK[:, h], k_pe] and its value
c_kv @ W_UV[:, h] (W_UK [latent, heads, qk_nope], W_UV [latent, heads, v]: kv_b_proj, split).
Quantized formats (`KVFormat`) apply to both buffers: one scale per token per buffer.

Two ways to attend, the same numbers up to float rounding (tests/test_deepseek.py holds them to
1e-5 of each other):

- expanded: each context chunk's latents are up-projected into per-head keys and values, then
  ordinary attention. Per chunk of C context tokens and a row of T queries, H heads:
  C*H*L*(nope+v) multiply-adds to expand (shared by the row's queries) plus T*C*H*(nope+rope+v).
- absorbed: W_UK is folded into the query (q_nope @ W_UK^T: [heads, latent]) so scores are
  taken against the latent directly, and W_UV into the output (the softmax-weighted sum of
  latents goes through W_UV once per query): T*C*H*(2L+rope), nothing per context token alone.

Decision (`absorbs`): a row absorbs when that costs no more multiply-adds per context chunk,
T*(2L - nope - v) <= L*(nope + v). Decode rows (T = 1) always absorb: expanding there pays the
latent's up-projection of every context token for one query. Prefill tiles absorb up to
T = L*(nope+v) / (2L-nope-v): ~170 queries per row at DeepSeek-V3's sizes (L=512, nope=v=128),
32 at the test models' (L=32, nope=v=16). The engine's prefill tiles are 16 queries
(`engine/step_builder.QUERY_TILE`), so today every row absorbs; the expanded path serves rows
of more queries and is the reference absorption is tested against. The choice is made per row
kind when the step is traced (decode rows and prefill tiles are separate row groups).
Measured on XLA:CPU (the reference op, 16 heads of V3's sizes, 1024 context tokens per row, a
shared 2-core machine): 4 decode rows absorbed 66 ms, expanded 518 ms; 2 rows of 16 prefill
queries 22 vs 215 ms; 2 rows of 256 queries 787 vs 508 ms (expanded wins past the crossover).

Split latent (TPLA, arXiv 2508.15881; `config.latent_attention`). Under "mla" the rules keep the
latent whole on every tensor-parallel device and split the heads: each device caches and reads
the whole latent of every token, so TP does not shrink the cache. "tpla" splits the latent over
the devices of `latent` (rules `tpla.yaml`) and gives each device every head: device i caches
c_kv[:, S_i] and attends with all heads over it, its scores
(slices * q_lat[S_i] . c_kv[S_i] + q_pe . k_pe) * scale, a softmax of its own, and its output
through W_UV[S_i]; the devices' outputs are summed. The rope key (64 of DeepSeek-V3's 576 dims
per token) stays whole on every device. What the paper fixes (arXiv 2508.15881v2, abstract and
Figure 1): the latent and each head's input dimension partitioned over the devices, every head
attending on every device over that device's shard, independently, the results combined by an
all-reduce, and an orthogonal transform (Hadamard, PCA) applied before slicing; prefill may stay
MLA. How a shard's score is scaled, and where the rope key lives, are not stated there. Ours:
the rope key whole on every device, and the latent part of a slice's score multiplied by the
number of slices, so that a split whose slices agree is exact and the softmax keeps the
temperature of the whole score (the transform folded into the weights,
`ops/latent_transform.py`, makes the slices agree more); at one slice TPLA is MLA. Measured on
the seeded V3 test model (random prompts of 40 and 90 tokens, max / mean |logit error| over the
max |logit|): scaled, Hadamard takes the split from 5.4 / 0.15 % to 1.0 / 0.12 % at tp=2 and
from 5.6 / 0.32 % to 2.3 / 0.30 % at tp=4; unscaled, the max is 3.3 % (mean 0.08-0.10 %) with
or without Hadamard at either tp: the temperature change dominates and the transform has
nothing to fix. "tpla-decode" keeps the same cache layout and attends prefill tiles exactly
(the latent scores summed over the slices before the softmax: one all-reduce of scores per
context chunk) and decode rows per slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve import kv_cache
from jaxserve.config import LATENT_ATTENTIONS
from jaxserve.ops.attention import (AttentionMetadata, by_row_kind, chunk_ids, metadata_axes,
                                    online_softmax, read_chunk, write_pages)
from jaxserve.sharding import axis_size_logical, psum_logical, shard_map_logical

LATENT_PAGE_AXES = {"c_kv": ("kv_blocks", None, "latent"), "k_pe": ("kv_blocks", None, None)}
SPLITS = LATENT_ATTENTIONS


def absorbs(queries: int, latent: int, nope: int, v: int) -> bool:
    """Whether a row of `queries` queries attends absorbed (see the module docstring)."""
    return queries * (2 * latent - nope - v) <= latent * (nope + v)


def latent_attention(q_nope: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array,
                     w_uk: jax.Array, w_uv: jax.Array, cache: dict[str, jax.Array],
                     md: AttentionMetadata, scale: float, absorb: bool | None = None,
                     split: str = "mla") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Write this step's latents into the cache, then attend (every write before any read, as
    `paged_attention`).

    q_nope [tokens, q_heads, qk_nope], q_pe [tokens, q_heads, qk_rope] (rotated);
    c_kv [tokens, latent], k_pe [tokens, qk_rope] (rotated); w_uk [latent, q_heads, qk_nope],
    w_uv [latent, q_heads, v]; cache {"c_kv", "k_pe"} pages (and their scales in a scaled
    format). `absorb`: None decides per row kind (`absorbs`); True / False forces one way.
    `split` (`config.latent_attention`): "mla" splits the heads over `q_heads`' devices, each
    holding the whole latent; "tpla" / "tpla-decode" give every device all heads and its slice
    of the latent (see "Split latent" above). Returns (out [tokens, q_heads, v], the cache).
    """
    if split not in SPLITS:
        raise ValueError(f"attention must be one of {', '.join(SPLITS)}, got {split!r}")
    heads = "q_heads" if split == "mla" else None
    query_axes, up_axes = ("batch", heads, "head_dim"), ("latent", heads, "head_dim")
    page_axes = {name: LATENT_PAGE_AXES[name.removesuffix(kv_cache.SCALE_SUFFIX)][:pages.ndim]
                 for name, pages in cache.items()}
    fn = shard_map_logical(
        lambda *args: _latent_local(*args, scale=scale, absorb=absorb, split=split),
        in_axes=(query_axes, query_axes, ("batch", "latent"), ("batch", None), up_axes, up_axes,
                 page_axes, metadata_axes(md)),
        out_axes=(query_axes, page_axes))
    return fn(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, cache, md)


def _latent_local(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, cache, md: AttentionMetadata, *,
                  scale: float, absorb: bool | None, split: str):
    fmt = kv_cache.format_of(cache)
    stored = kv_cache.encode_buffers(fmt, {"c_kv": c_kv, "k_pe": k_pe})  # quantized on write
    pages = write_pages(cache, stored, md.slots)
    chunk = md.chunk_blocks * pages["c_kv"].shape[1]
    nope = q_nope.shape[-1]
    latent, v = w_uv.shape[0], w_uv.shape[-1]

    def attend(kind, q, positions, tables, context_lens, tree):
        absorbed = absorbs(q.shape[1], latent, nope, v) if absorb is None else absorb
        context = _Context(pages, fmt, tables, md, q.dtype, tree)
        args = (q[..., :nope], q[..., nope:], positions, context_lens, context, w_uk, w_uv,
                scale, md, chunk)
        if split != "mla":  # a split latent attends absorbed: its keys never exist whole
            return _absorbed(*args, per_shard=split == "tpla" or kind == "decode")
        return _absorbed(*args) if absorbed else _expanded(*args)

    return by_row_kind(md, jnp.concatenate([q_nope, q_pe], axis=-1), attend), pages


class _Context:
    """Reads one context chunk of a row group: its latents, rope keys and rope-part scores."""

    def __init__(self, pages, fmt, tables, md, dtype, tree=None):
        self.pages, self.fmt, self.tables, self.md, self.dtype = pages, fmt, tables, md, dtype
        self.tree = tree  # the rows' token-tree masks, or None (`attention.by_row_kind`)

    def read(self, j, q_pe):
        """-> (latents [rows, chunk, latent], rope scores [rows, heads, queries, chunk])."""
        ids = chunk_ids(self.tables, j, self.md)
        latents = read_chunk(self.pages, self.fmt, "c_kv", ids, self.dtype)
        rope_keys = read_chunk(self.pages, self.fmt, "k_pe", ids, self.dtype)
        rope_scores = jnp.einsum("rqhp,rcp->rhqc", q_pe, rope_keys,
                                 preferred_element_type=jnp.float32)
        return latents, rope_scores


def _absorbed(q_nope, q_pe, positions, context_lens, context: _Context, w_uk, w_uv, scale, md,
              chunk, per_shard: bool = False):
    """On a split latent (this device's slice of it), the latent part of each score is summed
    over the slices (exact), or, `per_shard`, this slice's part times the number of slices
    (TPLA); the outputs of the slices are summed. Unsplit, both are plain MLA."""
    rows, nq, heads, _ = q_nope.shape
    q_latent = jnp.einsum("rqhn,lhn->rqhl", q_nope, w_uk)  # W_UK folded into the query
    slices = axis_size_logical("latent")

    def chunk_scores(j):
        latents, rope_scores = context.read(j, q_pe)
        latent_scores = jnp.einsum("rqhl,rcl->rhqc", q_latent, latents,
                                   preferred_element_type=jnp.float32)
        if per_shard and slices > 1:  # (one slice: the very program "mla" compiles)
            latent_scores = latent_scores * slices
        elif not per_shard:
            latent_scores = psum_logical(latent_scores, "latent")
        s = (latent_scores + rope_scores) * scale
        return s, lambda p: jnp.einsum("rhqc,rcl->rhql", p.astype(latents.dtype), latents,
                                       preferred_element_type=jnp.float32)

    out = online_softmax(chunk_scores, positions, context_lens, md, chunk,
                         (rows, heads, nq, w_uv.shape[0]), context.tree)
    # the weighted latents through W_UV: [rows, heads, queries, latent] -> [rows, q, heads, v]
    return psum_logical(jnp.einsum("rhql,lhv->rqhv", out.astype(q_nope.dtype), w_uv), "latent")


def _expanded(q_nope, q_pe, positions, context_lens, context: _Context, w_uk, w_uv, scale, md,
              chunk):
    rows, nq, heads, _ = q_nope.shape

    def chunk_scores(j):
        latents, rope_scores = context.read(j, q_pe)
        keys = jnp.einsum("rcl,lhn->rchn", latents, w_uk)  # per-head keys and values
        values = jnp.einsum("rcl,lhv->rchv", latents, w_uv)
        s = (jnp.einsum("rqhn,rchn->rhqc", q_nope, keys, preferred_element_type=jnp.float32)
             + rope_scores) * scale
        return s, lambda p: jnp.einsum("rhqc,rchv->rhqv", p.astype(values.dtype), values,
                                       preferred_element_type=jnp.float32)

    out = online_softmax(chunk_scores, positions, context_lens, md, chunk,
                         (rows, heads, nq, w_uv.shape[-1]), context.tree)
    return out.transpose(0, 2, 1, 3).astype(q_nope.dtype)  # [rows, queries, heads, v]
