"""Free integer ids handed out smallest first: the device's sequence slots, the KV pool's blocks.

Freed ids are reused lowest-first so runs are deterministic (multi-host runs need identical
decisions). Reference counts and the prefix cache live on top, in block_pool.py.
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

    def free_ids(self) -> set[int]:
        return set(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} ids, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        for i in ids:
            heapq.heappush(self._free, i)
