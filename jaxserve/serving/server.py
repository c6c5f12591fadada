"""The gRPC front end of `jaxserve serve`: jaxserve.v1.JaxServe, grpc.health.v1, reflection, and
the Prometheus metrics port, over a `ServedEngine` (serving/frontend.py).

Life cycle (`Server`): start() binds the ports and answers health (NOT_SERVING) before the model
is loaded; attach(llm) starts the engine's EngineLoop and health turns SERVING; drain(timeout)
turns health NOT_SERVING, refuses new requests with UNAVAILABLE, lets requests in flight finish
for up to `timeout` seconds and then aborts them (their streams end with Final messages whose
finish_reason is "abort", status OK); stop() closes everything. The phases, the requests in
flight, drain and abort are the ServedEngine's (`server.engine`): other front ends (http.py) are
handed that same engine by whoever composes them (serving/serve.py). With port None the Server
binds no gRPC port and only serves the metrics port, if any.

Each Generate call runs on a gRPC handler thread: validate (convert.parse_generate), submit to
the EngineLoop, then relay the request's stream, polling it briefly so that a client that
cancels or passes its deadline is noticed and its request aborted (KV blocks freed within one
engine step). A Score call is the same with one answer: validate (convert.parse_score), queue
the run on the EngineLoop (which interleaves its steps with generation), wait for it. Status
codes are listed in jaxserve.proto. With an API key (serving/auth.py) an interceptor answers a
call without `authorization: Bearer KEY` metadata with UNAUTHENTICATED before any handler runs.

What this module must never do: touch the Engine directly (only EngineLoop.submit / abort /
score, through the ServedEngine), or block the engine thread.
"""

from __future__ import annotations

import queue
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.engine.loop import (Delta, EngineLoop, Failure, Final, NotAccepting, QueueFull,
                                  ScoreAborted)
from jaxserve.runtime.distributed import PeerLost
from jaxserve.serving import convert
from jaxserve.serving import jaxserve_pb2 as pb
from jaxserve.serving import jaxserve_pb2_grpc as pb_grpc
from jaxserve.serving.auth import Auth, Endpoint
from jaxserve.serving.frontend import (DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_WORKERS, NotServing,
                                       Phase, ServedEngine)
from jaxserve.serving.metrics import start_metrics_server

