"""One DP replica's KV blocks: reference counts, the prefix cache, least-recently-used eviction.

Design (this file owns it):
- A *full* block is named by a hash chained over its tokens and its predecessor's hash, seeded
  with the identity of what writes the KV (model, weights' dtype, layout): equal hashes mean equal
  KV, so a sequence whose prompt starts with the same tokens as an earlier one can reuse those
  blocks instead of computing them. sha256 keeps the names equal across processes and hosts
  (multi-host runs must take identical decisions). A partly filled block has no name and is never
  shared through the cache: two continuations of one prefix diverge inside it.
- Blocks are reference counted. Sequences that share a prefix hold the same block ids; `n > 1`
  samples of one prompt share the prompt's full blocks the same way (the partly filled last one
  is copied, see Scheduler). A block whose count drops to zero keeps its name and content and
  waits, least recently released first, until the pool needs it (`allocate` evicts then). So a
  finished sequence's blocks stay cached, and `num_free` counts those evictable blocks as free.
- A block is named when its KV has been written by a dispatched step and its tokens are known on
  the host (generated tokens are known one step late). Steps run on the device in dispatch order,
  so any later step that reads a named block sees its content.
- Freed blocks are reused lowest id first and evicted in release order: deterministic.

Block 0 is the null block (see jaxserve/kv_cache.py) and is never handed out. This module never
touches the device: it only decides which ids hold what.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from jaxserve.engine.id_pool import IdPool

BlockHash = bytes


def identity_hash(identity: str) -> BlockHash:
    """The parent hash of a sequence's first block: what writes the KV (see LLM)."""
    return hashlib.sha256(identity.encode("utf-8")).digest()


def chain_hashes(tokens, block_size: int, parent: BlockHash) -> list[BlockHash]:
    """The hashes of the full blocks of `tokens`, each chained to `parent` (the hash of the block
    before the first one)."""
    ids = np.asarray(tokens, np.int64)
    out = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + ids[start:start + block_size].tobytes()).digest()
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.block_size = block_size
        self.caching = caching
        self._free = IdPool(range(1, num_blocks))  # block 0 is the null block
        self.capacity = self._free.capacity
        self._refs: dict[int, int] = {}  # referenced blocks -> count
        self._by_hash: dict[BlockHash, int] = {}  # named blocks
        self._hash_of: dict[int, BlockHash] = {}
        # named blocks nobody references, least recently released first: evicted in this order
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.num_evictions = 0

    # ---- sizes ----
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: never used, or cached and evictable."""
        return self._free.num_free + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence references."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Cached blocks nobody references (their content waits for a prefix hit)."""
        return len(self._evictable)

    def num_evictable_among(self, blocks: list[int]) -> int:
        """How many of `blocks` are cached and unreferenced (sharing them makes them unfree)."""
        return sum(block in self._evictable for block in blocks)

    # ---- references ----
    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with one reference each; evicts cached blocks when none is free."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        fresh = self._free.allocate(min(n, self._free.num_free))
        while len(fresh) < n:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self.num_evictions += 1
            fresh.append(block)
        for block in fresh:
            self._refs[block] = 1
        return fresh

    def share(self, blocks: list[int]) -> None:
        """One more reference on each block (referenced or cached)."""
        for block in blocks:
            if block in self._refs:
                self._refs[block] += 1
            else:
                del self._evictable[block]
                self._refs[block] = 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block. Unreferenced named blocks stay cached; the
        sequence's last blocks are released first, so they are evicted before its prefix."""
        for block in reversed(blocks):
            count = self._refs[block] - 1
            if count:
                self._refs[block] = count
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.free([block])

    # ---- the prefix cache ----
    def cached_prefix(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest run of `hashes` from the start (no reference taken)."""
        out = []
        if self.caching:
            for h in hashes:
                block = self._by_hash.get(h)
                if block is None:
                    break
                out.append(block)
        return out

    def name(self, block: int, block_hash: BlockHash) -> None:
        """The referenced `block` now holds the full block `block_hash`. When another block
        already holds it (two sequences computed it at once), this one stays unnamed."""
        if self.caching and block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def clear(self) -> None:
        """Forget every name (the pool's content is about to be overwritten). Cached blocks
        become free; referenced blocks keep their references."""
        for block in self._evictable:
            self._free.free([block])
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()

    def check(self) -> None:
        """Every block is exactly one of free, referenced or cached (for tests)."""
        free = self._free.free_ids()
        referenced, cached = set(self._refs), set(self._evictable)
        assert not (free & referenced or free & cached or referenced & cached), "block in two sets"
        assert len(free) + len(referenced) + len(cached) == self.capacity, "blocks lost"
        assert set(self._hash_of) == set(self._by_hash.values()), "names out of step"
        assert cached <= set(self._hash_of), "an unnamed block is cached"
