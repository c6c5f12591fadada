"""A follower process: run the leader's device programs, in order, until it says stop.

Followers never schedule and never read results back: what the leader sends (its plans, with the
host arrays) is all they run (see runtime/distributed.py). At most `max_steps_in_flight` steps
are left running before the oldest is waited for, as on the leader: on CPU, many
collective-bearing programs in flight starve XLA's rendezvous (see engine/engine.py).
"""

from __future__ import annotations

import collections

import jax

from jaxserve.runtime.plan_channel import PlanChannel, dispatch
from jaxserve.runtime.runner import ModelRunner


def follow(runner: ModelRunner, channel: PlanChannel, max_steps_in_flight: int) -> int:
    """Run commands until `stop`; returns how many programs ran."""
    in_flight: collections.deque = collections.deque()
    ran = 0
    while True:
        kind, args = channel.receive()
        if kind == "stop":
            break
        outputs = dispatch(runner, kind, args)
        ran += 1
        if kind in ("step", "score", "forward"):
            in_flight.append(outputs)
        while len(in_flight) > max_steps_in_flight:
            jax.block_until_ready(in_flight.popleft())
    jax.block_until_ready(list(in_flight))
    return ran
