"""Several processes (hosts) as one engine: one SPMD program under jax.distributed.

The design, and why:
- Every process runs the same command with its own process id. `join` calls
  jax.distributed.initialize before any device is touched, so `jax.devices()` is the global list:
  the mesh spans every process's devices (sharding.make_mesh, rules unchanged) and every process
  compiles the same programs.
- One scheduler. Process 0, the leader, owns the requests, the scheduler and the front ends. Each
  device program it dispatches (a step, slot set-up, block copies, a scoring step) is first sent
  to the followers as a command carrying its plan: token ids, positions, block tables, sampling
  rows (runtime/plan_channel.py). Followers never schedule: they run the commands in the order
  they were sent (runtime/follower.py). Every process places the same host arrays with
  jax.make_array_from_process_local_data; sampled tokens are read back on the leader only.
- The plan travels over the distributed key-value store, not a broadcast program: a follower
  waits for the next plan for as long as the leader is idle, and a wait inside a collective can
  neither time out cleanly (XLA:CPU aborts a process whose collective partner is late) nor notice
  that the leader died; a blocking get with a timeout can. The cost is one put on the leader and
  one get per follower per program (measured in BENCHMARKS.md).
- Loading: each process restores only the shards its own devices hold (orbax restores into the
  target sharding, jaxserve/checkpoint.py). Sizes that depend on a host (the KV pool from free
  memory) are agreed on, the smallest, so every process builds the same shapes.
- Faults: every process writes a heartbeat to the store; the leader watches the followers' and
  each follower the leader's. A heartbeat older than `peer_timeout` (the process died or hangs),
  or a store that stops answering (it lives in the leader's process), is a lost peer: listeners
  are told (the server turns health NOT_SERVING and fails the requests in flight with
  UNAVAILABLE), then the process exits with PEER_LOST_EXIT. A program whose partner is gone never
  returns, so exiting is the only way not to hang. jax's own heartbeat, which aborts the process,
  is set longer, as a backstop; when the leader's process is gone, jax's client usually aborts
  the followers (non-zero) before their heartbeat check does.
- Shutdown: at exit the leader sends `stop`; the followers leave their loop and every process
  meets at a barrier before jax shuts the service down.

What this module must never do: schedule, touch request objects, or import the engine.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
import sys
import threading
import time
from typing import Callable

from jaxserve.settings import DistributedSettings, parse_address

PEER_LOST_EXIT = 75  # EX_TEMPFAIL: the job can be started again
EXIT_GRACE_S = 3.0  # how long the leader keeps answering (health NOT_SERVING) before it exits
_ALIVE = "jaxserve/alive/"


class PeerLost(ConnectionError):
    """Another process of the engine died or stopped answering: the engine cannot step."""


def join(settings: DistributedSettings) -> Cluster | None:
    """Join the other processes (None when `settings` is off). Call before any device is used.
    Errors are clear before jax is asked: a coordinator port already taken (leader), or a
    coordinator that does not answer within `connect_timeout` (followers)."""
    if not settings.enabled:
        return None
    import jax
    from jax._src import distributed as jax_distributed  # its client is the key-value store

    if jax_distributed.global_state.client is not None:
        raise RuntimeError("jax.distributed is already initialized in this process: one "
                           "multi-process engine per process")
    host, port = parse_address(settings.coordinator)
    if settings.is_leader:
        _check_free(port, settings.coordinator)
    else:
        _wait_reachable(host, port, settings)
    jax.distributed.initialize(
        settings.coordinator, settings.num_processes, settings.process_id,
        initialization_timeout=math.ceil(settings.connect_timeout),
        heartbeat_timeout_seconds=math.ceil(settings.peer_timeout + EXIT_GRACE_S) + 30)
    return Cluster(settings, jax_distributed.global_state.client)


def _check_free(port: int, address: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise ValueError(f"coordinator {address}: port {port} is taken on this host ({e}); "
                             f"process 0 runs the coordinator there") from None


def _wait_reachable(host: str, port: int, settings: DistributedSettings) -> None:
    deadline = time.monotonic() + settings.connect_timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"cannot reach the coordinator {settings.coordinator} within "
                    f"{settings.connect_timeout:g} s ({e}): start process 0 with --coordinator "
                    f"{settings.coordinator} --num-processes {settings.num_processes} "
                    f"--process-id 0, or raise --connect-timeout") from None
            time.sleep(0.2)


class Cluster:
    """This process's place among the engine's processes: who leads, the plan channel, the
    heartbeats, and what to do when another process is lost."""

    def __init__(self, settings: DistributedSettings, client):
        from jaxserve.runtime.plan_channel import PlanChannel

        self.settings = settings
        self.client = client
        self.process_id = settings.process_id
        self.num_processes = settings.num_processes
        self.is_leader = settings.is_leader
        self.channel = PlanChannel(client, poll_s=min(1.0, settings.peer_timeout / 4))
        self._listeners: list[Callable[[PeerLost], None]] = []
        self._lost = threading.Lock()  # held by the first report of a lost peer
        self._closing = threading.Event()
        self._watched = [p for p in range(self.num_processes) if p != self.process_id] \
            if self.is_leader else [0]
        threading.Thread(target=self._heartbeat, name="jaxserve-heartbeat", daemon=True).start()
        # At exit (before jax's own shutdown, registered earlier): the leader stops the
        # followers; a follower that exits on its own (an error while loading) stops beating,
        # so the leader does not wait on it for longer than peer_timeout.
        atexit.register(self.close if self.is_leader else self._closing.set)

    def on_lost(self, listener: Callable[[PeerLost], None]) -> None:
        """Call `listener(error)` (from the heartbeat thread) when a peer is lost, before this
        process exits."""
        self._listeners.append(listener)

    def agree_min(self, name: str, values: tuple[int, ...]) -> tuple[int, ...]:
        """Every process's `values`, the smallest of each (sizes that must match everywhere)."""
        prefix = f"jaxserve/agree/{name}/"
        self.client.key_value_set(prefix + str(self.process_id), ",".join(map(str, values)))
        timeout_ms = int(self.settings.connect_timeout * 1000)
        every = [tuple(int(v) for v in self.client.blocking_key_value_get(
            prefix + str(p), timeout_ms).split(",")) for p in range(self.num_processes)]
        return tuple(min(column) for column in zip(*every))

    def close(self) -> None:
        """The end of the job: the leader tells the followers to stop; all meet at a barrier."""
        if self._closing.is_set():
            return
        self._closing.set()  # a follower that stops beating now is not lost
        try:
            if self.is_leader:
                self.channel.send("stop", ())
            self.client.wait_at_barrier("jaxserve/stop",
                                        int(self.settings.peer_timeout * 1000))
        except Exception as e:  # a peer is already gone: nothing left to stop
            print(f"jaxserve: process {self.process_id}: shutdown barrier failed: {e}",
                  file=sys.stderr, flush=True)

    # ---- heartbeats ----
    def _heartbeat(self) -> None:
        timeout = self.settings.peer_timeout
        interval = min(1.0, timeout / 4)
        seen = {p: (None, time.monotonic()) for p in self._watched}  # last value, when it changed
        beat = 0
        while not self._closing.is_set():
            beat += 1
            try:
                self.client.key_value_set(_ALIVE + str(self.process_id), str(beat),
                                          allow_overwrite=True)
            except Exception as e:
                if not self._closing.is_set():
                    self.lose(PeerLost(f"the coordinator {self.settings.coordinator} (process "
                                       f"0) stopped answering: {e}"))
                return
            now = time.monotonic()
            for p in self._watched:
                try:
                    value = self.client.key_value_try_get(_ALIVE + str(p))
                except Exception:  # not written yet
                    value = None
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > timeout and not self._closing.is_set():
                    self.lose(PeerLost(f"process {p} sent no heartbeat for {timeout:g} s "
                                       f"(it died or hangs)"))
                    return
            self._closing.wait(interval)

    def lose(self, error: PeerLost) -> None:
        """A peer is lost: tell the listeners, give the front ends EXIT_GRACE_S to report it
        (leader), and exit non-zero: a step waiting on the lost peer would never return."""
        if not self._lost.acquire(blocking=False):
            return
        role = "leader" if self.is_leader else "follower"
        print(f"jaxserve: process {self.process_id} ({role}): {error}; exiting",
              file=sys.stderr, flush=True)
        for listener in self._listeners:
            try:
                listener(error)
            except Exception as e:
                print(f"jaxserve: while reporting the lost peer: {e!r}", file=sys.stderr,
                      flush=True)
        if self.is_leader and self._listeners:
            time.sleep(EXIT_GRACE_S)
        os._exit(PEER_LOST_EXIT)
