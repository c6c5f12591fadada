"""The OpenAI-compatible HTTP front end of `jaxserve serve --http-port`: a FastAPI app run by
uvicorn on its own thread, over a `ServedEngine` (serving/frontend.py: phase, EngineLoop,
metrics, drain), the same one as the gRPC front end's when both run.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events ending with `data: [DONE]`), GET /v1/models, GET /health (200 serving, 503 otherwise),
GET /metrics (the engine's Prometheus registry). With an API key (serving/auth.py) a route
without `Authorization: Bearer KEY` answers 401 before its body is read; /health and /metrics
only when the key protects them.

Requests are parsed by hand from the JSON body (not by pydantic models) so that every error is
OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, and names the field: 400 bad
field / JSON / type, 401 API key missing or wrong, 404 unknown model, 413 body over
`max_body_bytes`, 429 queue full, 503
loading / draining / stopped, 500 engine failure. Sampling fields become `SamplingParams`, whose
construction is the one validation path (as for gRPC). Unknown fields are ignored (clients send
extras); fields whose meaning jaxserve cannot honour (echo, suffix, logit_bias, tools, best_of
!= n, a response_format other than text, a batch of several prompts) are refused with 400.
Extensions as in vLLM: top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens, and `return_token_ids: true` (each choice gets `token_ids`).

Each request is registered with `ServedEngine.start_request` so that drain waits for it (SIGTERM),
and a client that disconnects (streamed or not) has its request aborted: its KV blocks are free
within one engine step. Like server.py, this module never touches the Engine: only
EngineLoop.submit / abort.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxserve.engine.loop import Delta, Failure, Final, NotAccepting, QueueFull
from jaxserve.runtime.distributed import PeerLost
from jaxserve.sampling_params import SamplingParams
from jaxserve.serving.auth import Auth, Endpoint
from jaxserve.serving.frontend import (DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_WORKERS, NotServing,
                                       Phase, ServedEngine)

log = logging.getLogger("jaxserve.serving")

POLL_S = 0.05  # how often a waiting handler checks that its client is still there
# OpenAI / vLLM request field -> SamplingParams field, copied when present and not null
SAMPLING_FIELDS = {
    "n": "n", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos", "min_tokens": "min_tokens", "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param)


def _param_of(message: str, names: dict[str, str]) -> str | None:
    """The request field an error message from SamplingParams / validation is about."""
    first = message.split(" ", 1)[0].rstrip(":")
    return names.get(first, first if first in SAMPLING_FIELDS else None)


# ---- request parsing ----

def _check_unsupported(body: dict, chat: bool) -> None:
    if body.get("echo"):
        raise _bad("echo is not supported", "echo")
    if body.get("suffix") is not None:
        raise _bad("suffix is not supported", "suffix")
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported", "logit_bias")
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise _bad("best_of is not supported (leave it unset or equal to n)", "best_of")
    if chat:
        for field in ("tools", "functions"):
            if body.get(field):
                raise _bad(f"{field} is not supported", field)
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise _bad("response_format: only {\"type\": \"text\"} is supported",
                       "response_format")


def _sampling(body: dict, chat: bool) -> tuple[SamplingParams, dict[str, str]]:
    """SamplingParams from the body, and the map SamplingParams field -> request field."""
    fields, names = {}, {}
    for name, field in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            fields[field], names[field] = body[name], name
    if chat:
        for name in ("max_completion_tokens", "max_tokens"):
            if body.get(name) is not None:
                fields["max_tokens"], names["max_tokens"] = body[name], name
                break
        else:
            fields["max_tokens"] = None  # until EOS or the context is full
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _bad(f"logprobs must be a bool, got {logprobs!r}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        if logprobs:
            fields["logprobs"], names["logprobs"] = (0 if top is None else top), "top_logprobs"
    else:
        if body.get("max_tokens") is not None:
            fields["max_tokens"], names["max_tokens"] = body["max_tokens"], "max_tokens"
        if body.get("logprobs") is not None:
            fields["logprobs"], names["logprobs"] = body["logprobs"], "logprobs"
    try:
        params = SamplingParams.from_dict(fields)
    except (ValueError, TypeError) as e:
        raise _bad(_rename(str(e), names), _param_of(str(e), names)) from None
    return params, names


def _rename(message: str, names: dict[str, str]) -> str:
    """Say the request's field name where SamplingParams says its own."""
    first, _, rest = message.partition(" ")
    name = names.get(first)
    return f"{name} {rest}" if name and name != first else message


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be a bool, got {stream!r}", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad(f"stream_options must be an object, got {options!r}", "stream_options")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise _bad(f"stream_options.include_usage must be a bool, got {include_usage!r}",
                       "stream_options")
    return stream, include_usage


