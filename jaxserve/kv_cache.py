"""The paged KV pool: declared per model family, sized, allocated and moved generically.

A model family declares its cache as a `CacheSpec`: named buffers, each with a per-token shape,
the logical axes of that shape and a dtype (`k` and `v` of `[kv_heads, head_dim]` for GQA; a
latent-attention model declares its latent and rope-key buffers instead). Everything that sizes,
allocates or moves cache memory works from that declaration and never names a buffer:

- the pool holds, per buffer and per layer, `[kv_blocks, block_size, *per_token_shape]`;
- `bytes_per_block` sizes the pool from memory;
- `gather_blocks` / `scatter_blocks` copy one sequence's blocks out of and into the pool (swap,
  handoff to another engine), bitwise;
- `copy_local_blocks` copies blocks inside one shard of the pool (copy on write of a block that
  sequences shared until they diverge).

Which slot of which block a token lives in is the attention op's business
(`jaxserve/ops/attention.py`): this module knows pages, not positions.

Block 0 of every DP replica's shard of the pool is that replica's *null block*: never handed to a
sequence; padding tokens write there and unused block-table entries point there, so every index
is valid and no program needs a branch for padding.

KV formats (`KVFormat`, `settings.precision.kv_cache_dtype`). The model declares its buffers in
its compute dtype; `CacheSpec.with_format` turns that into what the pool stores. A float format
stores each buffer cast to its dtype. A scaled format (int8, fp8_e4m3) stores each buffer's values
in its 8-bit dtype plus a buffer `NAME_scale` (bfloat16) beside it, so every generic path above
(sizing, allocation, gather/scatter, block copies) moves the scales with the blocks it moves.
`KVFormat.encode` / `decode` are the only quantize / dequantize of KV (the attention op calls
them on write and on read); `convert_blocks` moves gathered blocks from one format to another.

Decision: one scale per token per KV head (over head_dim), not per block per head. A block fills
over many steps (one decode token at a time), so a per-block scale would have to grow and
re-quantize what the block already holds on each write; a per-token scale is written once, with
its token, and never revisited. It is also the finer grain, so its error is the smaller one.
Measured on the embedded model's keys and values (every layer, a 64-token prompt of Python), the
worst |error| of a (token, head) vector over its own max |x|: int8 0.39% per token against 4.3%
with an oracle per-(block, head) scale that knows the whole block in advance; fp8_e4m3 3.6%
against 5.9%. Mean |error| / mean |x|: int8 0.53% against 0.87%, fp8_e4m3 1.9% against 2.3%.
Cost: 2 bytes of scale per head_dim bytes of values, so int8 holds
4 * head_dim / (head_dim + 2) times the tokens of float32 in the same memory (3.6x at head_dim
16, 3.9x at 128). Scales are bfloat16: float32's range (no underflow for tiny keys),
and values are quantized against the rounded scale, so its rounding costs no accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.settings import KV_CACHE_DTYPES
from jaxserve.sharding import Layout

NULL_BLOCK = 0
POOL_AXES = ("kv_blocks", None)  # leading axes of every buffer: [kv_blocks, block_size, ...]
SCALE_DTYPE = jnp.bfloat16
SCALE_SUFFIX = "_scale"


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """How the pool stores a buffer: `storage` dtype, and for the scaled formats the largest
    magnitude a value may take (`max_value`: each token's values are divided by a scale per KV
    head that maps its largest |value| there). None: a float format, stored by a cast."""

    name: str
    storage: str  # a jnp dtype name; each format has its own (the op finds the format by it)
    max_value: float | None = None

    @property
    def scaled(self) -> bool:
        return self.max_value is not None

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.storage)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """x [..., last] -> (values [..., last] in `storage`, scale [...] or None)."""
        if not self.scaled:
            return x.astype(self.dtype), None
        x32 = x.astype(jnp.float32)
        amax = jnp.max(jnp.abs(x32), axis=-1)
        # an all-zero vector keeps scale 1 (its values are 0): no division by zero
        scale = jnp.where(amax > 0, amax / self.max_value, 1.0).astype(SCALE_DTYPE)
        scaled = x32 / scale.astype(jnp.float32)[..., None]
        if jnp.issubdtype(self.dtype, jnp.integer):
            scaled = jnp.round(scaled)
        # the scale's rounding may put the largest value a hair past max_value: clip (an fp8
        # cast past its range gives NaN)
        values = jnp.clip(scaled, -self.max_value, self.max_value).astype(self.dtype)
        return values, scale

    def decode(self, values: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
        """The inverse of `encode`, in `dtype`."""
        if not self.scaled:
            return values.astype(dtype)
        return (values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)

    def check_supported(self, device: jax.Device) -> None:
        """Raise, naming the format and the platform, if `device` cannot store and read it."""
        error = _unsupported(self, device)
        if error:
            raise ValueError(f"kv_cache_dtype {self.name!r} is not supported on "
                             f"{device.platform} ({device.device_kind}): {error}; use int8 or "
                             f"bfloat16")


@functools.lru_cache(maxsize=None)
def _unsupported(fmt: KVFormat, device: jax.Device) -> str | None:
    """Why the device's compiler refuses a round trip through `fmt` (None: it compiles)."""
    try:
        jax.jit(lambda x: fmt.decode(*fmt.encode(x), jnp.float32)).lower(
            jax.ShapeDtypeStruct((2, 4), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(device))).compile()
    except Exception as e:  # the platform's compiler has no such dtype
        return f"{type(e).__name__}: {e}"
    return None


