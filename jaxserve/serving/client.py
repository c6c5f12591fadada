"""A small Python client for `jaxserve serve` (also behind `jaxserve client`).

    with Client("127.0.0.1:50051") as c:
        for response in c.generate("def main():", max_tokens=32, temperature=0):
            if response.HasField("delta"):
                print(response.delta.text, end="", flush=True)
        c.generate_text("import os", max_tokens=8)        # -> str
        c.complete([1, 822, 1899], n=2, logprobs=3)        # -> [Completion, ...]
        c.score("The capital of France is", [" Paris", [3, 4]], top_n=5)  # -> ScoreResponse
        c.model_info(), c.health(), c.abort("some-request-id")

    Client("10.0.0.5:50051", api_key="KEY")  # every call carries `authorization: Bearer KEY`

Errors surface as grpc.RpcError (code() / details()). This module must never use the engine or
jax itself: it needs only grpc and the generated stubs (importing the `jaxserve` package still
imports jax, through jaxserve/__init__.py).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.serving import jaxserve_pb2 as pb
from jaxserve.serving import jaxserve_pb2_grpc as pb_grpc


@dataclasses.dataclass
class Completion:
    """One sequence of a finished request, assembled from its stream."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


def _set_text_or_ids(message, value: str | bytes | Sequence[int]):
    """Fill a message's `oneof {bytes text; TokenIds token_ids}`: str is sent as UTF-8, bytes as
    they are, anything else as token ids."""
    if isinstance(value, str):
        message.text = value.encode("utf-8")
    elif isinstance(value, bytes):
        message.text = value
    else:
        message.token_ids.SetInParent()
        message.token_ids.ids.extend(value)
    return message


def make_request(prompt: str | bytes | Sequence[int], request_id: str | None = None,
                 **sampling) -> pb.GenerateRequest:
    """prompt: text (str, or bytes sent as is) or token ids; sampling: SamplingParams fields
    (None = unset = the server's default)."""
    fields = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    request = pb.GenerateRequest(sampling=pb.SamplingParams(**fields),
                                 request_id=request_id or "")
    return _set_text_or_ids(request, prompt)


def make_score_request(prompt: str | bytes | Sequence[int],
                       candidates: Sequence[str | bytes | Sequence[int]] = (), top_n: int = 0,
                       request_id: str | None = None) -> pb.ScoreRequest:
    """prompt and each candidate: text or token ids, as in `make_request`."""
    request = pb.ScoreRequest(top_n=top_n, request_id=request_id or "")
    for candidate in candidates:
        _set_text_or_ids(request.candidates.add(), candidate)
    return _set_text_or_ids(request, prompt)


class _CallDetails(collections.namedtuple("_CallDetails", ["method", "timeout", "metadata",
                                                           "credentials", "wait_for_ready",
                                                           "compression"]),
                   grpc.ClientCallDetails):
    pass


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to the metadata of every call."""

    def __init__(self, api_key: str):
        self.header = ("authorization", f"Bearer {api_key}")

    def _with_key(self, details):
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self.header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_key(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


class Client:
    def __init__(self, target: str, options: Sequence[tuple[str, object]] = (),
                 api_key: str | None = None):
        self.channel = grpc.insecure_channel(target, options=list(options))
        if api_key is not None:
            self.channel = grpc.intercept_channel(self.channel, _BearerKey(api_key))
        self.stub = pb_grpc.JaxServeStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt, *, request_id: str | None = None, timeout: float | None = None,
                 **sampling) -> Iterator[pb.GenerateResponse]:
        """The response stream; the returned call also has cancel() and code()."""
        return self.stub.Generate(make_request(prompt, request_id, **sampling), timeout=timeout)

    def complete(self, prompt, **kwargs) -> list[Completion]:
        """Run a request to the end; one Completion per sequence, by index."""
        out: dict[int, Completion] = {}
        for response in self.generate(prompt, **kwargs):
            if response.HasField("delta"):
                d = response.delta
                c = out.setdefault(d.index, Completion(d.index))
                c.text += d.text
                c.token_ids += d.token_ids
                c.logprobs += d.logprobs
            else:
                f = response.final
                c = out.setdefault(f.index, Completion(f.index))
                c.finish_reason = f.finish_reason
                c.prompt_tokens = f.usage.prompt_tokens
                c.completion_tokens = f.usage.completion_tokens
                c.cached_prompt_tokens = f.usage.cached_prompt_tokens
        return [out[i] for i in sorted(out)]

    def generate_text(self, prompt, **kwargs) -> str:
        """The text of the first sequence."""
        return self.complete(prompt, **kwargs)[0].text

    def score(self, prompt, candidates=(), top_n: int = 0, *, request_id: str | None = None,
              timeout: float | None = None) -> pb.ScoreResponse:
        """Log-probs of each candidate continuation of `prompt` and the top_n next tokens
        (`LLM.score` for one prompt)."""
        return self.stub.Score(make_score_request(prompt, candidates, top_n, request_id),
                               timeout=timeout)

    def abort(self, request_id: str, timeout: float | None = 10.0) -> None:
        self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout)

    def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)

    def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        """"SERVING", "NOT_SERVING", ... (grpc.health.v1)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
