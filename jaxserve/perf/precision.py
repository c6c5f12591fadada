"""Number formats of one role (prefill or decode): weights, KV cache and the products.

`Precision.parse("bfloat16")` (or "float8", "int8") sets all three; `"weights=int8,kv=float8"`
sets some and the rest follow: the KV cache keeps the weights' format when that is a 16/32-bit
float (else bfloat16), and products run in the weights' float format, or in bfloat16 for 8-bit
weights (weight-only quantisation: weights are widened before the product). Activations
exchanged between devices travel in the product's format, at least 16 bits.
"""

from __future__ import annotations

import dataclasses

from jaxserve.perf.profiles import DTYPE_BYTES, ProfileError, canonical_dtype

WIDE_FLOATS = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Precision:
    weights: str = "bfloat16"
    kv: str | None = None
    compute: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "weights", canonical_dtype(self.weights, "weights precision"))
        default = self.weights if self.weights in WIDE_FLOATS else "bfloat16"
        object.__setattr__(self, "kv", canonical_dtype(self.kv or default, "kv precision"))
        object.__setattr__(self, "compute",
                           canonical_dtype(self.compute or default, "compute precision"))

    @classmethod
    def parse(cls, text: str) -> Precision:
        text = str(text).strip()
        if "=" not in text:
            return cls(text, text, text)
        fields = {}
        for part in text.split(","):
            key, eq, value = part.strip().partition("=")
            if not eq or key not in ("weights", "kv", "compute"):
                raise ProfileError(f"precision {text!r}: {part.strip()!r} is not weights=, kv= "
                                   f"or compute= followed by a dtype")
            fields[key] = value.strip()
        return cls(**fields)

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weights]

    @property
    def kv_bytes(self) -> int:
        return DTYPE_BYTES[self.kv]

    @property
    def activation_bytes(self) -> int:
        return max(DTYPE_BYTES[self.compute], 2)

    def __str__(self) -> str:
        if self.weights == self.kv == self.compute:
            return self.weights
        return f"weights={self.weights},kv={self.kv},compute={self.compute}"
