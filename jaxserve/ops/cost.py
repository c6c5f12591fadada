"""FLOPs that XLA's cost analysis of a compiled program does not see.

XLA counts a loop's body once, whatever its trip count. An op that runs a loop whose trip count
is fixed when it is traced (the CPU expert tiles of `jaxserve.ops.moe`) notes the FLOPs of the
other iterations here while a program is lowered; the runner adds them to XLA's count. Loops
whose trip count depends on the data (attention's context chunks) cannot be noted: for them
the executed count stays a lower bound.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_UNCOUNTED: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "uncounted_loop_flops", default=None)


@contextlib.contextmanager
def uncounted_flops() -> Iterator[list[int]]:
    """Collect, while a program is traced, the loop FLOPs its ops note (one device's)."""
    box = [0]
    token = _UNCOUNTED.set(box)
    try:
        yield box
    finally:
        _UNCOUNTED.reset(token)


def note_loop(iterations: int, flops_per_iteration: int) -> None:
    """A loop of `iterations` (known when traced) whose body does `flops_per_iteration`."""
    box = _UNCOUNTED.get()
    if box is not None:
        box[0] += (iterations - 1) * flops_per_iteration
