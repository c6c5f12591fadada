"""Precision formats as benchmarks name them: each is a set of engine settings overrides on top of
the float32 baseline (`LLM(model_dir, **BASE, **FORMATS[name])`).

A format is data, not code: the accuracy report and the offline benchmark's precision part take
the same names, and a new format (a KV cache dtype, a weight group size) is one more entry here.
A format whose setting this version of the engine does not have (`missing_settings`) is skipped
with a message naming the setting, so rows for features still being built appear by themselves
once the setting exists.

Never imports jax: the names are checked against the settings tree (jaxserve/settings.py)."""

from __future__ import annotations

from jaxserve.settings import Settings

REFERENCE = "fp32"
# The baseline every format starts from: float32 weights, compute and (by default) KV cache.
BASE = {"dtype": "float32", "quantization": "none"}
FORMATS = {
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int8-g32": {"quantization": "int8-g32"},
    "int8-g128": {"quantization": "int8-g128"},
    # every weight int8, the embedding and LM head too: what llama.cpp's q8_0 GGUF stores
    "int8+head": {"quantization": "int8", "quantize_embeddings": True},
    "kv-bf16": {"kv_cache_dtype": "bfloat16"},
    "kv-int8": {"kv_cache_dtype": "int8"},
    "kv-fp8": {"kv_cache_dtype": "fp8_e4m3"},
    "int8+kv-int8": {"quantization": "int8", "kv_cache_dtype": "int8"},
}


def overrides_of(name: str, formats: dict[str, dict] | None = None) -> dict:
    """The full settings overrides of format `name` (the baseline plus its own)."""
    formats = FORMATS if formats is None else formats
    return {**BASE, **formats[name]}


def missing_settings(overrides: dict) -> list[str]:
    """The names in `overrides` that are not settings of this version of the engine."""
    known = {leaf.name for leaf in Settings.leaves()}
    return [name for name in overrides if name not in known]


def skip_reason(name: str, overrides: dict) -> str | None:
    """Why format `name` cannot run here (a setting it needs does not exist), or None."""
    missing = missing_settings(overrides)
    if not missing:
        return None
    wanted = ", ".join(f"{m}={overrides[m]!r}" for m in missing)
    return f"format {name!r} needs {wanted}, but this engine has no setting {missing[0]!r}"


def parse_formats(text: str) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8'], each a name of FORMATS (an unknown one is an error)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format {unknown[0] if unknown else text!r}: choose from "
                         f"{', '.join(FORMATS)}")
    return names