def _completion_prompt(body: dict, llm) -> tuple[list[int], str | None]:
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt is empty", "prompt")
        if llm.tokenizer is None:
            raise _bad("prompt: the model has no tokenizer; send token ids", "prompt")
        ids, text = llm.tokenizer.encode(prompt), prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in prompt):
        ids, text = prompt, None
    else:
        raise _bad("prompt must be a string, a list of token ids, or a list holding one of "
                   "those (one prompt per request)", "prompt")
    try:
        return llm.validate_token_ids(ids, "prompt"), text
    except (ValueError, TypeError) as e:
        raise _bad(str(e), "prompt") from None


def _message_text(content, i: int):
    """OpenAI content parts [{"type": "text", "text": ...}] -> one string."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise _bad(f"messages: message {i} content parts must be "
                           "{\"type\": \"text\", \"text\": str}", "messages")
            parts.append(part["text"])
        return "".join(parts)
    return content


def _chat_prompt(body: dict, llm) -> tuple[list[int], str]:
    from jaxserve.text.chat import validate_conversation

    messages = body.get("messages")
    if messages is None:
        raise _bad("messages is required", "messages")
    if isinstance(messages, list):
        messages = [dict(m, content=_message_text(m["content"], i))
                    if isinstance(m, dict) and "content" in m else m
                    for i, m in enumerate(messages)]
    try:
        messages = validate_conversation(messages, "messages")
        [text] = llm.render_chat(messages)
    except (ValueError, TypeError) as e:
        raise _bad(str(e), "messages") from None
    if llm.tokenizer is None:
        raise _bad("messages: the model has no tokenizer", "messages")
    ids = llm.tokenizer.encode(text, add_bos=False)  # the template writes BOS (as LLM.chat)
    try:
        return llm.validate_token_ids(ids, "messages (rendered prompt)"), text
    except (ValueError, TypeError) as e:
        raise _bad(str(e), "messages") from None


# ---- responses ----

def _token_text(llm, token: int) -> str:
    tok = llm.tokenizer
    if tok is None:
        return f"token_id:{token}"
    if getattr(tok, "backend", None) == "sentencepiece":
        # decode() of one piece drops its leading space; the piece itself keeps it
        piece = tok.id_to_piece(token)
        if not (piece.startswith("<0x") and piece.endswith(">")) and token not in tok.special_ids:
            return piece.replace("\u2581", " ")
    return tok.decode([token], skip_special_tokens=False)


class _Choice:
    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.final: Final | None = None


def _completion_logprobs(llm, tokens, logprobs, num: int, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, ranked in zip(tokens, logprobs):
        text = _token_text(llm, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(ranked[token])
        out["top_logprobs"].append({_token_text(llm, t): lp
                                    for t, lp in list(ranked.items())[:num]})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _chat_logprobs(llm, tokens, logprobs, num: int) -> dict:
    def entry(t, lp):
        text = _token_text(llm, t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(token, ranked[token]),
                             top_logprobs=[entry(t, lp) for t, lp in list(ranked.items())[:num]])
                        for token, ranked in zip(tokens, logprobs)]}


def _usage(finals: list[Final]) -> dict:
    prompt = finals[0].prompt_tokens if finals else 0
    cached = finals[0].cached_prompt_tokens if finals else 0
    completion = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Handler:
    """One request: parse, submit, relay."""

    def __init__(self, front: HTTPFrontEnd, request: Request, body: dict, chat: bool):
        self.front, self.engine, self.request, self.chat = front, front.engine, request, chat
        self.llm = self.engine.llm
        _check_unsupported(body, chat)
        self.stream, self.include_usage = _stream_options(body)
        self.params, self.names = _sampling(body, chat)
        self.return_token_ids = bool(body.get("return_token_ids"))
        if chat:
            self.prompt_ids, self.prompt_text = _chat_prompt(body, self.llm)
        else:
            self.prompt_ids, self.prompt_text = _completion_prompt(body, self.llm)
        try:
            self.params.validate_for_model(self.llm.config.vocab_size, self.llm.max_model_len)
        except ValueError as e:
            raise _bad(_rename(str(e), self.names), _param_of(str(e), self.names)) from None
        self.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = self.front.model_id()
        self.num_logprobs = self.params.logprobs

    async def submit(self):
        loop = self.front.serving_loop()
        self.engine.start_request(self.request_id)  # a fresh uuid: never already in flight
        try:
            # the engine thread accepts within one step; the server's text is the prompt text
            # only for completions (as gRPC), the rendered prompt for chat
            self.events = await self.front.in_thread(loop.submit, self.request_id,
                                                     self.prompt_ids, self.params,
                                                     self.prompt_text)
        except BaseException as e:
            self.engine.end_request(self.request_id)
            if isinstance(e, QueueFull):
                raise ApiError(429, f"queue full: {e}", "rate_limit_error",
                               code="queue_full") from None
            if isinstance(e, NotAccepting):
                self.engine.check_engine()
                raise ApiError(503, f"not accepting requests: {e}", "service_unavailable"
                               ) from None
            if isinstance(e, (ValueError, TypeError)):
                message = str(e)
                param = _param_of(message, self.names)
                if message.startswith("prompt"):  # the engine's length checks
                    param = self.names.get("max_tokens", "max_tokens") \
                        if "max_tokens" in message else ("messages" if self.chat else "prompt")
                raise _bad(_rename(message, self.names), param) from None
            raise

    async def relay(self):
        """Engine events until every sequence has its Final; aborts the request when the
        client goes away (or the consumer stops early)."""
        stream, finals, settled = self.events, [], False
        try:
            while len(finals) < stream.open_sequences:
                try:
                    event = stream.events.get_nowait()
                except queue.Empty:
                    if await self.request.is_disconnected():
                        return
                    try:
                        event = await self.front.in_thread(stream.get, POLL_S)
                    except queue.Empty:
                        continue
                if isinstance(event, Failure):
                    settled = True
                    if isinstance(event.error, NotAccepting):
                        raise ApiError(503, f"server stopped: {event.error}",
                                       "service_unavailable")
                    self.engine.mark_failed()
                    if isinstance(event.error, PeerLost):  # retry once the job is restarted
                        raise ApiError(503, f"engine failed: {event.error}",
                                       "service_unavailable")
                    raise ApiError(500, f"engine failed: {event.error!r}", "server_error")
                if isinstance(event, Final):
                    finals.append(event)
                yield event
            settled = True
        finally:
            if not settled:
                self.engine.abort_collecting(self.request_id, stream, finals)
            self.engine.end_request(self.request_id)
            self.engine.metrics.request_finished(finals)

    def _head(self) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind + (".chunk" if self.stream and self.chat
                                                         else ""),
                "created": self.created, "model": self.model}

    def _logprobs(self, tokens, logprobs, offset: int = 0):
        if self.num_logprobs is None or logprobs is None:
            return None
        if self.chat:
            return _chat_logprobs(self.llm, tokens, logprobs, self.num_logprobs)
        return _completion_logprobs(self.llm, tokens, logprobs, self.num_logprobs, offset)

    async def complete(self) -> Response:
        choices = [_Choice() for _ in range(self.params.n)]
        finals = []
        events = self.relay()
        try:
            async for event in events:
                self._collect(choices, finals, event)
        finally:  # runs the relay's abort at once if this task is cancelled
            await events.aclose()
        if len(finals) < len(choices):  # the client went away
            return Response(status_code=499)
        return self._response(choices, finals)

    @staticmethod
    def _collect(choices, finals, event) -> None:
        c = choices[event.index]
        if isinstance(event, Delta):
            c.text.append(event.text)
            c.token_ids += event.token_ids
            if event.logprobs is not None:
                c.logprobs += event.logprobs
        else:
            c.text.append(event.text)
            c.final = event
            finals.append(event)

    def _response(self, choices, finals) -> Response:
        out = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            logprobs = self._logprobs(c.token_ids, c.logprobs)
            choice = {"index": i, "finish_reason": c.final.finish_reason, "logprobs": logprobs}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if self.return_token_ids:
                choice["token_ids"] = c.token_ids
            out.append(choice)
        return JSONResponse({**self._head(), "choices": out, "usage": _usage(finals)})

    async def sse(self):
        finals, offsets, started = [], [0] * self.params.n, set()
        usage = {"usage": None} if self.include_usage else {}
        events = self.relay()
        try:
            async for event in events:
                choice: dict = {"index": event.index}
                if self.chat and event.index not in started:
                    started.add(event.index)
                    yield _sse({**self._head(), "choices": [{
                        "index": event.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}], **usage})
                if isinstance(event, Delta):
                    text, finish = event.text, None
                    logprobs = self._logprobs(event.token_ids, event.logprobs,
                                              offsets[event.index])
                    if self.return_token_ids:
                        choice["token_ids"] = event.token_ids
                else:
                    finals.append(event)
                    text, finish, logprobs = event.text, event.finish_reason, None
                offsets[event.index] += len(text)
                if self.chat:
                    choice["delta"] = {"content": text} if text or finish is None else {}
                else:
                    choice["text"] = text
                choice.update(logprobs=logprobs, finish_reason=finish)
                yield _sse({**self._head(), "choices": [choice], **usage})
            if self.include_usage:
                yield _sse({**self._head(), "choices": [], "usage": _usage(finals)})
        except ApiError as e:
            yield _sse(e.body())
        finally:  # a client gone mid-stream: abort now, not when the generator is collected
            await events.aclose()
        yield "data: [DONE]\n\n"


class HTTPFrontEnd:
    """The FastAPI app over a `ServedEngine`, served by uvicorn on a thread: start() / stop()."""

    def __init__(self, engine: ServedEngine, host: str = "127.0.0.1", port: int = 0, *,
                 auth: Auth = Auth(), max_workers: int = DEFAULT_MAX_WORKERS,
                 max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.engine, self.host, self.requested_port = engine, host, port
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.port: int | None = None
        self.app = self._build_app()
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        # blocking waits on the EngineLoop (submit, the next stream event) run here, one thread
        # per request at most: asyncio's default pool (cores + 4 threads) would queue streams
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="jaxserve-http")

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- helpers used by handlers ----
    def model_id(self) -> str:
        return self.engine.info.model if self.engine.info is not None else ""

    def serving_loop(self):
        try:
            return self.engine.serving_loop()
        except NotServing as e:
            raise ApiError(503, str(e), "service_unavailable") from None

    def _key_for(self, endpoint: Endpoint) -> list:
        """The route dependency that answers 401 unless the request carries the API key."""
        if not self.auth.protects(endpoint):
            return []

        async def check_key(request: Request) -> None:
            refusal = self.auth.refusal(endpoint, request.headers.get("authorization"))
            if refusal is not None:
                raise ApiError(401, refusal, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})

        return [Depends(check_key)]

    async def _body(self, request: Request) -> dict:
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        too_big = ApiError(413, f"request body is larger than {limit} bytes",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", None) from None
        if not isinstance(body, dict):
            raise _bad(f"the request body must be a JSON object, got {type(body).__name__}",
                       None)
        return body

    async def _generate(self, request: Request, chat: bool) -> Response:
        body = await self._body(request)
        self.serving_loop()  # 503 before any field is judged against a model not loaded
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise _bad(f"model must be a string, got {model!r}", "model")
            if model != self.model_id():
                raise ApiError(404, f"the model {model!r} does not exist (this server serves "
                               f"{self.model_id()!r})", "not_found_error", "model",
                               "model_not_found")
        handler = _Handler(self, request, body, chat)
        await handler.submit()
        if handler.stream:
            return StreamingResponse(handler.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await handler.complete()

    def _build_app(self) -> FastAPI:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        api = self._key_for(Endpoint.API)
        app = FastAPI(title="jaxserve", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(request, e: ApiError):
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, e: StarletteHTTPException):
            kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
            return JSONResponse(ApiError(e.status_code, str(e.detail), kind).body(),
                                status_code=e.status_code)

        @app.post("/v1/completions", dependencies=api)
        async def completions(request: Request):
            return await self._generate(request, chat=False)

        @app.post("/v1/chat/completions", dependencies=api)
        async def chat_completions(request: Request):
            return await self._generate(request, chat=True)

        @app.get("/v1/models", dependencies=api)
        async def models():
            if self.engine.info is None:
                raise ApiError(503, f"server is {self.engine.phase.value}",
                               "service_unavailable")
            info = self.engine.info
            return {"object": "list", "data": [{
                "id": info.model, "object": "model", "created": 0, "owned_by": "jaxserve",
                "max_model_len": info.max_model_len}]}

        @app.get("/health", dependencies=self._key_for(Endpoint.HEALTH))
        async def health():
            self.engine.check_engine()
            phase = self.engine.phase
            return JSONResponse({"status": phase.value},
                                status_code=200 if phase is Phase.SERVING else 503)

        @app.get("/metrics", dependencies=self._key_for(Endpoint.METRICS))
        async def metrics():
            return PlainTextResponse(generate_latest(self.engine.metrics.registry),
                                     media_type=CONTENT_TYPE_LATEST)

        return app

    # ---- life cycle ----
    def start(self) -> HTTPFrontEnd:
        """Bind (OSError if the port is taken) and serve on a uvicorn thread."""
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False,
                                log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        name="jaxserve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
