"""Default KV pool size and max_model_len, from the model and the machine.

The pool is updated in place by every program, so its size costs memory, never step time. The
default is room for `max_num_seqs` full-length sequences per DP replica, capped by a memory
budget per device:

- devices that report their memory (GPU, TPU): `kv_memory_fraction` (default 0.9) of what is
  free after the weights are loaded;
- the CPU, which reports nothing: a quarter of the host's available memory, split over the
  host's devices (simulated devices share one memory).

When the user did not fix `max_model_len`, it is lowered to what the pool holds for one
sequence, so a long-context model does not fail to start on a small machine; when they did and
it does not fit, that is an error naming both numbers.
"""

from __future__ import annotations

import math
import os

import jax

from jaxserve.kv_cache import CacheSpec
from jaxserve.sharding import Layout

DEVICE_FRACTION = 0.9
HOST_FRACTION = 0.25


def bytes_per_block_per_device(spec: CacheSpec, block_size: int, layout: Layout) -> float:
    """Bytes one block takes on one device (the rules decide how the pool splits)."""
    total = 0.0
    for name, buf in spec.buffers.items():
        shape = spec.pool_shape(name, 1, block_size)
        # a block's own split: every axis but kv_blocks (which places blocks, not bytes)
        axes = tuple(None if a == "kv_blocks" else a for a in spec.pool_axes(name))
        split = layout.split_factor(layout.spec(axes, shape, "KV cache"))
        total += spec.num_layers * block_size * buf.nbytes_per_token() / split
    return total


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget_bytes(layout: Layout, fraction: float | None) -> int:
    """Bytes of KV pool per device."""
    if fraction is not None and (isinstance(fraction, bool) or
                                 not isinstance(fraction, (int, float)) or not 0 < fraction < 1):
        raise ValueError(f"kv_memory_fraction must be in (0, 1), got {fraction!r}")
    # one of this process's own devices: another process's cannot be asked (multi-host)
    device = next(d for d in layout.mesh.devices.flat if d.process_index == jax.process_index())
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return int(free * (fraction or DEVICE_FRACTION))
    local = sum(1 for d in layout.mesh.devices.flat if d.process_index == device.process_index)
    return int(_host_available_bytes() * (fraction or HOST_FRACTION) / max(local, 1))


def pool_blocks(budget: int, per_block: float, block_size: int, max_num_seqs: int,
                max_model_len: int, max_model_len_given: bool) -> tuple[int, int]:
    """(blocks per replica, max_model_len)."""
    per_seq = math.ceil(max_model_len / block_size)
    fits = int(budget // per_block)
    blocks = min(1 + max_num_seqs * per_seq, fits)
    if blocks - 1 < per_seq:
        if max_model_len_given or blocks < 2:
            raise ValueError(
                f"the KV pool fits {max(blocks - 1, 0)} blocks of {block_size} tokens per device "
                f"({budget / 2**20:.0f} MiB), less than one sequence of max_model_len "
                f"{max_model_len} needs ({per_seq} blocks): lower max_model_len or give more "
                f"memory (kv_memory_fraction / kv_blocks)")
        max_model_len = (blocks - 1) * block_size
    return blocks, max_model_len
