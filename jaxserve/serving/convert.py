"""Translation between jaxserve.v1 messages and the Python API: requests in, stream events out.

`parse_generate` is the server's one validation path for a GenerateRequest: it reuses
`SamplingParams` construction and `LLM.validate_token_ids`, and every error it raises is a
ValueError/TypeError whose message names the offending field (the server turns those into
INVALID_ARGUMENT); `parse_score` does the same for a ScoreRequest through `LLM.prepare_score`.
The functions here are pure: they never submit, abort or wait, never touch the Engine, and never
import grpc.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from jaxserve.sampling_params import SamplingParams
from jaxserve.serving import jaxserve_pb2 as pb

if TYPE_CHECKING:
    from jaxserve.engine.loop import Delta, Final
    from jaxserve.engine.scoring import ScoreJob
    from jaxserve.outputs import ScoreOutput
    from jaxserve.serving.frontend import ModelInfo

MAX_REQUEST_ID_CHARS = 256


class Malformed:
    """Stands in for a request whose bytes did not parse (see `lenient`)."""

    def __init__(self, message_type: str, error: Exception):
        self.message = f"the request is not a valid {message_type}: {error}"
        if "UTF-8" in str(error):
            self.message += " (string fields, e.g. sampling.stop and request_id, must be UTF-8)"


def lenient(message_class):
    """A request deserializer that returns `Malformed` instead of raising.

    grpc answers a deserializer exception with INTERNAL; a client sending bad bytes (e.g. a
    `string` field holding invalid UTF-8) deserves INVALID_ARGUMENT, which the handler gives.
    """
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError, in practice
            return Malformed(message_class.DESCRIPTOR.full_name, e)
    return parse


def request_id_of(request: pb.GenerateRequest | pb.ScoreRequest) -> str | None:
    """The client's request_id ("" = let the server choose); raises if unusable."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, got "
                         f"{len(request.request_id)}")
    return request.request_id or None


def sampling_params(message: pb.SamplingParams) -> SamplingParams:
    """proto SamplingParams -> SamplingParams; unset fields take the dataclass defaults."""
    fields = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            if len(value):
                fields[field.name] = list(value)
        elif message.HasField(field.name):
            fields[field.name] = value
    # SamplingParams reads top_k 0 / -1 as "off"; on the wire "off" is the unset field, so an
    # explicit value below 1 is a client mistake worth reporting.
    if "top_k" in fields and fields["top_k"] < 1:
        raise ValueError(f"top_k must be >= 1 (leave it unset for no top-k), got {fields['top_k']}")
    return SamplingParams.from_dict(fields)


def _text_or_ids(message, oneof: str, where: str = "") -> str | list[int]:
    """The text (decoded) or token ids a `oneof {bytes text; TokenIds token_ids}` holds.
    where: the message's path in the request ("" for the request itself, e.g. "candidates[2]")."""
    kind = message.WhichOneof(oneof)
    if kind is None:
        raise ValueError(f"{where or oneof}: set text or token_ids")
    if kind == "token_ids":
        return list(message.token_ids.ids)
    try:
        return message.text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where + '.' if where else ''}text is not valid UTF-8: {e}") from None


def parse_score(request: pb.ScoreRequest, llm) -> ScoreJob:
    """The request as a validated scoring job; errors name the field (`text`, `token_ids`,
    `candidates[i]`, `top_n`)."""
    prompt = _text_or_ids(request, "prompt")
    candidates = [_text_or_ids(c, "candidate", f"candidates[{j}]")
                  for j, c in enumerate(request.candidates)]
    return llm.prepare_score(prompt, candidates, request.top_n,
                             prompt_name=request.WhichOneof("prompt"),
                             candidate_name="candidates[{}]")


def score_response(request_id: str, out: ScoreOutput) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        request_id=request_id, prompt_token_ids=out.prompt_token_ids,
        candidates=[pb.CandidateScore(token_ids=c.token_ids, logprob=c.logprob,
                                      token_logprobs=c.token_logprobs) for c in out.candidates],
        top=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in out.top])


def parse_generate(request: pb.GenerateRequest, llm) -> tuple[list[int], str | None,
                                                             SamplingParams]:
    """(prompt token ids, prompt text or None, params), validated against the served model."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt: set text or token_ids")
    if kind == "text":
        text = _text_or_ids(request, "prompt")
        if not text:
            raise ValueError("text is empty")
        if llm.tokenizer is None:
            raise ValueError("text: the model has no tokenizer (tokenizer.json or "
                             "tokenizer.model); send token_ids")
        ids = llm.tokenizer.encode(text)
    else:
        ids, text = list(request.token_ids.ids), None
    ids = llm.validate_token_ids(ids, kind)
    params = sampling_params(request.sampling)
    params.validate_for_model(llm.config.vocab_size, llm.max_model_len)
    return ids, text, params


def delta_response(request_id: str, event: Delta, num_logprobs: int | None
                   ) -> pb.GenerateResponse:
    delta = pb.Delta(index=event.index, text=event.text, token_ids=event.token_ids)
    if event.logprobs is not None:
        for token, ranked in zip(event.token_ids, event.logprobs):
            # the engine's dict holds the top-N in rank order, then the chosen token if it was
            # not among them
            top = list(ranked.items())[:num_logprobs or 0]
            delta.logprobs.add(token_id=token, logprob=ranked[token],
                               top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top])
    return pb.GenerateResponse(request_id=request_id, delta=delta)


def final_responses(request_id: str, event: Final) -> list[pb.GenerateResponse]:
    """The held-back text (if any) as a last Delta, then the Final."""
    out = []
    if event.text:
        out.append(pb.GenerateResponse(request_id=request_id,
                                       delta=pb.Delta(index=event.index, text=event.text)))
    out.append(pb.GenerateResponse(request_id=request_id, final=pb.Final(
        index=event.index, finish_reason=event.finish_reason,
        usage=pb.Usage(prompt_tokens=event.prompt_tokens,
                       completion_tokens=event.completion_tokens,
                       cached_prompt_tokens=event.cached_prompt_tokens))))
    return out


def model_info(info: ModelInfo) -> pb.ModelInfo:
    """What GetModelInfo returns."""
    return pb.ModelInfo(**dataclasses.asdict(info))