def kv_formats() -> dict[str, KVFormat]:
    """Format name -> format. The fp8 format exists only where jax.numpy has its dtype."""
    formats = [KVFormat("float32", "float32"), KVFormat("bfloat16", "bfloat16"),
               KVFormat("float16", "float16"), KVFormat("int8", "int8", 127.0)]
    if hasattr(jnp, "float8_e4m3fn"):
        formats.append(KVFormat("fp8_e4m3", "float8_e4m3fn",
                                float(jnp.finfo(jnp.float8_e4m3fn).max)))
    return {f.name: f for f in formats}


def kv_format(kv_cache_dtype: str, model_dtype) -> KVFormat:
    """The format `settings.precision.kv_cache_dtype` names ("auto": the model's dtype)."""
    name = jnp.dtype(model_dtype).name if kv_cache_dtype == "auto" else kv_cache_dtype
    formats = kv_formats()
    if kv_cache_dtype not in KV_CACHE_DTYPES or name not in formats:
        if kv_cache_dtype == "fp8_e4m3":
            raise ValueError(f"kv_cache_dtype 'fp8_e4m3' needs jax.numpy.float8_e4m3fn, which "
                             f"this jax ({jax.__version__}) does not have; use int8 or bfloat16")
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                         f"{kv_cache_dtype!r}")
    return formats[name]


def format_of(stored: Mapping[str, jax.Array]) -> KVFormat:
    """The format one layer's stored buffers are in (each format has its own storage dtype)."""
    dtype = next(a.dtype for name, a in stored.items() if not name.endswith(SCALE_SUFFIX))
    for fmt in kv_formats().values():
        if fmt.dtype == dtype:
            return fmt
    raise ValueError(f"no KV format stores {dtype} (formats: {', '.join(kv_formats())})")


def value_names(stored: Mapping[str, object]) -> list[str]:
    """The declared buffers among stored ones (their scales left out)."""
    return [name for name in stored if not name.endswith(SCALE_SUFFIX)]