SERVICE = pb.DESCRIPTOR.services_by_name["JaxServe"].full_name  # "jaxserve.v1.JaxServe"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
POLL_S = 0.05  # how often a waiting handler checks that its client is still there
Code = grpc.StatusCode
_HANDLER_KINDS = {  # (request streaming, response streaming) -> how to make such a handler
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class KeyCheck(grpc.ServerInterceptor):
    """UNAUTHENTICATED for a call whose `authorization` metadata `auth` refuses (health checks
    only when `auth` protects health)."""

    def __init__(self, auth: Auth):
        self.auth = auth

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED
            return None
        endpoint = Endpoint.HEALTH if details.method.startswith(f"/{HEALTH_SERVICE}/") \
            else Endpoint.API
        value = next((v for k, v in details.invocation_metadata or () if k == "authorization"),
                     None)
        refusal = self.auth.refusal(endpoint, value)
        if refusal is None:
            return handler

        def refuse(request, context):
            context.abort(Code.UNAUTHENTICATED, refusal)

        make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return make(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class Server(pb_grpc.JaxServeServicer):
    def __init__(self, host: str = "127.0.0.1", port: int | None = 0, *,
                 metrics_port: int | None = None, auth: Auth = Auth(),
                 max_queue: int = 256, max_workers: int = DEFAULT_MAX_WORKERS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, step_delay: float = 0.0):
        self.host, self.requested_port = host, port
        self.port: int | None = None
        self.metrics_port = metrics_port
        self.auth = auth
        self.max_workers = max_workers
        self.max_message_bytes = max_message_bytes
        self.engine = ServedEngine(max_queue, step_delay)
        self.engine.on_phase(self._on_phase)
        self.health = health.HealthServicer()
        self._grpc: grpc.Server | None = None
        self._httpd = None

    @property
    def step_delay(self) -> float:  # tests only: sleep after each engine step
        return self.engine.step_delay

    @step_delay.setter
    def step_delay(self, seconds: float) -> None:
        self.engine.step_delay = seconds

    # ---- life cycle ----
    def start(self) -> Server:
        """Bind; serve health, reflection, metrics. Generate is UNAVAILABLE until attach().
        With port None there is no gRPC port (another front end serves the engine)."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.requested_port is not None:
            self._start_grpc()
        if self.metrics_port is not None:
            self._httpd = start_metrics_server(self.engine.metrics.registry, self.host,
                                               self.metrics_port, self.auth)
            self.metrics_port = self._httpd.server_port
        return self

    def _start_grpc(self) -> None:
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="jaxserve-rpc"),
            options=[("grpc.max_receive_message_length", self.max_message_bytes),
                     ("grpc.so_reuseport", 0)],
            interceptors=[KeyCheck(self.auth)] if self.auth.api_key is not None else [],
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
            [SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], self._grpc)
        self.port = self._grpc.add_insecure_port(f"{self.host}:{self.requested_port}")
        self._grpc.start()

    def attach(self, llm) -> None:
        """The model is loaded: start its EngineLoop and serve."""
        self.engine.attach(llm)

    def drain(self, timeout: float) -> int:
        """Stop taking requests, wait up to `timeout` s for those in flight, abort the rest.
        Returns how many were aborted."""
        return self.engine.drain(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        self.engine.stop()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # ---- jaxserve.v1.JaxServe ----
    def Generate(self, request, context):
        loop, request_id = self._accept(request, context, "req")
        try:
            prompt_ids, text, params = convert.parse_generate(request, self.engine.llm)
        except (ValueError, TypeError) as e:
            context.abort(Code.INVALID_ARGUMENT, str(e))
        self._activate(request_id, context)
        try:
            stream = self._queue(context, loop.submit, request_id, prompt_ids, params, text)
            yield from self._relay(request_id, stream, params.logprobs, context)
        finally:
            self.engine.end_request(request_id)

    def Score(self, request, context):
        """Validate, queue the scoring run on the EngineLoop, wait for it (noticing a client
        that leaves: its run is aborted and its KV blocks freed within one engine step)."""
        loop, request_id = self._accept(request, context, "score")
        try:
            job = convert.parse_score(request, self.engine.llm)
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
                        self.engine.abort(request_id)
                        return pb.ScoreResponse()
                except ScoreAborted as e:
                    context.abort(Code.ABORTED, str(e))
                except NotAccepting as e:
                    context.abort(Code.UNAVAILABLE, f"server stopped: {e}")
                except Exception as e:  # the engine failed (health follows), or the run did
                    self.engine.check_engine()
                    context.abort(Code.INTERNAL, f"scoring failed: {e!r}")
            output = self.engine.llm.score_output(job, run.scores[0])
            return convert.score_response(request_id, output)
        finally:
            self.engine.end_request(request_id)

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
                    self.engine.mark_failed()
                    if isinstance(event.error, PeerLost):  # retry once the job is restarted
                        context.abort(Code.UNAVAILABLE, f"engine failed: {event.error}")
                    context.abort(Code.INTERNAL, f"engine failed: {event.error!r}")
            settled = True
        finally:  # also on GeneratorExit, when grpc drops a cancelled call
            if not settled:
                self.engine.abort_collecting(request_id, stream, finals)
            self.engine.metrics.request_finished(finals)

    def Abort(self, request, context):
        if isinstance(request, convert.Malformed):
            context.abort(Code.INVALID_ARGUMENT, request.message)
        if not request.request_id:
            context.abort(Code.INVALID_ARGUMENT, "request_id is empty")
        engine = self.engine
        if engine.loop is None or engine.phase is Phase.STOPPED:
            context.abort(Code.UNAVAILABLE, f"server is {engine.phase.value}")
        if not engine.abort(request.request_id):
            context.abort(Code.NOT_FOUND, f"request_id {request.request_id!r} is not in flight")
        return pb.AbortResponse()

    def GetModelInfo(self, request, context):
        if self.engine.info is None:
            context.abort(Code.UNAVAILABLE, f"server is {self.engine.phase.value}")
        return convert.model_info(self.engine.info)

    # ---- helpers ----
    def _accept(self, request, context, kind: str) -> tuple[EngineLoop, str]:
        """The loop to hand a well-formed request to, and the request's id (one is made up)."""
        if isinstance(request, convert.Malformed):
            context.abort(Code.INVALID_ARGUMENT, request.message)
        try:
            loop = self.engine.serving_loop()
        except NotServing as e:
            context.abort(Code.UNAVAILABLE, str(e))
        try:
            return loop, convert.request_id_of(request) or f"{kind}-{uuid.uuid4().hex}"
        except ValueError as e:
            context.abort(Code.INVALID_ARGUMENT, str(e))

    def _activate(self, request_id: str, context) -> None:
        if not self.engine.start_request(request_id):
            context.abort(Code.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight")

    def _queue(self, context, submit, *args):
        """Hand work to the loop (`submit` or `score`), its refusals as status codes."""
        try:
            return submit(*args)
        except QueueFull as e:
            context.abort(Code.RESOURCE_EXHAUSTED, f"queue full: {e}")
        except NotAccepting as e:
            self.engine.check_engine()
            context.abort(Code.UNAVAILABLE, f"not accepting requests: {e}")
        except (ValueError, TypeError) as e:
            context.abort(Code.INVALID_ARGUMENT, str(e))

    def _on_phase(self, phase: Phase) -> None:
        if phase is Phase.SERVING:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        elif phase is Phase.DRAINING:
            self.health.enter_graceful_shutdown()
        else:
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for service in ("", SERVICE):
            self.health.set(service, status)
