"""Host-side bookkeeping of the paged KV pool's blocks and of the device's sequence slots.

Block 0 is the null block (see jaxserve/kv_cache.py) and is never handed out. Freed blocks are
reused lowest-first so runs are deterministic (multi-host runs need identical decisions).
"""

from __future__ import annotations

import heapq


class IdPool:
    """A set of free integer ids, allocated smallest-first."""

    def __init__(self, ids: range):
        self._free = list(ids)
        heapq.heapify(self._free)
        self.capacity = len(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} ids, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        for i in ids:
            heapq.heappush(self._free, i)


class BlockAllocator(IdPool):
    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(range(1, num_blocks))  # block 0 is the null block
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