def encode_buffers(fmt: KVFormat, buffers: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Declared buffers (e.g. {"k": ..., "v": ...}) -> what the pool stores for them."""
    stored = {}
    for name, x in buffers.items():
        stored[name], scale = fmt.encode(x)
        if scale is not None:
            stored[name + SCALE_SUFFIX] = scale
    return stored


def decode_buffer(fmt: KVFormat, stored: Mapping[str, jax.Array], name: str, dtype) -> jax.Array:
    """Buffer `name` of stored buffers (with its scale, if the format has one), in `dtype`."""
    return fmt.decode(stored[name], stored.get(name + SCALE_SUFFIX), dtype)


def convert_blocks(blocks: Mapping[str, np.ndarray], src: KVFormat, dst: KVFormat
                   ) -> dict[str, np.ndarray]:
    """Blocks as `gather_blocks` returns them, from format `src` to `dst` (e.g. float32 ->
    int8 when a sequence's cache moves to an engine that stores int8)."""
    converted = _convert_jit(dict(blocks), src, dst)
    return {name: np.asarray(a) for name, a in converted.items()}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _convert_jit(blocks: dict[str, jax.Array], src: KVFormat, dst: KVFormat):
    decoded = {name: decode_buffer(src, blocks, name, jnp.float32) for name in value_names(blocks)}
    return encode_buffers(dst, decoded)


@dataclasses.dataclass(frozen=True)
class CacheBuffer:
    """One cache buffer of one layer, per token: shape, logical axes, dtype."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: jnp.dtype

    def nbytes_per_token(self) -> int:
        return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a model family keeps per token and per layer (e.g. {"k": ..., "v": ...})."""

    buffers: Mapping[str, CacheBuffer]
    num_layers: int
    format: KVFormat | None = None  # None: as declared (a model's spec); else what is stored

    def with_format(self, fmt: KVFormat) -> CacheSpec:
        """What the pool stores for this declaration in `fmt`: each buffer in the format's
        dtype, and a scale per token and head (the buffer's shape less its last axis) for the
        scaled formats."""
        if self.format is not None:
            raise ValueError(f"the cache spec is already in format {self.format.name!r}")
        stored = {}
        for name, buf in self.buffers.items():
            stored[name] = CacheBuffer(buf.shape, buf.axes, fmt.dtype)
            if fmt.scaled:
                stored[name + SCALE_SUFFIX] = CacheBuffer(buf.shape[:-1], buf.axes[:-1],
                                                          jnp.dtype(SCALE_DTYPE))
        return CacheSpec(stored, self.num_layers, fmt)

    def bytes_per_block(self, block_size: int) -> int:
        per_token = sum(b.nbytes_per_token() for b in self.buffers.values())
        return self.num_layers * block_size * per_token

    def pool_shape(self, name: str, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size) + self.buffers[name].shape

    def pool_axes(self, name: str) -> tuple[str | None, ...]:
        return POOL_AXES + self.buffers[name].axes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    """The pool: buffer name -> one array per layer. A pytree: programs donate and return it."""

    buffers: dict[str, tuple[jax.Array, ...]]

    @property
    def num_blocks(self) -> int:
        return next(iter(self.buffers.values()))[0].shape[0]

    @property
    def block_size(self) -> int:
        return next(iter(self.buffers.values()))[0].shape[1]

    @property
    def dtype(self) -> jnp.dtype:
        return next(iter(self.buffers.values()))[0].dtype

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.buffers.values())))

    def layer(self, i: int) -> dict[str, jax.Array]:
        return {name: arrays[i] for name, arrays in self.buffers.items()}

    @staticmethod
    def from_layers(layers: Sequence[Mapping[str, jax.Array]]) -> KVPool:
        return KVPool({name: tuple(layer[name] for layer in layers) for name in layers[0]})

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

    @classmethod
    def create(cls, spec: CacheSpec, num_blocks: int, block_size: int, layout: Layout) -> KVPool:
        """Zeroed pages, allocated directly in their sharding on the devices."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        buffers = {}
        for name, buf in spec.buffers.items():
            shape = spec.pool_shape(name, num_blocks, block_size)
            sharding = layout.sharding(spec.pool_axes(name), shape, f"KV cache buffer {name!r}")
            zeros = jax.jit(lambda shape=shape, dtype=buf.dtype: jnp.zeros(shape, dtype),
                            out_shardings=sharding)
            buffers[name] = tuple(zeros() for _ in range(spec.num_layers))
        return cls(buffers)

    @classmethod
    def create_local(cls, spec: CacheSpec, num_blocks: int, block_size: int) -> KVPool:
        """Zeroed pages with no placement (inside a traced function, e.g. a training step)."""
        return cls({name: tuple(jnp.zeros(spec.pool_shape(name, num_blocks, block_size),
                                          buf.dtype) for _ in range(spec.num_layers))
                    for name, buf in spec.buffers.items()})

    def shardings(self):
        return jax.tree.map(lambda a: a.sharding, self)


def _gather(pool: KVPool, block_ids: jax.Array) -> dict[str, jax.Array]:
    return {name: jnp.stack([a[block_ids] for a in arrays])
            for name, arrays in pool.buffers.items()}


def _scatter(pool: KVPool, block_ids: jax.Array, blocks: dict[str, jax.Array]) -> KVPool:
    return KVPool({name: tuple(a.at[block_ids].set(blocks[name][i].astype(a.dtype))
                               for i, a in enumerate(arrays))
                   for name, arrays in pool.buffers.items()})


def copy_local_blocks(pool: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:
    """Block src[i] -> block dst[i] in every buffer and layer (ids of this shard of the pool;
    pairs 0 -> 0 are padding: the null block onto itself). Run per device (the runner wraps it
    in shard_map) and with the pool donated, so the pool is updated in place."""
    return KVPool({name: tuple(a.at[dst].set(a[src]) for a in arrays)
                   for name, arrays in pool.buffers.items()})


def copy_local_slots(pool: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:
    """Token slot src[i] -> slot dst[i] (block * block_size + offset, ids of this shard) in
    every buffer and layer; like `copy_local_blocks`, per device and donated."""
    def move(a):
        bs = a.shape[1]
        return a.at[dst // bs, dst % bs].set(a[src // bs, src % bs])

    return KVPool({name: tuple(move(a) for a in arrays)
                   for name, arrays in pool.buffers.items()})


_gather_jit = jax.jit(_gather)
_scatter_jit = jax.jit(_scatter, donate_argnums=(0,))


def gather_blocks(pool: KVPool, block_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Copy blocks out of the pool: buffer name -> [layers, len(block_ids), block_size, ...].

    block_ids index the whole pool (a DP replica's local id plus its shard's offset).
    """
    return {name: np.asarray(a) for name, a in gather_blocks_on_device(pool, block_ids).items()}


def gather_blocks_on_device(pool: KVPool, block_ids: Sequence[int]) -> dict[str, jax.Array]:
    """`gather_blocks`, left on the pool's devices (dispatched, not waited for)."""
    return _gather_jit(pool, jnp.asarray(np.asarray(block_ids, np.int32)))


def scatter_blocks(pool: KVPool, block_ids: Sequence[int],
                   blocks: Mapping[str, np.ndarray]) -> KVPool:
    """Write blocks (as `gather_blocks` returns them) into the pool; returns the new pool (the
    old one is donated)."""
    missing = sorted(set(pool.buffers) - set(blocks))
    if missing:
        raise ValueError(f"blocks lack cache buffer(s) {missing}")
    return _scatter_jit(pool, jnp.asarray(np.asarray(block_ids, np.int32)),
                        {name: jnp.asarray(blocks[name]) for name in pool.buffers})
