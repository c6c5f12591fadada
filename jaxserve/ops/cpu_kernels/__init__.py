"""CPU kernels XLA:CPU does not emit well, as XLA FFI custom calls: built from C++ on first use.

`int8_products(x, rows)` quantizes float32 activations x [tokens, K] per token (the numbers of
`jaxserve.ops.quant.quantize_activations`) and returns their scales [tokens] and, for each int8
weight of `rows` ([N_i, K], weights that share the input, e.g. q, k and v), the int32 sums
`xq @ rows_i.T`: the same integers `lax.dot_general(..., preferred_element_type=int32)` gives,
in one call that reads each weight row once for up to 8 tokens at a time with AVX-512 VNNI
or AVX2 where the CPU has them (a plain loop elsewhere), on XLA's own threads (`int8_rows.cc`).

`f32_products(x, rows)` is `x @ rows_i.T` for float32 activations and float32 weight rows, each
element summed in one fixed order whatever the call's tokens (an AVX2 + FMA loop, or a plain
loop in the same order; `f32_rows.cc`). Both product kernels share one way of running a call's
row chunks on XLA's threads (`row_jobs.cc`).

`decode_attention(q, k, v, tables, positions, context_lens, scale)` is one query per row
attending to its context straight from float32 KV pages, an online softmax in one order per row
(`decode_attention.cc`).

`gather_blocks(pages, ids)` is `pages[ids]` for whole blocks of a paged KV buffer, each block one
memcpy (`gather_blocks.cc`): the same bytes as XLA's gather, whose CPU loop computes every
element's source index.

The sources ship in the package; the first process that needs it compiles it with `g++ -O3
-march=native` (`$JAXSERVE_CXX` names another compiler) into a cache directory keyed by the
source, the FFI headers and this CPU (`$JAXSERVE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/jaxserve/
cpu_kernels`, else `~/.cache/jaxserve/cpu_kernels`), so later processes only load it. Where it
cannot be built or loaded (no compiler, a failed build, not x86-64 / aarch64 Linux), `available()`
is False, one warning says why, and callers keep their XLA path. Nothing here decides when a
kernel is used: `jaxserve.ops.quant.int8_product`, `quant.float_product` and
`jaxserve.ops.attention.gather_blocks` do.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCES = ("row_jobs.cc", "int8_rows.cc", "f32_rows.cc", "gather_blocks.cc",
           "decode_attention.cc")  # one library
HEADERS = ("row_jobs.h",)
TARGET = "jaxserve_int8_products"  # the FFI target names in the compiled programs
F32_TARGET = "jaxserve_f32_products"
GATHER_TARGET = "jaxserve_gather_blocks"
ATTENTION_TARGET = "jaxserve_decode_attention"
COMPILER_ENV, CACHE_ENV = "JAXSERVE_CXX", "JAXSERVE_KERNEL_CACHE"
# How long a kernel thread that ran out of work waits, spinning, for the next call (set_spin).
DEFAULT_SPIN_MICROS = 500

_lock = threading.Lock()
_state: dict[str, object] = {}  # "library": the loaded .so, or "error": why there is none


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxserve" / "cpu_kernels"


def _cpu_identity() -> bytes:
    """What -march=native compiles for: the CPU's model and flags (a cache shared by machines
    of different kinds keeps one build per kind)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep))).encode()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(word for ln in lines if ln.split(":")[0].strip() in ("flags", "Features")
                     for word in ln.split(":", 1)[1].split())


