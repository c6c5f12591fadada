"""The leader's runner: a ModelRunner whose device programs also run on every follower.

Each method that dispatches a program first sends it, with its host arrays, to the followers
(runtime/plan_channel.py), then runs it here the same way they do (`plan_channel.dispatch`), so
every process runs the same programs in the same order (see runtime/distributed.py). Everything
else (compiling, sizes, the KV pool's layout) is the wrapped runner's.

What this module must never do: schedule, or run a program the followers are not sent.
"""

from __future__ import annotations

from jaxserve.runtime.plan_channel import PlanChannel, dispatch
from jaxserve.runtime.runner import ModelRunner


class LeaderRunner:
    def __init__(self, runner: ModelRunner, channel: PlanChannel):
        self._runner = runner
        self.channel = channel

    def __getattr__(self, name: str):
        if name in ("gather_blocks", "scatter_blocks", "set_moe", "set_sampling", "read_slot"):
            raise NotImplementedError(f"ModelRunner.{name} is not available when the engine "
                                      f"runs as several processes")
        return getattr(self._runner, name)

    def _run(self, kind: str, *args):
        self.channel.send(kind, args)
        return dispatch(self._runner, kind, args)

    def step(self, inputs):
        return self._run("step", inputs)

    def set_slots(self, slots, prompt_mask, output_counts) -> None:
        self._run("set_slots", slots, prompt_mask, output_counts)

    def copy_blocks(self, pairs) -> None:
        self._run("copy_blocks", pairs)

    def score(self, inputs):
        return self._run("score", inputs)

    def forward(self, tokens, metadata):
        return self._run("forward", tokens, metadata)
