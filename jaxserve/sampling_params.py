"""Per-request sampling parameters, validated once on the host.

`SamplingParams` is what a client asks for (modelled on vLLM's class of the
same name). `__post_init__` is the one place that decides whether a request's
sampling settings are valid: every field is checked there, so an instance that
exists is a valid one, and `dataclasses.replace` re-runs the checks. The
instance is frozen so nothing can change a field afterwards and skip them.
`validate_for_model` adds the checks that need the model's vocabulary size and
context length.

This module must never import jax or touch a device: it runs on the request
path (JSONL/gRPC parsing) and the compiled step only ever sees the per-row
arrays built from it by `jaxserve.runtime.sampling.SamplingInputs`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_N = 16  # most sequences one request may ask for
MAX_LOGPROBS = 20  # most top-logprobs one token may return (vLLM's default cap)
MAX_STOP_STRINGS = 16  # stop strings are matched on the host every step; keep it cheap
SEED_LIMIT = 2**63  # seeds must fit a signed 64-bit integer (protobuf int64, numpy)


def _fail(field: str, rule: str, value: object, error: type[Exception] = ValueError) -> Exception:
    return error(f"{field} must be {rule}, got {value!r}")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `top_k=True` is a client bug, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(field: str, value: object, rule: str, ok: Callable[[int], bool] | None = None) -> int:
    """`value` as an int, raising TypeError for a non-int and ValueError if not `ok`."""
    if not _is_int(value):
        raise _fail(field, rule, value, TypeError)
    number = int(value)  # type: ignore[call-overload]  # numpy ints become plain ints
    if ok is not None and not ok(number):
        raise _fail(field, rule, value)
    return number


def _float(field: str, value: object, rule: str, ok: Callable[[float], bool]) -> float:
    """`value` as a finite float (ints accepted), raising if not `ok(value)`."""
    if not _is_number(value):
        raise _fail(field, rule, value, TypeError)
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or not ok(number):
        raise _fail(field, rule, value)
    return number


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, "a bool", value, TypeError)
    return value


def _stop_strings(value: object) -> tuple[str, ...]:
    rule = f"a non-empty str or a list of at most {MAX_STOP_STRINGS} non-empty str"
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise _fail("stop", rule, value, TypeError)
    if len(items) > MAX_STOP_STRINGS:
        raise _fail("stop", rule, value)
    for item in items:
        if not isinstance(item, str):
            raise _fail("stop", rule, value, TypeError)
        if not item:  # "" would match at every position and stop at once
            raise _fail("stop", rule, value)
    return tuple(items)


def _stop_token_ids(value: object) -> tuple[int, ...]:
    rule = "a list of token ids (ints >= 0)"
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise _fail("stop_token_ids", rule, value, TypeError)
    for item in value:
        if not _is_int(item):
            raise _fail("stop_token_ids", rule, value, TypeError)
        if item < 0:
            raise _fail("stop_token_ids", rule, value)
    return tuple(int(item) for item in value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request. Construction validates every field.

    After construction `stop` and `stop_token_ids` are always tuples (empty when
    not given) and `top_k` is 0 when off (-1 is accepted as vLLM's old spelling).
    """

    n: int = 1
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # 1 means off
    top_k: int = 0  # 0 or -1 means off
    min_p: float = 0.0  # 0 means off
    repetition_penalty: float = 1.0  # 1 means off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per token; 0 = only the chosen one
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  frozen
        set_("n", _int("n", self.n, f"an int in [1, {MAX_N}]", lambda v: 1 <= v <= MAX_N))
        set_("temperature", _float("temperature", self.temperature,
                                   "a finite number >= 0", lambda v: v >= 0))
        set_("top_p", _float("top_p", self.top_p, "a number in (0, 1]", lambda v: 0 < v <= 1))
        top_k = _int("top_k", self.top_k, "an int, 0 or -1 (off) or >= 1",
                     lambda v: v == -1 or v >= 0)
        set_("top_k", max(top_k, 0))  # one spelling of "off" for the batch builder
        set_("min_p", _float("min_p", self.min_p, "a number in [0, 1]", lambda v: 0 <= v <= 1))
        set_("repetition_penalty", _float("repetition_penalty", self.repetition_penalty,
                                          "a finite number > 0", lambda v: v > 0))
        for name in ("presence_penalty", "frequency_penalty"):
            set_(name, _float(name, getattr(self, name), "a number in [-2, 2]",
                              lambda v: -2 <= v <= 2))
        if self.seed is not None:
            set_("seed", _int("seed", self.seed, "None or an int in [0, 2**63)",
                              lambda v: 0 <= v < SEED_LIMIT))
        set_("stop", _stop_strings(self.stop))
        set_("stop_token_ids", _stop_token_ids(self.stop_token_ids))
        set_("ignore_eos", _bool("ignore_eos", self.ignore_eos))
        if self.max_tokens is not None:
            set_("max_tokens", _int("max_tokens", self.max_tokens, "None or an int >= 1",
                                    lambda v: v >= 1))
        set_("min_tokens", _int("min_tokens", self.min_tokens, "an int >= 0", lambda v: v >= 0))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens!r}")
        if self.logprobs is not None:
            set_("logprobs", _int("logprobs", self.logprobs,
                                  f"None or an int in [0, {MAX_LOGPROBS}]",
                                  lambda v: 0 <= v <= MAX_LOGPROBS))
        set_("skip_special_tokens", _bool("skip_special_tokens", self.skip_special_tokens))

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax; top_k/top_p/min_p/seed are then unused."""
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        """True when a repetition, presence or frequency penalty is on."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)

    def validate_for_model(self, vocab_size: int, max_model_len: int) -> None:
        """Raise ValueError for settings that the serving model cannot honour."""
        for token_id in self.stop_token_ids:  # type: ignore[union-attr]  # a tuple after init
            if token_id >= vocab_size:
                raise ValueError(f"stop_token_ids must be < vocab_size ({vocab_size}), "
                                 f"got token id {token_id}")
        if self.logprobs is not None and self.logprobs > vocab_size:
            raise ValueError(f"logprobs must be <= vocab_size ({vocab_size}), got {self.logprobs}")
        if self.max_tokens is not None and self.max_tokens > max_model_len:
            raise ValueError(f"max_tokens must be <= max_model_len ({max_model_len}), "
                             f"got {self.max_tokens}")

    def seed_for(self, sequence_index: int, drawn_seed: int) -> int:
        """The seed of the `sequence_index`-th of the request's `n` sequences.

        A seeded request gives sequence i the seed `seed + i` (as vLLM does), so
        its n samples differ yet are reproducible; an unseeded one uses
        `drawn_seed`, which the engine draws once per sequence at admission.
        """
        if self.seed is None:
            return drawn_seed
        return (self.seed + sequence_index) % SEED_LIMIT

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build from decoded JSON/protobuf fields, rejecting keys that are not fields."""
        if not isinstance(d, Mapping):
            raise TypeError(f"sampling params must be a mapping, got {type(d).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in d if key not in known)
        if unknown:
            # A typo such as "temprature" silently falling back to a default is worse
            # than a rejected request.
            raise ValueError(f"unknown sampling params: {', '.join(unknown)}")
        return cls(**d)