def _build(compiler: str) -> Path:
    files = {name: resources.files(__name__).joinpath(name).read_bytes()
             for name in SOURCES + HEADERS}
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"".join(files[name] for name in SOURCES + HEADERS) + include.encode()
                         + compiler.encode() + _cpu_identity())
    out = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (${COMPILER_ENV} names one)")
    log.info("building the CPU kernels into %s (once per source and CPU)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    with tempfile.TemporaryDirectory(dir=out.parent) as src:
        for name, text in files.items():
            (Path(src) / name).write_bytes(text)
        try:
            done = subprocess.run([compiler, "-O3", "-march=native", "-std=c++17", "-shared",
                                   "-fPIC", "-w", "-I", include, "-I", src,
                                   *(str(Path(src) / name) for name in SOURCES), "-o", str(tmp)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise RuntimeError(f"{compiler} failed ({done.returncode}): "
                                   f"{done.stderr.strip()[-2000:]}")
            os.replace(tmp, out)  # atomic: another process may be building the same key
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _load() -> None:
    compiler = os.environ.get(COMPILER_ENV) or "g++"
    try:
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
            raise RuntimeError(f"no build for {platform.system()} {platform.machine()}")
        library = ctypes.CDLL(str(_build(compiler)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxserveInt8Products),
                                    platform="cpu")
        jax.ffi.register_ffi_target(F32_TARGET, jax.ffi.pycapsule(library.JaxserveF32Products),
                                    platform="cpu")
        jax.ffi.register_ffi_target(GATHER_TARGET,
                                    jax.ffi.pycapsule(library.JaxserveGatherBlocks),
                                    platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET,
                                    jax.ffi.pycapsule(library.JaxserveDecodeAttention),
                                    platform="cpu")
        _state["library"] = library
        library.JaxserveRowsSetSpin(ctypes.c_longlong(DEFAULT_SPIN_MICROS))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _state["error"] = str(error)
        log.warning("the CPU kernels are not available (%s); int8 and float32 products run as "
                    "XLA's dots, block reads as XLA's gather", error)


def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA:CPU (built on first call)."""
    with _lock:
        if not _state:
            _load()
        return "library" in _state


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or was not asked yet)."""
    return _state.get("error")  # type: ignore[return-value]


LOOPS = ("portable", "avx2", "avx512_vnni")  # the int8 kernel's inner loops, slowest first
F32_LOOPS = ("portable", "avx2_fma")  # the float32 kernel's


def inner_loop() -> str:
    """Which inner loop the loaded int8 kernel runs on this CPU (one of LOOPS)."""
    return LOOPS[_state["library"].JaxserveInt8RowsLoop()] if available() else "portable"


def limit_loop(name: str) -> None:
    """Run at most loop `name` of LOOPS even where a faster one is there ("avx512_vnni": any):
    every loop must give the same integers, and one machine can test the ones below its own."""
    if available():
        _state["library"].JaxserveInt8RowsLimitLoop(LOOPS.index(name))


def f32_loop() -> str:
    """Which inner loop the loaded float32 kernel runs on this CPU (one of F32_LOOPS)."""
    return F32_LOOPS[_state["library"].JaxserveF32RowsLoop()] if available() else "portable"


def limit_f32_loop(name: str) -> None:
    """Run at most float32 loop `name` of F32_LOOPS ("avx2_fma": any): the loops sum in one
    order, so they give the same bits, and one machine tests both."""
    if available():
        _state["library"].JaxserveF32RowsLimitLoop(F32_LOOPS.index(name))


def set_spin(micros: int) -> None:
    """How long a kernel thread that ran out of work waits, spinning, for the next call before
    it sleeps (microseconds; 0: it sleeps at once). Measured, not tuned per run: for
    benchmarks that compare the two."""
    if available():
        _state["library"].JaxserveRowsSetSpin(ctypes.c_longlong(int(micros)))


def _checked_rows(kernel: str, x: jax.Array, rows, dtype) -> list[jax.Array]:
    """`rows` as a list, after checking the operands a product kernel takes: float32 x [tokens,
    K] and one or more weights [N_i, K] of `dtype` (an error names every operand's shape)."""
    rows = list(rows)
    bad = [w for w in rows if w.dtype != dtype or w.ndim != 2 or w.shape[1] != x.shape[-1]]
    if x.dtype != jnp.float32 or x.ndim != 2 or not rows or bad:
        raise ValueError(f"{kernel}: float32 [tokens, K] and {jnp.dtype(dtype).name} [N, K] "
                         f"weights expected, got {x.dtype}{list(x.shape)} and "
                         f"{', '.join(f'{w.dtype}{list(w.shape)}' for w in rows) or 'none'}")
    return rows


def int8_products(x: jax.Array, rows) -> tuple[jax.Array, list[jax.Array]]:
    """float32 x [tokens, K] and int8 weights rows[i] [N_i, K] -> (the activations' scales
    float32 [tokens], [int32 [tokens, N_i]]): the sums over k of xq[t, k] * rows[i][n, k] of the
    rounded activations xq (exact). Only after `available()` is True."""
    rows = _checked_rows("int8_products", x, rows, jnp.int8)
    results = [jax.ShapeDtypeStruct((x.shape[0],), jnp.float32)] + [
        jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.int32) for w in rows]
    scales, *sums = jax.ffi.ffi_call(TARGET, results)(x, *rows)
    return scales, sums


def f32_products(x: jax.Array, rows) -> list[jax.Array]:
    """float32 x [tokens, K] and float32 weights rows[i] [N_i, K] -> [float32 [tokens, N_i]]:
    x @ rows[i].T, each element summed in one fixed order (`f32_rows.cc`), so a token's result
    does not depend on the other tokens of the call. Only after `available()` is True."""
    rows = _checked_rows("f32_products", x, rows, jnp.float32)
    results = [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32) for w in rows]
    return list(jax.ffi.ffi_call(F32_TARGET, results)(x, *rows))


def gather_blocks(pages: jax.Array, ids: jax.Array) -> jax.Array:
    """`pages[ids]` for int32 ids: whole blocks (a block: every dim of `pages` but the first)
    copied, the same bytes as XLA's gather. Only after `available()` is True."""
    if ids.dtype != jnp.int32 or pages.ndim < 1:
        raise ValueError(f"gather_blocks: pages [blocks, ...] and int32 ids expected, got "
                         f"{pages.dtype}{list(pages.shape)} and {ids.dtype}{list(ids.shape)}")
    result = jax.ShapeDtypeStruct(ids.shape + pages.shape[1:], pages.dtype)
    return jax.ffi.ffi_call(GATHER_TARGET, result)(pages, ids)


# query heads per KV head, and head_dim, the attention kernel takes (decode_attention.cc)
ATTENTION_MAX_GROUP, ATTENTION_MAX_HEAD_DIM = 16, 256


def decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array,
                     positions: jax.Array, context_lens: jax.Array, scale: float,
                     threads: bool = True) -> jax.Array:
    """float32 q [rows, heads, head_dim], one query per row, attending to keys 0 .. n - 1 of its
    context, n = min(position + 1, context_len), read through its block table from float32
    pages k, v [blocks, block_size, kv_heads, head_dim]: f32 [rows, heads, head_dim] (0 for a
    row with no keys). threads: run on XLA's pool too (else on the calling thread). Only after
    `available()` is True."""
    rows, heads, dim = q.shape if q.ndim == 3 else (None,) * 3
    ok = (q.ndim == 3 and k_pages.ndim == 4 and k_pages.shape == v_pages.shape
          and all(a.dtype == jnp.float32 for a in (q, k_pages, v_pages))
          and k_pages.shape[3] == dim and heads % k_pages.shape[2] == 0
          and heads // k_pages.shape[2] <= ATTENTION_MAX_GROUP and dim <= ATTENTION_MAX_HEAD_DIM
          and tables.dtype == positions.dtype == context_lens.dtype == jnp.int32
          and tables.ndim == 2 and tables.shape[0] == rows
          and positions.shape == context_lens.shape == (rows,))
    if not ok:
        raise ValueError(
            "decode_attention: float32 q [rows, heads, head_dim] and pages [blocks, block_size, "
            f"kv_heads, head_dim] (heads a multiple of kv_heads, at most {ATTENTION_MAX_GROUP} "
            f"per KV head, head_dim <= {ATTENTION_MAX_HEAD_DIM}), int32 tables [rows, width], "
            f"positions and context_lens [rows] expected, got q {q.dtype}{list(q.shape)}, "
            f"k {k_pages.dtype}{list(k_pages.shape)}, v {v_pages.dtype}{list(v_pages.shape)}, "
            f"tables {tables.dtype}{list(tables.shape)}, positions "
            f"{positions.dtype}{list(positions.shape)}, context_lens "
            f"{context_lens.dtype}{list(context_lens.shape)}")
    result = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, result)(
        q, k_pages, v_pages, tables, positions, context_lens, scale=np.float32(scale),
        threads=bool(threads))
