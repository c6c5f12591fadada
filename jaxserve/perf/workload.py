"""What users ask of a deployment: prompt and output lengths, prefix hits, load, engine limits.

A workload file (YAML or JSON) holds any of these fields (the defaults in brackets):

    prompt_len: 1024                 # a number, {uniform: [lo, hi]} or {values: [...]}
    output_len: 256                  #   (the same forms)
    prefix_hit_rate: 0.0             # fraction of prompt tokens found in the prefix cache
    concurrency: 64                  # requests in flight over the whole deployment, or
    rate: 10.0                       # requests per second over the whole deployment;
                                     # neither: as many in flight as the engine holds
    max_num_seqs: 256                # the engine's limits per DP replica (its flags of the
    max_num_batched_tokens: 8192     #   same names)

Lengths are kept as a few weighted points (a uniform range as evenly spaced points), so every
expectation the model needs is an exact weighted mean over them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import yaml

UNIFORM_POINTS = 16
FIELDS = ("prompt_len", "output_len", "prefix_hit_rate", "concurrency", "rate", "max_num_seqs",
          "max_num_batched_tokens")


class WorkloadError(ValueError):
    """A workload file or field the model cannot read."""


@dataclasses.dataclass(frozen=True)
class Lengths:
    """A distribution of token counts as weighted points (weights sum to 1)."""

    points: tuple[tuple[int, float], ...]

    @classmethod
    def parse(cls, value: Any, what: str) -> Lengths:
        def positive(x):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 1 or x != int(x):
                raise WorkloadError(f"{what}: lengths must be positive integers, got {x!r}")
            return int(x)

        if isinstance(value, dict) and set(value) == {"uniform"}:
            bounds = value["uniform"]
            if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
                raise WorkloadError(f"{what}: uniform takes a list [lo, hi], got {bounds!r}")
            lo, hi = (positive(x) for x in bounds)
            if hi < lo:
                raise WorkloadError(f"{what}: uniform range [{lo}, {hi}] is empty")
            n = min(UNIFORM_POINTS, hi - lo + 1)
            xs = [lo + round(i * (hi - lo) / max(n - 1, 1)) for i in range(n)]
            return cls(tuple((x, 1 / n) for x in xs))
        if isinstance(value, dict) and set(value) == {"values"}:
            if not isinstance(value["values"], (list, tuple)):
                raise WorkloadError(f"{what}: values takes a list [x, ...], got "
                                    f"{value['values']!r}")
            xs = [positive(x) for x in value["values"]]
            if not xs:
                raise WorkloadError(f"{what}: values is empty")
            return cls(tuple((x, 1 / len(xs)) for x in xs))
        if isinstance(value, dict):
            raise WorkloadError(f"{what}: expected a number, {{uniform: [lo, hi]}} or "
                                f"{{values: [...]}}, got {value!r}")
        return cls(((positive(value), 1.0),))

    def mean(self, f: Callable[[int], float] = float) -> float:
        return sum(w * f(x) for x, w in self.points)

    @property
    def max(self) -> int:
        return max(x for x, _ in self.points)


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_len: Lengths = Lengths(((1024, 1.0),))
    output_len: Lengths = Lengths(((256, 1.0),))
    prefix_hit_rate: float = 0.0
    concurrency: float | None = None
    rate: float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def __post_init__(self):
        if not 0 <= self.prefix_hit_rate < 1:
            raise WorkloadError(f"prefix_hit_rate must be in [0, 1), got {self.prefix_hit_rate!r}")
        if self.concurrency is not None and self.rate is not None:
            raise WorkloadError("give concurrency or rate, not both")
        for name in ("concurrency", "rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise WorkloadError(f"{name} must be positive, got {value!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkloadError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, doc: Any, source: str = "workload") -> Workload:
        if not isinstance(doc, dict):
            raise WorkloadError(f"{source}: a workload must be a mapping of {', '.join(FIELDS)}")
        unknown = sorted(set(doc) - set(FIELDS))
        if unknown:
            raise WorkloadError(f"{source}: unknown field(s) {unknown} "
                                f"(known: {', '.join(FIELDS)})")
        kw: dict[str, Any] = {}
        for name in ("prompt_len", "output_len"):
            if name in doc:
                kw[name] = Lengths.parse(doc[name], f"{source}: {name}")
        for name in ("prefix_hit_rate", "concurrency", "rate"):
            if doc.get(name) is not None:
                try:
                    kw[name] = float(doc[name])
                except (TypeError, ValueError):
                    raise WorkloadError(f"{source}: {name} must be a number, got "
                                        f"{doc[name]!r}") from None
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if name in doc:
                kw[name] = doc[name]
        try:
            return cls(**kw)
        except WorkloadError as e:
            raise WorkloadError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        return cls.from_dict(read_document(Path(path)), str(path))

    # ---- what the model needs ----
    @property
    def mean_prompt(self) -> float:
        return self.prompt_len.mean()

    @property
    def mean_output(self) -> float:
        return self.output_len.mean()

    @property
    def mean_new_prompt(self) -> float:
        """Prompt tokens that are computed (not found in the prefix cache)."""
        return self.mean_prompt * (1 - self.prefix_hit_rate)

    @property
    def mean_decode_context(self) -> float:
        """The context a decode step reads, averaged over every output token: a request of
        prompt P and output O decodes at contexts P .. P + O - 1, mean P + (O - 1) / 2, and
        contributes O tokens: E[O (P + (O - 1) / 2)] / E[O] (P and O independent)."""
        o = self.output_len
        return self.mean_prompt + o.mean(lambda x: x * (x - 1) / 2) / o.mean()

    @property
    def mean_resident_tokens(self) -> float:
        """KV tokens a request holds, averaged over its decode steps (what sizes the batch)."""
        return self.mean_decode_context + 1

    @property
    def longest_request(self) -> int:
        return self.prompt_len.max + self.output_len.max

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("prompt_len", "output_len"):
            d[name] = {"values_weights": [list(p) for p in getattr(self, name).points],
                       "mean": getattr(self, name).mean()}
        return d


def read_document(path: Path) -> Any:
    """A workload file's contents: JSON by its suffix, YAML otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"workload file not found: {path}")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise WorkloadError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                            f": {e}") from None
