"""The leader's commands to the followers, and how every process runs one.

A command is (kind, args): `kind` names the ModelRunner method that dispatches one device program
(KINDS), `args` its positional arguments: host (numpy) arrays, alone or in the runner's input
dataclasses (StepInputs, its AttentionMetadata and SamplingInputs, ScoreInputs, SlotRows).
`dispatch` is the one way every process runs a command: each array is placed as a global array
with jax.make_array_from_process_local_data (every process holds the whole array, so
`global_shape` is its own shape) in the sharding the program pins, then the method is called.

Wire format: a JSON header (the tree of dataclasses, values and arrays; each array's dtype and
shape) and the arrays' bytes. Never pickle: the store is reachable over the network, and reading
a command must not be able to run code. Command n is stored under jaxserve/plan/<n // WINDOW>/<n>;
when the leader starts a batch it deletes the one two batches back (followers are at most a
few programs behind: each step is a collective the leader waits for).

What this module must never do: decide what runs (the leader's engine does), or touch requests.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from typing import Any

import jax
import numpy as np

from jaxserve.ops.attention import AttentionMetadata
from jaxserve.runtime.runner import ScoreInputs, SlotRows, StepInputs, VerifyRows
from jaxserve.runtime.sampling import SamplingInputs

KINDS = ("step", "set_slots", "copy_blocks", "score", "forward", "stop")
WINDOW = 256
_TYPES = {cls.__name__: cls for cls in (StepInputs, ScoreInputs, SlotRows, AttentionMetadata,
                                         SamplingInputs, VerifyRows)}


def encode(kind: str, args: tuple) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown command {kind!r}; commands are {', '.join(KINDS)}")
    arrays: list[np.ndarray] = []

    def tree(x):
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            arrays.append(np.ascontiguousarray(np.asarray(x)))
            return {"a": len(arrays) - 1}
        if type(x).__name__ in _TYPES and dataclasses.is_dataclass(x):
            return {"d": type(x).__name__,
                    "f": {f.name: tree(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        if isinstance(x, (tuple, list)):
            return {"t": [tree(v) for v in x]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"v": x}
        raise TypeError(f"a command cannot carry a {type(x).__name__}")

    header = json.dumps({"kind": kind, "args": tree(tuple(args)),
                         "arrays": [[a.dtype.str, a.shape] for a in arrays]}).encode()
    return b"".join([struct.pack("<I", len(header)), header] + [a.tobytes() for a in arrays])


def decode(blob: bytes) -> tuple[str, tuple]:
    (size,) = struct.unpack_from("<I", blob)
    header = json.loads(blob[4:4 + size])
    arrays, offset = [], 4 + size
    for dtype, shape in header["arrays"]:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        arrays.append(np.frombuffer(blob, dtype, count, offset).reshape(shape))
        offset += count * dtype.itemsize

    def tree(node):
        if "a" in node:
            return arrays[node["a"]]
        if "d" in node:
            return _TYPES[node["d"]](**{k: tree(v) for k, v in node["f"].items()})
        if "t" in node:
            return tuple(tree(v) for v in node["t"])
        return node["v"]

    if header["kind"] not in KINDS:
        raise ValueError(f"unknown command {header['kind']!r}")
    return header["kind"], tree(header["args"])


def dispatch(runner, kind: str, args: tuple):
    """Run one command on this process: the arrays placed as global arrays, then the program."""
    sharding = runner.input_sharding(kind)
    placed = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)),
        args)
    return getattr(runner, kind)(*placed)


class PlanChannel:
    """Commands in order, over the jax.distributed key-value store: the leader sends, each
    follower receives. `send_s` / `receive_s` (time spent) and `sent_bytes`: the host cost of
    being several processes."""

    def __init__(self, client, poll_s: float = 1.0):
        self.client = client
        self.poll_ms = max(1, int(poll_s * 1000))
        self.sent = 0
        self.received = 0
        self.send_s = 0.0
        self.sent_bytes = 0
        self.receive_s = 0.0

    @staticmethod
    def _key(n: int) -> str:
        return f"jaxserve/plan/{n // WINDOW}/{n}"

    def send(self, kind: str, args: tuple) -> None:
        t0 = time.perf_counter()
        n = self.sent
        if n % WINDOW == 0 and n >= 2 * WINDOW:
            self.client.key_value_delete(f"jaxserve/plan/{n // WINDOW - 2}")
        blob = encode(kind, args)
        self.client.key_value_set_bytes(self._key(n), blob)
        self.sent_bytes += len(blob)
        self.sent += 1
        self.send_s += time.perf_counter() - t0

    def receive(self) -> tuple[str, tuple]:
        """The next command; waits for as long as the leader is idle (a lost leader ends the
        process from the heartbeat thread, see runtime/distributed.py)."""
        key = self._key(self.received)
        while True:
            t0 = time.perf_counter()
            try:
                blob = self.client.blocking_key_value_get_bytes(key, self.poll_ms)
                break
            except Exception:  # nothing yet (or the store is gone: the heartbeat sees it)
                time.sleep(0.01)
        self.received += 1
        command = decode(blob)
        self.receive_s += time.perf_counter() - t0  # the last wait only: idle time is not cost
        return command
