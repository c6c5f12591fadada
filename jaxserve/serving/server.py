"""The gRPC server of `jaxserve serve`: jaxserve.v1.JaxServe, grpc.health.v1, reflection, metrics.

Life cycle (`Server`): start() binds the port and answers health (NOT_SERVING) before the model
is loaded; attach(llm) starts an EngineLoop and turns health SERVING; drain(timeout) turns health
NOT_SERVING, refuses new requests with UNAVAILABLE, lets requests in flight finish for up to
`timeout` seconds and then aborts them (their streams end with Final messages whose
finish_reason is "abort", status OK); stop() closes everything. `serve(args, make_llm)` runs that
for the CLI and drains on SIGTERM / SIGINT.

Each Generate call runs on a gRPC handler thread: validate (convert.parse_generate), submit to
the EngineLoop, then relay the request's stream, polling it briefly so that a client that
cancels or passes its deadline is noticed and its request aborted (KV blocks freed within one
engine step). A Score call is the same with one answer: validate (convert.parse_score), queue
the run on the EngineLoop (which interleaves its steps with generation), wait for it. Status
codes are listed in jaxserve.proto.

What this module must never do: touch the Engine directly (only EngineLoop.submit / abort /
drain / stop, plus the on_step metrics hook that EngineLoop runs on its own thread), or block
the engine thread.

The OpenAI-compatible HTTP front end (serving/http.py, `--http-port`) runs over the same Server
(phase, EngineLoop, metrics, `_active` for drain); with `--no-grpc` the Server binds no gRPC
port (port None) and only HTTP serves.
"""

from __future__ import annotations

import enum
import math
import logging
import queue
import signal
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.engine.loop import (Delta, EngineLoop, Failure, Final, LoopState, NotAccepting,
                                  QueueFull, ScoreAborted)
from jaxserve.serving import convert
from jaxserve.serving import jaxserve_pb2 as pb
from jaxserve.serving import jaxserve_pb2_grpc as pb_grpc
from jaxserve.serving.metrics import ServingMetrics

log = logging.getLogger("jaxserve.serving")

SERVICE = pb.DESCRIPTOR.services_by_name["JaxServe"].full_name  # "jaxserve.v1.JaxServe"
POLL_S = 0.05  # how often a waiting handler checks that its client is still there
DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20
Code = grpc.StatusCode


