"""The KV handoff between a prefill engine and a decode engine: one sequence's cache, moved as an
object with one owner at a time and a lifecycle.

Design (this file owns it):
- A handoff is created when the prefill engine applies a sequence's first token (the
  sequence is then `Status.HANDOFF` there: it holds its blocks, no slot). It moves through
      READY -> RESERVED -> TRANSFERRED -> CONVERTED -> COMMITTED
  READY: the prefill engine owns the KV. RESERVED: the decode engine allocated blocks and a
  slot for it, or refused (back-pressure: the handoff stays READY and is tried again next step,
  first in line: the request waits, it is never dropped). TRANSFERRED: the source blocks'
  bytes are on the decode devices (`jax.device_put` across the two meshes) or in host memory
  (`transfer="host"`). CONVERTED: they are in the decode pool's format and layout and written
  into the reserved blocks. COMMITTED: the decode engine owns the KV and the sequence; the
  prefill engine released its blocks (its full ones stay in its prefix cache).
- Transfer engines move bytes, not tensor semantics: the conversion is explicit, one function
  per kind of format pair (`CONVERSIONS`), checked when the pair of engines is built
  (`check_pair`): float -> float casts, float -> scaled quantizes (per token and KV head, as
  the attention op writes), scaled -> float dequantizes, and the same format copies. A scaled
  format into another scaled one is refused: re-quantizing rounded values compounds their
  error. The receiver's layout is part of the conversion: each engine stores every KV head
  repeated as often as its tensor parallelism needs (`ModelConfig.stored_kv_heads`), so the
  heads are taken back to the model's and repeated for the receiver. The block size is part
  of the layout too (`reblock`): the sequence's tokens are laid end to end and cut into the
  receiver's blocks, as many as its KV tokens fill; the caches must declare the same buffers,
  layers and per-token shapes.
- Recover: anything that raises between RESERVED and COMMITTED (a transfer error, the decode
  side going away) gives the reservation back and leaves the sequence READY on the prefill
  side, whose KV is untouched, so the handoff is simply retried; after `handoff_retries`
  retries the request finishes with finish_reason "error" and the error's text as its stop
  reason. An abort at any state frees both sides. Nothing leaks: the tests count blocks and
  handoffs on both sides after every fault.
- What moves with the KV is the host's `Sequence` itself: its first sampled token, its seed
  (the sampling key of output i is (seed, i), so the decode engine continues the same random
  stream), its outputs (the decode slot's penalty counts are set from them when it is
  adopted), its detokenizer and streaming cursor. The decode engine runs the first token as
  a one-token prefill chunk (its KV is not written yet), so seeded sampling is token for token
  the colocated engine's.
- Bytes (as they leave the prefill pool), transfer seconds (reserve to commit; the converted
  blocks are waited for) and the wait for the decode side are counted. This module never
  schedules: the pair of engines (jaxserve/engine/disaggregated.py) calls `advance` once per
  step.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxserve import kv_cache
from jaxserve.kv_cache import CacheSpec, KVFormat
from jaxserve.engine.sequence import Sequence, Status


class HandoffState(enum.Enum):
    READY = "ready"
    RESERVED = "reserved"
    TRANSFERRED = "transferred"
    CONVERTED = "converted"
    COMMITTED = "committed"


class HandoffError(RuntimeError):
    """A handoff could not complete (its request fails with this message)."""


@dataclasses.dataclass
class Handoff:
    seq: Sequence
    state: HandoffState = HandoffState.READY
    owner: str = "prefill"
    reservation: tuple[int, list[int], int] | None = None  # decode (replica, blocks, slot)
    attempts: int = 0
    nbytes: int = 0
    created: float = dataclasses.field(default_factory=time.perf_counter)  # READY since
    reserved: float = 0.0  # when the decode side took it (the transfer's clock starts)

    @property
    def request_id(self) -> str:
        return self.seq.request.request_id


# ---- format conversion: one function per kind of pair ----

def _same(blocks, src: KVFormat, dst: KVFormat):
    return dict(blocks)


def _cast(blocks, src: KVFormat, dst: KVFormat):
    return {name: a.astype(dst.dtype) for name, a in blocks.items()}


def _quantize(blocks, src: KVFormat, dst: KVFormat):
    return kv_cache.encode_buffers(dst, {name: a.astype(jnp.float32) for name, a in
                                         blocks.items()})


def _dequantize(blocks, src: KVFormat, dst: KVFormat):
    return {name: kv_cache.decode_buffer(src, blocks, name, dst.dtype)
            for name in kv_cache.value_names(blocks)}


# (source scaled, destination scaled) -> conversion; same formats copy
CONVERSIONS: dict[tuple[bool, bool], Callable] = {
    (False, False): _cast, (False, True): _quantize, (True, False): _dequantize}


def check_pair(src: KVFormat, dst: KVFormat) -> Callable:
    """The conversion from `src` to `dst`, or a ValueError naming the pair."""
    if src == dst:
        return _same
    conversion = CONVERSIONS.get((src.scaled, dst.scaled))
    if conversion is None:
        raise ValueError(f"the KV handoff cannot convert kv_cache_dtype {src.name!r} (prefill) "
                         f"to {dst.name!r} (decode): re-quantizing quantized KV compounds its "
                         f"rounding; store one of them in a float format")
    return conversion


def check_caches(src: CacheSpec, dst: CacheSpec) -> None:
    """Raise, naming what differs, unless the two pools hold the same cache (in blocks of
    any size)."""
    if src.num_layers != dst.num_layers or \
            kv_cache.value_names(src.buffers) != kv_cache.value_names(dst.buffers):
        raise ValueError(f"the prefill and decode caches differ: {src.num_layers} layers of "
                         f"{kv_cache.value_names(src.buffers)} against {dst.num_layers} of "
                         f"{kv_cache.value_names(dst.buffers)}")
    for name in kv_cache.value_names(src.buffers):
        a, b = src.buffers[name], dst.buffers.get(name)
        if b is None or a.axes != b.axes or _unrepeated(a) != _unrepeated(b):
            raise ValueError(f"the prefill and decode caches differ in buffer {name!r}: "
                             f"{a.shape} against {None if b is None else b.shape}")


def reblock(blocks: Mapping, src_block: int, dst_block: int, num_tokens: int) -> dict:
    """Gathered blocks [layers, blocks, src_block, *per_token] holding a sequence's first
    `num_tokens` tokens -> [layers, ceil(num_tokens / dst_block), dst_block, *per_token] (the
    last block's slots past them zero)."""
    for what, n in (("prefill block size", src_block), ("decode block size", dst_block)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the KV handoff's {what} must be a positive integer, got {n!r}")
    out = {}
    for name, a in blocks.items():
        layers, held, size = a.shape[:3]
        if size != src_block:
            raise ValueError(f"KV buffer {name!r} comes in blocks of {size} tokens, not the "
                             f"prefill block size {src_block}")
        if not 0 <= num_tokens <= held * size:
            raise ValueError(f"KV buffer {name!r}: {held} blocks of {size} tokens cannot hold "
                             f"{num_tokens} tokens")
        count = -(-num_tokens // dst_block)
        if src_block == dst_block and held == count:
            out[name] = a  # already the receiver's blocks
            continue
        tokens = jnp.reshape(jnp.asarray(a), (layers, held * size) + a.shape[3:])[:, :num_tokens]
        pad = [(0, 0), (0, count * dst_block - num_tokens)] + [(0, 0)] * (a.ndim - 3)
        out[name] = jnp.reshape(jnp.pad(tokens, pad), (layers, count, dst_block) + a.shape[3:])
    return out


def _unrepeated(buf) -> tuple:
    """A buffer's per-token shape without its kv_heads size (each engine repeats heads for
    its own mesh)."""
    return tuple(None if axis == "kv_heads" else n for n, axis in zip(buf.shape, buf.axes))


class KVMover:
    """Moves gathered blocks from the prefill pool into the decode pool (transfer, convert).

    src_repeat / dst_repeat: how often each engine stores every KV head."""

    def __init__(self, prefill_runner, decode_runner, src: CacheSpec, dst: CacheSpec,
                 src_repeat: int, dst_repeat: int, transfer: str):
        check_caches(src, dst)
        self.conversion = check_pair(src.format, dst.format)
        self.prefill, self.decode = prefill_runner, decode_runner
        self.src, self.dst = src, dst
        self.src_repeat, self.dst_repeat = src_repeat, dst_repeat
        # one process: both meshes are local, so device to device is always possible
        self.transfer_mode = "host" if transfer == "host" else "device"
        # gathered blocks: [layers, blocks, block_size, *per_token] (scales included)
        self.head_axes = {name: 3 + buf.axes.index("kv_heads")
                          for name, buf in src.buffers.items() if "kv_heads" in buf.axes}
        self._replicated = NamedSharding(decode_runner.layout.mesh, PartitionSpec())
        self.src_block, self.dst_block = prefill_runner.block_size, decode_runner.block_size
        self._convert = jax.jit(self._convert_blocks)

    @property
    def pair(self) -> str:
        return f"{self.src.format.name}->{self.dst.format.name}"

    def transfer(self, src_ids: list[int]) -> dict:
        """The blocks' bytes, on the decode devices (replicated) or in host memory."""
        gathered = kv_cache.gather_blocks_on_device(self.prefill.kv, src_ids)
        if self.transfer_mode == "host":
            return {name: np.asarray(a) for name, a in gathered.items()}
        return jax.device_put(gathered, self._replicated)

    def convert(self, blocks: Mapping, num_tokens: int) -> dict:
        """Source format, head layout and block size -> the decode pool's (the blocks hold
        the sequence's first `num_tokens` tokens)."""
        converted = reblock(self._convert(dict(blocks)), self.src_block, self.dst_block,
                            num_tokens)
        if self.transfer_mode == "host":
            return {name: np.asarray(a) for name, a in converted.items()}
        return converted

    def _convert_blocks(self, blocks):
        laid_out = relayout_heads(blocks, self.head_axes, self.src_repeat, self.dst_repeat)
        return self.conversion(laid_out, self.src.format, self.dst.format)

    def write(self, dst_ids: list[int], blocks: Mapping) -> None:
        self.decode.scatter_blocks(dst_ids, blocks)


def relayout_heads(blocks: Mapping, head_axes: Mapping[str, int], src_repeat: int,
                   dst_repeat: int) -> dict:
    """Blocks whose buffers (`head_axes`: name -> its kv_heads axis) store every KV head
    `src_repeat` times -> `dst_repeat` times. Stored head j is head j // repeat (np.repeat,
    as jaxserve/placement.py lays out the k/v projections)."""
    out = {}
    for name, a in blocks.items():
        axis = head_axes.get(name)
        if axis is not None and src_repeat != dst_repeat:
            a = jax.lax.slice_in_dim(jnp.asarray(a), 0, a.shape[axis], src_repeat, axis)
            a = jnp.repeat(a, dst_repeat, axis=axis)
        out[name] = a
    return out


def nbytes(blocks: Mapping) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in blocks.values()))


class Handoffs:
    """The handoffs in progress, oldest first, and what they have cost so far.

    `fault`: tests only, called as fault(handoff, state) before the handoff enters each state
    after READY; what it raises is a failure at that state, and it may abort requests."""

    def __init__(self, mover: KVMover, retries: int):
        self.mover = mover
        self.retries = retries
        self.pending: collections.deque[Handoff] = collections.deque()
        self.counters = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=1024)
        self.fault: Callable[[Handoff, HandoffState], None] | None = None

    def __len__(self) -> int:
        return len(self.pending)

    def forget_finished(self) -> None:
        """Drop the handoffs whose sequence was aborted or finished before it moved."""
        self.pending = collections.deque(h for h in self.pending
                                         if h.seq.status is Status.HANDOFF)

    def take(self, prefill) -> None:
        """Start a handoff for every sequence the prefill engine has finished prefilling."""
        self.forget_finished()
        tracked = {id(h.seq) for h in self.pending}
        for seq in prefill.scheduler.handing_off:
            if id(seq) not in tracked:
                self.pending.append(Handoff(seq))

    def advance(self, prefill, decode) -> list:
        """Move every handoff the decode engine has room for, oldest first (none overtakes a
        refused one). Returns the requests that failed (finished with reason "error")."""
        failed = []
        while self.pending:
            handoff = self.pending[0]
            if handoff.seq.status is not Status.HANDOFF:  # aborted or finished meanwhile
                self.pending.popleft()
                continue
            seq = handoff.seq
            reservation = decode.scheduler.reserve(
                seq.total_len, len(seq.request.prompt_ids) + seq.request.max_tokens)
            if reservation is None:
                self.counters["handoff_refusals"] += 1  # back-pressure: try again next step
                break
            handoff.reservation, handoff.reserved = reservation, time.perf_counter()
            try:
                self._move(handoff, prefill, decode)
            except Exception as e:  # recover: the prefill side still holds the KV
                self._recover(handoff, decode)
                if seq.status is not Status.HANDOFF:
                    continue  # aborted at a state: nothing left to do
                handoff.attempts += 1
                self.counters["handoff_failures"] += 1
                if handoff.attempts > self.retries:
                    self.pending.popleft()
                    failed.append(prefill.fail_sequence(seq, f"KV handoff failed: {e}"))
                continue
            self.pending.popleft()
        return [r for r in failed if r is not None]

    def _enter(self, handoff: Handoff, state: HandoffState) -> None:
        if self.fault is not None:
            self.fault(handoff, state)
        if handoff.seq.status is not Status.HANDOFF:
            raise HandoffError(f"request {handoff.request_id!r} was aborted during its handoff")
        handoff.state = state

    def _move(self, handoff: Handoff, prefill, decode) -> None:
        seq, mover = handoff.seq, self.mover
        self._enter(handoff, HandoffState.RESERVED)
        replica, blocks, slot = handoff.reservation
        src_offset = seq.replica * prefill.runner.blocks_per_replica
        src_ids = [src_offset + b for b in seq.blocks]
        moved = mover.transfer(src_ids)
        self._enter(handoff, HandoffState.TRANSFERRED)
        # the KV written: every token but the last (the first sampled one)
        converted = jax.block_until_ready(mover.convert(moved, seq.total_len - 1))
        count = next(iter(converted.values())).shape[1]
        if count > len(blocks):
            raise HandoffError(f"the decode engine reserved {len(blocks)} blocks of "
                               f"{mover.dst_block} tokens, which cannot hold the "
                               f"{seq.total_len - 1} tokens of request {handoff.request_id!r}")
        dst_offset = replica * decode.runner.blocks_per_replica
        mover.write([dst_offset + b for b in blocks[:count]], converted)
        self._enter(handoff, HandoffState.CONVERTED)
        handoff.nbytes = nbytes(moved)
        self._enter(handoff, HandoffState.COMMITTED)
        request = seq.request
        request.handoff_after = None  # it runs to the end where it goes
        prefill.scheduler.hand_over(seq)
        decode.scheduler.adopt(seq, replica, blocks, slot)
        handoff.reservation, handoff.owner = None, "decode"
        if all(s.status is not Status.HANDOFF for s in request.sequences):
            prefill.requests.pop(request.request_id, None)
        decode.requests[request.request_id] = request
        now = time.perf_counter()
        self.latencies.append(now - handoff.reserved)
        self.counters["handoffs"] += 1
        self.counters["handoff_bytes"] += handoff.nbytes
        self.counters[f"handoff_bytes[{mover.pair}]"] += handoff.nbytes
        self.counters["handoff_seconds"] += now - handoff.reserved
        self.counters["handoff_wait_seconds"] += handoff.reserved - handoff.created

    def _recover(self, handoff: Handoff, decode) -> None:
        if handoff.reservation is not None:
            decode.scheduler.cancel_reservation(*handoff.reservation)
            handoff.reservation = None
        handoff.state = HandoffState.READY

    def stats(self) -> dict:
        c, lat = self.counters, sorted(self.latencies)
        return {"handoffs": c["handoffs"], "handoff_bytes": c["handoff_bytes"],
                "handoff_seconds": round(c["handoff_seconds"], 6),
                "handoff_wait_seconds": round(c["handoff_wait_seconds"], 6),
                "handoff_ms_p50": round(1e3 * lat[len(lat) // 2], 3) if lat else None,
                "handoff_ms_max": round(1e3 * lat[-1], 3) if lat else None,
                "handoff_failures": c["handoff_failures"],
                "handoff_refusals": c["handoff_refusals"],
                "handoffs_pending": len(self.pending),
                "handoff_format": self.mover.pair, "handoff_transfer": self.mover.transfer_mode}
