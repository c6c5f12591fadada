"""What every front end (server.py: gRPC, http.py: OpenAI-compatible HTTP) shares: the served
engine's life cycle, its health, the requests in flight, drain and abort.

Neither front end owns this module; each talks to a `ServedEngine` only through the names
below. The gRPC `Server` makes one (`server.engine`) so that it can stand alone; whoever composes
several front ends (serving/serve.py) hands that same engine to the others (`HTTPFrontEnd`), so
they share one EngineLoop, one queue, one set of metrics and one drain.

Life cycle (`Phase`): LOADING (ports bound, model loading) -> attach(llm) -> SERVING ->
drain(timeout) -> DRAINING (new requests refused; those in flight finish for up to `timeout`
seconds, then are aborted) -> stop() -> STOPPED. The engine loop failing turns SERVING (or
LOADING) into FAILED. A front end that reports health (gRPC's health service) subscribes with
`on_phase`; one that polls (HTTP /health) calls `check_engine()` and reads `phase`.

A request a front end is running is registered with `start_request` / `end_request`, so that
drain waits for it; a handler whose client went away calls `abort_collecting`.

What this module must never do: speak a wire protocol (no grpc, no HTTP), touch the Engine
directly (only EngineLoop.submit / abort / drain / stop, plus the on_step metrics hook that
EngineLoop runs on its own thread), or block the engine thread.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import queue
import threading
import time
from typing import Callable

from jaxserve.engine.loop import EngineLoop, Final, LoopState
from jaxserve.serving.metrics import ServingMetrics

log = logging.getLogger("jaxserve.serving")

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20  # the largest request a front end accepts
DEFAULT_MAX_WORKERS = 64  # handler threads of a front end


class Phase(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class NotServing(Exception):
    """The engine does not take requests now; the message says its phase."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the front ends report about the served model (gRPC GetModelInfo, HTTP /v1/models).
    Read once at attach, before the EngineLoop owns the engine."""

    model: str  # the checkpoint directory's name: the model id clients send
    family: str  # the model family of its config ("llama", ...)
    vocab_size: int
    max_model_len: int  # prompt + output tokens of one sequence
    mesh: dict[str, int]  # mesh axis -> devices
    rules: str  # the sharding rules' name
    dtype: str  # of the KV cache
    num_params: int
    max_num_seqs: int  # sequences decoded at once, per DP replica
    block_size: int  # tokens per KV block
    kv_blocks: int  # KV blocks in the pool

    @classmethod
    def of(cls, llm) -> ModelInfo:
        config = llm.config
        return cls(model=llm.model_dir.name, family=config.family,
                   vocab_size=config.vocab_size, max_model_len=llm.max_model_len,
                   mesh=dict(llm.layout.mesh.shape), rules=llm.layout.rules.name,
                   dtype=llm.runner.kv.dtype.name, num_params=config.num_params(),
                   max_num_seqs=llm.engine.config.max_num_seqs,
                   block_size=llm.runner.block_size, kv_blocks=llm.engine.kv_blocks_total)


class ServedEngine:
    """One LLM behind the front ends: its phase, EngineLoop, metrics and requests in flight."""

    def __init__(self, max_queue: int = 256, step_delay: float = 0.0):
        self.max_queue = max_queue
        self.step_delay = step_delay  # tests only: sleep after each engine step
        self.phase = Phase.LOADING
        self.llm = None
        self.loop: EngineLoop | None = None
        self.info: ModelInfo | None = None
        self.metrics = ServingMetrics()
        self._active: set[str] = set()  # ids of the requests a front end is running
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Phase], None]] = []

    def on_phase(self, listener: Callable[[Phase], None]) -> None:
        """Call `listener(phase)` when the engine starts SERVING, DRAINING, or FAILED (FAILED
        may be reported again)."""
        self._listeners.append(listener)

    def _tell(self, phase: Phase) -> None:
        for listener in self._listeners:
            listener(phase)

    # ---- life cycle ----
    def attach(self, llm) -> None:
        """The model is loaded: start its EngineLoop and serve."""
        self.llm, self.info = llm, ModelInfo.of(llm)
        self.metrics.start_from(llm.stats())  # before the loop owns the engine
        self.loop = EngineLoop(llm.engine, max_queue=self.max_queue, on_step=self._on_step)
        with self._lock:
            if self.phase is not Phase.LOADING:  # drained while loading
                return
            self.phase = Phase.SERVING
        self._tell(Phase.SERVING)

    def check_engine(self) -> bool:
        """False (and the phase FAILED) once the engine loop has failed."""
        if self.loop is not None and self.loop.state is LoopState.FAILED:
            self.mark_failed()
            return False
        return True

    def mark_failed(self) -> None:
        """The engine failed (a request saw it, or check_engine did): stop serving."""
        with self._lock:
            if self.phase in (Phase.SERVING, Phase.LOADING):
                self.phase = Phase.FAILED
                log.error("the engine failed: %r; health is NOT_SERVING",
                          self.loop.error if self.loop else None)
        self._tell(Phase.FAILED)

    def fail(self, error: BaseException) -> None:
        """The engine cannot go on (e.g. another of its processes was lost): end the requests
        in flight with `error` and stop serving."""
        if self.loop is not None:
            self.loop.fail(error)
        self.mark_failed()

    def serving_loop(self) -> EngineLoop:
        """The loop to hand a request to; NotServing unless the phase is SERVING."""
        self.check_engine()
        if self.phase is not Phase.SERVING or self.loop is None:
            raise NotServing(f"server is {self.phase.value}")
        return self.loop

    def drain(self, timeout: float) -> int:
        """Stop taking requests, wait up to `timeout` s for those in flight, abort the rest.
        Returns how many were aborted."""
        with self._lock:
            if self.phase in (Phase.LOADING, Phase.SERVING):
                self.phase = Phase.DRAINING
        self._tell(Phase.DRAINING)
        if self.loop is None:
            return 0
        self.loop.drain()
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            left = list(self._active)
        for request_id in left:
            log.info("shutdown timeout: aborting %s", request_id)
            self.abort(request_id)
        deadline = time.monotonic() + 5.0  # let the handlers send their final messages
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(left)

    def stop(self) -> None:
        with self._lock:
            self.phase = Phase.STOPPED
        if self.loop is not None:
            self.loop.stop()

    # ---- requests ----
    def start_request(self, request_id: str) -> bool:
        """Register a request a front end runs (drain waits for it); False if that id is
        already in flight."""
        with self._lock:
            if request_id in self._active:
                return False
            self._active.add(request_id)
            return True

    def end_request(self, request_id: str) -> None:
        with self._lock:
            self._active.discard(request_id)

    @property
    def in_flight(self) -> int:
        """How many requests the front ends are running."""
        return len(self._active)

    def abort(self, request_id: str) -> bool:
        """Abort a request in the engine; False if it is not there (or the loop is gone)."""
        loop = self.loop
        if loop is None or loop.state is LoopState.STOPPED:  # its thread is gone
            return False
        return loop.abort(request_id)

    def abort_collecting(self, request_id: str, stream, finals: list) -> None:
        """Abort a request whose client is gone; add the Finals the abort queued to `finals`."""
        if self.abort(request_id):
            while True:  # abort() has queued the Finals by the time it returns
                try:
                    event = stream.events.get_nowait()
                except queue.Empty:
                    break
                if isinstance(event, Final):
                    finals.append(event)

    def _on_step(self, loop, step_s: float) -> None:
        self.metrics.on_step(loop, step_s)
        if self.step_delay:
            time.sleep(self.step_delay)
