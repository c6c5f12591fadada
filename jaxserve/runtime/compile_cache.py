"""Compiled programs kept between runs (JAX's persistent compilation cache), and counts of the
XLA compiles this process did.

A step program takes seconds to compile on a CPU and a fraction of that to load, so the cache is
on by default: a second start with the same model, layout and settings loads every program it
compiled before. Where it lives, first match wins:

1. the `compilation_cache` setting (`LLM(compilation_cache=...)`, `--compilation-cache`);
2. `$JAXSERVE_COMPILATION_CACHE`;
3. a directory JAX was already given (`jax_compilation_cache_dir`, `$JAX_COMPILATION_CACHE_DIR`);
4. `$XDG_CACHE_HOME/jaxserve/xla`, else `~/.cache/jaxserve/xla`.

"off" (as the setting or the variable) turns it off. The cache is JAX's, so it is process-wide:
the last engine built decides where it points. Every program is cached, however fast it
compiled (`jax_persistent_cache_min_compile_time_secs` = 0): a 0.3 s program is still 0.3 s
of every start. Anyone who can write to the directory can make this process run their code (a
cached executable is trusted): it is the user's own cache directory for that reason.

This module never decides which programs to compile; it only says where they are kept.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

OFF = "off"
ENV = "JAXSERVE_COMPILATION_CACHE"
# recorded around every backend compile, a persistent cache hit included
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def default_dir() -> Path:
    """The user's cache directory for compiled programs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxserve" / "xla"


def resolve(setting: str | os.PathLike | None = None) -> Path | None:
    """The cache directory a setting means (None: the environment decides), or None for off."""
    if setting is None:
        setting = os.environ.get(ENV) or jax.config.jax_compilation_cache_dir or default_dir()
    if not isinstance(setting, (str, os.PathLike)):
        raise TypeError(f"compilation_cache must be a directory or {OFF!r}, got {setting!r}")
    if str(setting) == OFF:
        return None
    if not str(setting):
        raise ValueError(f"compilation_cache is empty: give a directory or {OFF!r}")
    path = Path(setting).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"compilation_cache {str(path)!r} is not a directory")
    return path


def use(setting: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent cache at the directory `setting` means (or turn it off); returns
    the directory. Programs compiled from now on are read from and written to it."""
    path = resolve(setting)
    wanted = None if path is None else str(path)
    if jax.config.jax_compilation_cache_dir != wanted:
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", wanted)
        compilation_cache.reset_cache()  # JAX opens its cache once: make it open this one
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


class _Counts:
    """Process-wide: backend compiles and persistent cache hits, from JAX's monitoring events."""

    def __init__(self):
        self.lock = threading.Lock()
        self.backend = 0
        self.hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, _secs: float, **_kwargs) -> None:
        if event == _BACKEND_COMPILE:
            with self.lock:
                self.backend += 1

    def _on_event(self, event: str, **_kwargs) -> None:
        if event == _CACHE_HIT:
            with self.lock:
                self.hits += 1


_COUNTS = _Counts()


def xla_compiles() -> int:
    """Programs XLA compiled in this process so far (loads from the persistent cache excluded).
    Take the difference around a run to see what it compiled."""
    with _COUNTS.lock:
        return _COUNTS.backend - _COUNTS.hits


def cache_loads() -> int:
    """Programs loaded from the persistent cache in this process so far."""
    with _COUNTS.lock:
        return _COUNTS.hits