class Phase(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class Server(pb_grpc.JaxServeServicer):
    def __init__(self, host: str = "127.0.0.1", port: int | None = 0, *,
                 metrics_port: int | None = None,
                 max_queue: int = 256, max_workers: int = 64,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, step_delay: float = 0.0):
        self.host, self.requested_port = host, port
        self.port: int | None = None
        self.metrics_port = metrics_port
        self.max_queue, self.max_workers = max_queue, max_workers
        self.max_message_bytes = max_message_bytes
        self.step_delay = step_delay  # tests only: sleep after each engine step
        self.phase = Phase.LOADING
        self.llm = None
        self.loop: EngineLoop | None = None
        self.info: pb.ModelInfo | None = None
        self.metrics = ServingMetrics()
        self.health = health.HealthServicer()
        self._active: set[str] = set()  # request ids with a Generate handler running
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._httpd = None

    # ---- life cycle ----
    def start(self) -> Server:
        """Bind; serve health, reflection, metrics. Generate is UNAVAILABLE until attach().
        With port None there is no gRPC port (the HTTP front end alone uses this Server)."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.requested_port is not None:
            self._start_grpc()
        if self.metrics_port is not None:
            from prometheus_client import start_http_server

            self._httpd, _ = start_http_server(self.metrics_port, addr=self.host,
                                               registry=self.metrics.registry)
            self.metrics_port = self._httpd.server_port
        return self

    def _start_grpc(self) -> None:
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="jaxserve-rpc"),
            options=[("grpc.max_receive_message_length", self.max_message_bytes),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.max_workers)
        lenient = convert.lenient
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, lenient(pb.GenerateRequest), pb.GenerateResponse.SerializeToString),
            "Abort": grpc.unary_unary_rpc_method_handler(
                self.Abort, lenient(pb.AbortRequest), pb.AbortResponse.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, lenient(pb.GetModelInfoRequest),
                pb.ModelInfo.SerializeToString),
            "Score": grpc.unary_unary_rpc_method_handler(
                self.Score, lenient(pb.ScoreRequest), pb.ScoreResponse.SerializeToString),
        }
        self._grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE,
                                                                                  handlers)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self._grpc)
        self.port = self._grpc.add_insecure_port(f"{self.host}:{self.requested_port}")
        self._grpc.start()

    def attach(self, llm) -> None:
        """The model is loaded: start its EngineLoop and serve."""
        self.llm, self.info = llm, convert.model_info(llm)
        self.metrics.start_from(llm.stats())  # before the loop owns the engine
        self.loop = EngineLoop(llm.engine, max_queue=self.max_queue, on_step=self._on_step)
        with self._lock:
            if self.phase is not Phase.LOADING:  # drained while loading
                return
            self.phase = Phase.SERVING
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def check_engine(self) -> bool:
        """False (and health NOT_SERVING) once the engine loop has failed."""
        if self.loop is not None and self.loop.state is LoopState.FAILED:
            self._mark_failed()
            return False
        return True

    def drain(self, timeout: float) -> int:
        """Stop taking requests, wait up to `timeout` s for those in flight, abort the rest.
        Returns how many were aborted."""
        with self._lock:
            if self.phase in (Phase.LOADING, Phase.SERVING):
                self.phase = Phase.DRAINING
        self.health.enter_graceful_shutdown()
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
            self._abort(request_id)
        deadline = time.monotonic() + 5.0  # let the handlers send their final messages
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(left)

    def stop(self, grace: float = 1.0) -> None:
        with self._lock:
            self.phase = Phase.STOPPED
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self.loop is not None:
            self.loop.stop()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # ---- jaxserve.v1.JaxServe ----
    def Generate(self, request, context):
        loop, request_id = self._accept(request, context, "req")
        try:
            prompt_ids, text, params = convert.parse_generate(request, self.llm)
        except (ValueError, TypeError) as e:
            context.abort(Code.INVALID_ARGUMENT, str(e))
        self._activate(request_id, context)
        try:
            stream = self._queue(context, loop.submit, request_id, prompt_ids, params, text)
            yield from self._relay(request_id, stream, params.logprobs, context)
        finally:
            with self._lock:
                self._active.discard(request_id)

    def Score(self, request, context):
        """Validate, queue the scoring run on the EngineLoop, wait for it (noticing a client
        that leaves: its run is aborted and its KV blocks freed within one engine step)."""
        loop, request_id = self._accept(request, context, "score")
        try:
            job = convert.parse_score(request, self.llm)
        except (ValueError, TypeError) as e:
            context.abort(Code.INVALID_ARGUMENT, str(e))
        self._activate(request_id, context)
        try:
            future = self._queue(context, loop.score, request_id, [job])
            while True:
                try:
                    run = future.result(timeout=POLL_S)
                    break
                except TimeoutError:
                    if not context.is_active():  # cancelled or past its deadline
                        self._abort(request_id)
                        return pb.ScoreResponse()
                except ScoreAborted as e:
                    context.abort(Code.ABORTED, str(e))
                except NotAccepting as e:
                    context.abort(Code.UNAVAILABLE, f"server stopped: {e}")
                except Exception as e:  # the engine failed (health follows), or the run did
                    self.check_engine()
                    context.abort(Code.INTERNAL, f"scoring failed: {e!r}")
            return convert.score_response(request_id, self.llm.score_output(job, run.scores[0]))
        finally:
            with self._lock:
                self._active.discard(request_id)

    def _relay(self, request_id, stream, num_logprobs, context):
        """Stream events -> responses until every sequence has its Final."""
        finals: list[Final] = []
        settled = False  # True once nothing of this request is left in the engine
        try:
            while len(finals) < stream.open_sequences:
                try:
                    event = stream.get(timeout=POLL_S)
                except queue.Empty:
                    if not context.is_active():  # cancelled or past its deadline
                        return
                    continue
                if isinstance(event, Delta):
                    yield convert.delta_response(request_id, event, num_logprobs)
                elif isinstance(event, Final):
                    finals.append(event)
                    yield from convert.final_responses(request_id, event)
                elif isinstance(event, Failure):
                    settled = True
                    if isinstance(event.error, NotAccepting):  # the loop was stopped
                        context.abort(Code.UNAVAILABLE, f"server stopped: {event.error}")
                    self._mark_failed()
                    context.abort(Code.INTERNAL, f"engine failed: {event.error!r}")
            settled = True
        finally:  # also on GeneratorExit, when grpc drops a cancelled call
            if not settled:
                self._abort_collecting(request_id, stream, finals)
            self.metrics.request_finished(finals)

    def Abort(self, request, context):
        if isinstance(request, convert.Malformed):
            context.abort(Code.INVALID_ARGUMENT, request.message)
        if not request.request_id:
            context.abort(Code.INVALID_ARGUMENT, "request_id is empty")
        if self.loop is None or self.phase is Phase.STOPPED:
            context.abort(Code.UNAVAILABLE, f"server is {self.phase.value}")
        if not self._abort(request.request_id):
            context.abort(Code.NOT_FOUND, f"request_id {request.request_id!r} is not in flight")
        return pb.AbortResponse()

    def GetModelInfo(self, request, context):
        if self.info is None:
            context.abort(Code.UNAVAILABLE, f"server is {self.phase.value}")
        return self.info

    # ---- helpers ----
    def _accept(self, request, context, kind: str) -> tuple[EngineLoop, str]:
        """The loop to hand a well-formed request to, and the request's id (one is made up)."""
        if isinstance(request, convert.Malformed):
            context.abort(Code.INVALID_ARGUMENT, request.message)
        loop = self._serving_loop(context)
        try:
            return loop, convert.request_id_of(request) or f"{kind}-{uuid.uuid4().hex}"
        except ValueError as e:
            context.abort(Code.INVALID_ARGUMENT, str(e))

    def _activate(self, request_id: str, context) -> None:
        with self._lock:
            if request_id in self._active:
                context.abort(Code.ALREADY_EXISTS, f"request_id {request_id!r} is already in "
                                                   "flight")
            self._active.add(request_id)

    def _queue(self, context, submit, *args):
        """Hand work to the loop (`submit` or `score`), its refusals as status codes."""
        try:
            return submit(*args)
        except QueueFull as e:
            context.abort(Code.RESOURCE_EXHAUSTED, f"queue full: {e}")
        except NotAccepting as e:
            self.check_engine()
            context.abort(Code.UNAVAILABLE, f"not accepting requests: {e}")
        except (ValueError, TypeError) as e:
            context.abort(Code.INVALID_ARGUMENT, str(e))

    def _serving_loop(self, context) -> EngineLoop:
        self.check_engine()
        if self.phase is not Phase.SERVING or self.loop is None:
            context.abort(Code.UNAVAILABLE, f"server is {self.phase.value}")
        return self.loop

    def _abort_collecting(self, request_id: str, stream, finals: list) -> None:
        """Abort a request whose client is gone; add the Finals the abort queued to `finals`."""
        if self._abort(request_id):
            while True:  # abort() has queued the Finals by the time it returns
                try:
                    event = stream.events.get_nowait()
                except queue.Empty:
                    break
                if isinstance(event, Final):
                    finals.append(event)

    def _abort(self, request_id: str) -> bool:
        loop = self.loop
        if loop is None or loop.state is LoopState.STOPPED:  # its thread is gone
            return False
        return loop.abort(request_id)

    def _on_step(self, loop, step_s: float) -> None:
        self.metrics.on_step(loop, step_s)
        if self.step_delay:
            time.sleep(self.step_delay)

    def _mark_failed(self) -> None:
        with self._lock:
            if self.phase in (Phase.SERVING, Phase.LOADING):
                self.phase = Phase.FAILED
                log.error("the engine failed: %r; health is NOT_SERVING",
                          self.loop.error if self.loop else None)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for service in ("", SERVICE):
            self.health.set(service, status)


def _decoding_streams(args) -> int:
    """Streams the engine can decode at once (known before the model loads): per DP replica
    `max_num_seqs`, times at most every device of the mesh being a replica."""
    from jaxserve.settings import SchedulerSettings
    from jaxserve.sharding import parse_mesh

    per_replica = args.max_num_seqs or SchedulerSettings().max_num_seqs
    devices = math.prod(parse_mesh(args.mesh).values()) if args.mesh else 1
    return per_replica * devices


def serve(args, make_llm, on_ready=None) -> int:
    """`jaxserve serve`: start, load, serve until SIGTERM/SIGINT, drain, exit 0. `on_ready(llm)`
    runs once the model is loaded (and warmed up), before the engine thread owns it."""
    grpc_port = None if getattr(args, "no_grpc", False) else args.port
    http_port = getattr(args, "http_port", None)
    if grpc_port is None and http_port is None:
        raise ValueError("--no-grpc needs --http-port")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # absl may have configured the root logger too
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(args.host, grpc_port, metrics_port=args.metrics_port,
                    max_queue=args.max_queue,
                    max_workers=_decoding_streams(args) + args.max_queue + 16,
                    max_message_bytes=args.max_message_bytes, step_delay=args.step_delay)
    try:
        server.start()
    except RuntimeError as e:  # grpc could not bind
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    http = None
    try:
        if http_port is not None:
            from jaxserve.serving.http import HTTPFrontEnd

            try:
                http = HTTPFrontEnd(server, args.host, http_port).start()
            except OSError as e:
                raise ValueError(f"cannot listen on {args.host}:{http_port} (HTTP): {e}"
                                 ) from None
        where = f"{args.host}:{server.port}" if grpc_port is not None else \
            f"{args.host} (gRPC off)"
        metrics = f"metrics on :{server.metrics_port}" if server.metrics_port else "metrics off"
        extra = f" (HTTP on :{http.port})" if http is not None else ""
        print(f"jaxserve: listening on {where} ({metrics}){extra}, loading {args.model}",
              file=sys.stderr, flush=True)
        if args.load_delay:
            stop.wait(args.load_delay)
        if not stop.is_set():
            llm = make_llm(args)
            if args.warmup:
                llm.warmup()
            if on_ready is not None:
                on_ready(llm)
            server.attach(llm)
        if not stop.is_set():
            print(f"jaxserve serving on {where} ({metrics}){extra}", flush=True)
            while not stop.wait(0.2):
                server.check_engine()
        aborted = server.drain(args.shutdown_timeout)
        print(f"jaxserve: drained ({aborted} request(s) aborted at the shutdown timeout)",
              file=sys.stderr, flush=True)
    finally:
        if http is not None:
            http.stop()
        server.stop()
    return 0
