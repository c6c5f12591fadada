"""The gRPC server against real clients on 127.0.0.1: parity with offline generate, status codes,
cancellation freeing KV, metrics, health, reflection, queue limits and SIGTERM drain.

Most tests share one in-process `Server` (port 0) over a small random Llama with a trained
tokenizer; the offline reference outputs are computed on the same LLM before the server takes
its engine. The process tests run `python -m jaxserve.cli serve` as a subprocess.
"""

import dataclasses
import math
import re
import threading
import time
import types

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jaxserve import LLM, SamplingParams
from jaxserve.serving import gen_stubs
from jaxserve.serving import jaxserve_pb2 as pb
from jaxserve.serving.client import Client, make_request
from jaxserve.serving.server import SERVICE, Server
from tests.serving_helpers import ServerProcess, make_model_dir, scrape, wait_until

ENGINE = dict(max_model_len=128, block_size=8, max_num_seqs=8, max_num_batched_tokens=64,
              max_prefill_chunk=32)
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)
# 32 prompts: text (tokenized by the server) and token ids
# (at most 16 tokens, so that prompt + output fits 4 KV blocks: few step shapes to compile)
PROMPTS = [f"def f{i}(x):" + " y" * (i % 3) if i % 2 == 0 else
           [1, 5 + i, 9, 40 + 3 * i, 7] * (1 + i % 3) for i in range(32)]
LOGPROBS = dict(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
LONG = dict(temperature=0, max_tokens=100, ignore_eos=True)  # with a step delay: seconds


@pytest.fixture(scope="module")
def model_dir(hf_model_dir, tmp_path_factory):
    return make_model_dir(hf_model_dir("llama")[1], tmp_path_factory.mktemp("serving") / "model")


@pytest.fixture(scope="module")
def served(model_dir):
    llm = LLM(model_dir, **ENGINE)
    offline = llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    with_logprobs = llm.generate([PROMPTS[1]], SamplingParams(**LOGPROBS), use_tqdm=False)[0]
    server = Server("127.0.0.1", 0, metrics_port=0, max_queue=64, max_workers=96).start()
    server.attach(llm)
    client = Client(f"127.0.0.1:{server.port}")
    yield types.SimpleNamespace(server=server, llm=llm, client=client, offline=offline,
                                with_logprobs=with_logprobs.outputs[0])
    client.close()
    server.drain(0)
    server.stop()


class slow_steps:
    """Make every engine step of the in-process server take at least `delay` seconds."""

    def __init__(self, server, delay=0.02):
        self.server, self.delay = server, delay

    def __enter__(self):
        self.server.step_delay = self.delay

    def __exit__(self, *exc):
        self.server.step_delay = 0.0


def kv_blocks_used(server) -> float:
    return scrape(server.metrics_port)["jaxserve_kv_blocks_used"]


def assert_kv_freed(s):
    wait_until(lambda: kv_blocks_used(s.server) == 0 and s.llm.engine.kv_blocks_used == 0, 10,
               "every KV block to be free")
    assert scrape(s.server.metrics_port)["jaxserve_kv_cache_usage_ratio"] == 0


# ---- stubs and API surface ----

def test_checked_in_stubs_are_what_gen_stubs_writes(tmp_path):
    for path in gen_stubs.generate(tmp_path):
        checked_in = gen_stubs.HERE / path.name
        assert path.read_text() == checked_in.read_text(), \
            f"{checked_in.name} is stale: run python -m jaxserve.serving.gen_stubs"


def test_proto_sampling_params_has_every_field():
    proto = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert proto == {f.name for f in dataclasses.fields(SamplingParams)}


def test_model_info_health_and_reflection(served):
    info = served.client.model_info()
    llm = served.llm
    assert (info.family, info.vocab_size, info.max_model_len) == ("llama", 512, 128)
    assert dict(info.mesh) == dict(llm.layout.mesh.shape) and info.rules == "tp"
    assert info.dtype == "float32" and info.num_params == llm.config.num_params()
    assert (info.max_num_seqs, info.block_size) == (8, 8)
    assert info.kv_blocks == llm.engine.kv_blocks_total
    assert served.client.health() == "SERVING" and served.client.health(SERVICE) == "SERVING"

    stub = reflection_pb2_grpc.ServerReflectionStub(served.client.channel)
    [listed] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    [found] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=SERVICE)]), timeout=10)
    assert found.file_descriptor_response.file_descriptor_proto


# ---- generation ----

def test_32_concurrent_greedy_streams_give_offline_tokens(served):
    results, errors = [None] * len(PROMPTS), []

    def run(i):
        try:
            results[i] = served.client.complete(PROMPTS[i], timeout=120, **GREEDY)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for i, [got] in enumerate(results):
        want = served.offline[i]
        assert got.token_ids == want.outputs[0].token_ids, f"prompt {i}"
        assert got.text == want.outputs[0].text
        assert (got.finish_reason, got.completion_tokens) == ("length", 12)
        assert got.prompt_tokens == len(want.prompt_token_ids)


def test_logprobs_match_offline(served):
    [got] = served.client.complete(PROMPTS[1], **LOGPROBS)
    want = served.with_logprobs
    assert got.token_ids == want.token_ids and len(got.logprobs) == len(want.token_ids)
    for token, lp, ranked in zip(want.token_ids, got.logprobs, want.logprobs):
        assert lp.token_id == token and math.isclose(lp.logprob, ranked[token], rel_tol=1e-5)
        assert [t.token_id for t in lp.top] == list(ranked)[:3]
        assert [t.logprob for t in lp.top] == pytest.approx(list(ranked.values())[:3], rel=1e-5)


def test_n_sequences_each_get_a_final(served):
    completions = served.client.complete("def main():", n=3, seed=7, temperature=1.0,
                                         max_tokens=6, ignore_eos=True)
    assert [c.index for c in completions] == [0, 1, 2]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in completions)


def test_cli_client_streams_prompt_and_completion(served, capsys):
    from jaxserve.cli import main

    rc = main(["client", "--target", f"127.0.0.1:{served.server.port}", "--prompt", PROMPTS[0],
               "--max-tokens", "12", "--temperature", "0", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == PROMPTS[0] + served.offline[0].outputs[0].text + "\n"
    assert "[length: " in err


# ---- invalid requests ----

def raw_generate(channel, data: bytes):
    call = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=bytes,
                                response_deserializer=pb.GenerateResponse.FromString)
    return list(call(data, timeout=10))


class Raw(bytes):
    """Message bytes sent as they are (not a prompt)."""


def invalid_utf8_stop() -> Raw:
    ok = make_request("def f(x):", stop=["QQQQ"]).SerializeToString()
    return Raw(ok.replace(b"QQQQ", b"\xff\xfe\xff\xfe"))


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = [  # id, prompt or raw bytes, sampling fields, code, pattern the message must match
    ("empty text", "", {}, INVALID, r"^text is empty"),
    ("no prompt", Raw(pb.GenerateRequest().SerializeToString()), {}, INVALID, r"^prompt"),
    ("empty token list", [], {}, INVALID, r"^token_ids is empty"),
    ("token id = vocab", [1, 512], {}, INVALID, r"^token_ids: token id 512"),
    ("negative token id", [1, -1], {}, INVALID, r"^token_ids: token id -1"),
    ("token ids longer than the context", [5] * 129, {}, INVALID, r"^token_ids has 129 tokens"),
    ("text longer than the context", "x = y + z\n" * 100, {}, INVALID, r"^text has \d+ tokens"),
    ("text not UTF-8", b"def \xff\xfe(x)", {}, INVALID, r"^text is not valid UTF-8"),
    ("stop not UTF-8", invalid_utf8_stop(), {}, INVALID, r"UTF-8.*sampling\.stop"),
    ("garbage bytes", Raw(b"\x0a\xff\xff\xff"), {}, INVALID, r"not a valid jaxserve\.v1\.Generate"),
    ("max_tokens 0", "x", {"max_tokens": 0}, INVALID, r"^max_tokens must be"),
    ("max_tokens negative", "x", {"max_tokens": -3}, INVALID, r"^max_tokens must be"),
    ("max_tokens beyond the context", "x", {"max_tokens": 129}, INVALID,
     r"^max_tokens must be <= max_model_len"),
    ("prompt + max_tokens beyond the context", [5] * 100, {"max_tokens": 50}, INVALID,
     r"max_tokens \(50\) is more than max_model_len"),
    ("temperature NaN", "x", {"temperature": math.nan}, INVALID, r"^temperature must be"),
    ("temperature inf", "x", {"temperature": math.inf}, INVALID, r"^temperature must be"),
    ("temperature negative", "x", {"temperature": -0.5}, INVALID, r"^temperature must be"),
    ("top_p 0", "x", {"top_p": 0.0}, INVALID, r"^top_p must be"),
    ("top_p above 1", "x", {"top_p": 1.5}, INVALID, r"^top_p must be"),
    ("top_k 0", "x", {"top_k": 0}, INVALID, r"^top_k must be >= 1"),
    ("top_k negative", "x", {"top_k": -5}, INVALID, r"^top_k must be >= 1"),
    ("min_p above 1", "x", {"min_p": 1.5}, INVALID, r"^min_p must be"),
    ("repetition_penalty 0", "x", {"repetition_penalty": 0.0}, INVALID,
     r"^repetition_penalty must be"),
    ("presence_penalty 3", "x", {"presence_penalty": 3.0}, INVALID, r"^presence_penalty must"),
    ("frequency_penalty NaN", "x", {"frequency_penalty": math.nan}, INVALID,
     r"^frequency_penalty must"),
    ("n 0", "x", {"n": 0}, INVALID, r"^n must be"),
    ("n too large", "x", {"n": 17}, INVALID, r"^n must be"),
    ("logprobs too large", "x", {"logprobs": 21}, INVALID, r"^logprobs must be"),
    ("logprobs negative", "x", {"logprobs": -1}, INVALID, r"^logprobs must be"),
    ("empty stop string", "x", {"stop": [""]}, INVALID, r"^stop must be"),
    ("too many stop strings", "x", {"stop": [f"s{i}" for i in range(17)]}, INVALID,
     r"^stop must be"),
    ("negative stop token id", "x", {"stop_token_ids": [-1]}, INVALID, r"^stop_token_ids must"),
    ("stop token id = vocab", "x", {"stop_token_ids": [512]}, INVALID,
     r"^stop_token_ids must be < vocab_size"),
    ("min_tokens > max_tokens", "x", {"min_tokens": 10, "max_tokens": 5}, INVALID,
     r"^min_tokens must be <= max_tokens"),
    ("negative seed", "x", {"seed": -1}, INVALID, r"^seed must be"),
    ("request_id too long", "x", {"request_id": "r" * 257}, INVALID, r"^request_id must be"),
    ("over the message size limit", "x" * (5 * 2**20), {}, grpc.StatusCode.RESOURCE_EXHAUSTED,
     r"larger than max"),
]


@pytest.mark.parametrize("prompt, fields, code, pattern", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_names_the_field(served, prompt, fields, code, pattern):
    with pytest.raises(grpc.RpcError) as info:
        if isinstance(prompt, Raw):
            raw_generate(served.client.channel, prompt)
        else:
            list(served.client.generate(prompt, timeout=10, **fields))
    assert info.value.code() == code, info.value.details()
    assert re.search(pattern, info.value.details()), info.value.details()


def test_abort_of_unknown_or_empty_request_id(served):
    with pytest.raises(grpc.RpcError) as info:
        served.client.abort("no-such-request")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "request_id 'no-such-request'" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        served.client.abort("")
    assert info.value.code() == INVALID and "request_id" in info.value.details()


def test_server_still_serves_correctly_after_bad_requests(served):
    assert served.client.health() == "SERVING"
    [got] = served.client.complete(PROMPTS[2], **GREEDY)
    assert got.token_ids == served.offline[2].outputs[0].token_ids


# ---- abort, cancellation, deadlines ----

def test_duplicate_request_id_and_abort_rpc(served):
    with slow_steps(served.server):
        stream = served.client.generate([1, 2, 3], request_id="dup", **LONG)
        first = next(stream)
        assert first.request_id == "dup" and first.HasField("delta")
        with pytest.raises(grpc.RpcError) as info:
            list(served.client.generate("x", request_id="dup"))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "request_id 'dup'" in info.value.details()
        served.client.abort("dup")
        rest = list(stream)
    assert stream.code() == grpc.StatusCode.OK
    assert rest[-1].final.finish_reason == "abort"
    assert rest[-1].final.usage.completion_tokens < 100
    assert_kv_freed(served)


def test_server_chooses_a_request_id(served):
    responses = list(served.client.generate("x", max_tokens=2, temperature=0))
    ids = {r.request_id for r in responses}
    assert len(ids) == 1 and ids.pop().startswith("req-")


def test_cancel_mid_stream_frees_every_kv_block(served):
    before = scrape(served.server.metrics_port).get(
        'jaxserve_requests_finished_total{finish_reason="abort"}', 0)
    with slow_steps(served.server):
        stream = served.client.generate([1, 2, 3, 4], **LONG)
        for _ in range(3):
            assert next(stream).HasField("delta")
        assert kv_blocks_used(served.server) > 0
        stream.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        assert_kv_freed(served)
    wait_until(lambda: scrape(served.server.metrics_port).get(
        'jaxserve_requests_finished_total{finish_reason="abort"}', 0) == before + 1, 5,
        "the abort to be counted")


def test_deadline_frees_every_kv_block(served):
    with slow_steps(served.server):
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(served.client.generate("def g():", timeout=0.5, **LONG))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2
        assert_kv_freed(served)
    assert not served.llm.engine.requests


def test_metrics_count_tokens_and_latencies(served):
    before = scrape(served.server.metrics_port)
    for i in range(3):
        served.client.complete(PROMPTS[i], **GREEDY)
    m = scrape(served.server.metrics_port)
    grew = lambda name: m.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert grew('jaxserve_requests_finished_total{finish_reason="length"}') == 3
    assert grew("jaxserve_generation_tokens_total") == 3 * 12
    assert grew("jaxserve_prompt_tokens_total") == sum(len(o.prompt_token_ids)
                                                        for o in served.offline[:3])
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert grew(f"jaxserve_{name}_count") == 3, name
        assert grew(f"jaxserve_{name}_sum") > 0, name
    assert m["jaxserve_kv_blocks_total"] == served.llm.engine.kv_blocks_total
    assert m["jaxserve_num_requests_running"] == 0 and m["jaxserve_num_requests_waiting"] == 0
    assert m["jaxserve_kv_blocks_used"] == 0 and m["jaxserve_preemptions_total"] == 0


def test_usage_and_metrics_report_prefix_cache_hits(served):
    before = scrape(served.server.metrics_port)
    prompt = list(range(3, 3 + 4 * ENGINE["block_size"])) + [77]
    first, second = [served.client.complete(prompt + [i], **GREEDY)[0] for i in (1, 2)]
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == 4 * ENGINE["block_size"]
    assert second.token_ids[:1] and second.prompt_tokens == len(prompt) + 1
    m = scrape(served.server.metrics_port)
    grew = lambda name: m.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert grew("jaxserve_prefix_cache_hits_total") == 4 * ENGINE["block_size"]
    assert grew("jaxserve_prefix_cache_queries_total") == 2 * (len(prompt) + 1)
    assert m['jaxserve_replica_load_flops{replica="0"}'] == 0  # idle again
    assert m["jaxserve_kv_blocks_cached"] > 0


def test_engine_failure_gives_internal_then_not_serving(model_dir, monkeypatch):
    llm = LLM(model_dir, **ENGINE)  # its own engine; never compiles: the first step fails

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine, "step", broken_step)
    server = Server("127.0.0.1", 0).start()
    try:
        server.attach(llm)
        with Client(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(grpc.RpcError) as info:
                list(client.generate("def f():", timeout=30))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "device lost" in info.value.details()
            assert client.health() == "NOT_SERVING" and client.health(SERVICE) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                list(client.generate("def f():", timeout=30))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


# ---- the `jaxserve serve` process ----

SERVE_FLAGS = ("--port", "0", "--metrics-port", "0", "--max-model-len", "128",
               "--max-num-seqs", "2", "--max-queue", "2", "--shutdown-timeout", "2.5",
               "--load-delay", "2", "--step-delay", "0.04")


class LazyProcess:
    """One `jaxserve serve` subprocess, started on first use (again if a test stopped it)."""

    def __init__(self, model_dir):
        self.model_dir, self.proc = model_dir, None

    def get(self):
        if self.proc is None or self.proc.proc.poll() is not None:
            self._start()
        return self

    def _start(self):
        self.proc = ServerProcess("--model", str(self.model_dir), *SERVE_FLAGS)
        m = self.proc.wait_for("stderr", r"listening on 127\.0\.0\.1:(\d+) \(metrics on :(\d+)",
                               120)
        self.port, self.metrics_port = int(m[1]), int(m[2])
        self.client = Client(f"127.0.0.1:{self.port}")
        # observed while the model loads (--load-delay keeps that phase open)
        self.loading = {"health": self.client.health(), "service": self.client.health(SERVICE)}
        for name, call in (("generate", lambda: list(self.client.generate("x", timeout=10))),
                           ("model_info", self.client.model_info)):
            try:
                call()
                self.loading[name] = "OK"
            except grpc.RpcError as e:
                self.loading[name] = e.code()
        ready = self.proc.wait_for("stdout", r"^jaxserve serving on 127\.0\.0\.1:(\d+) "
                                             r"\(metrics on :(\d+)\)$", 180)
        assert (int(ready[1]), int(ready[2])) == (self.port, self.metrics_port)

    def close(self):
        if self.proc is not None:
            self.client.close()
            self.proc.kill()


@pytest.fixture(scope="module")
def process(model_dir):
    lazy = LazyProcess(model_dir)
    yield lazy
    lazy.close()


def test_process_health_is_not_serving_while_loading_then_serving(process):
    p = process.get()
    assert p.loading == {"health": "NOT_SERVING", "service": "NOT_SERVING",
                         "generate": grpc.StatusCode.UNAVAILABLE,
                         "model_info": grpc.StatusCode.UNAVAILABLE}
    assert p.client.health() == "SERVING" and p.client.health(SERVICE) == "SERVING"
    assert p.client.model_info().max_num_seqs == 2


def test_process_queue_full_is_refused_at_once_and_queued_requests_finish(process):
    p = process.get()
    running = [p.client.generate([1, 2, 3 + i], request_id=f"long{i}", **LONG) for i in range(2)]
    for stream in running:
        assert next(stream).HasField("delta")
    queued = [p.client.generate([1, 7, 7 + i], temperature=0, max_tokens=5, ignore_eos=True,
                                timeout=60) for i in range(2)]
    wait_until(lambda: scrape(p.metrics_port)["jaxserve_num_requests_waiting"] == 2, 30,
               "two waiting requests")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(p.client.generate([1, 2], max_tokens=5, timeout=30))
    assert time.monotonic() - t0 < 1.0
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in info.value.details()
    for i, stream in enumerate(running):
        p.client.abort(f"long{i}")
        assert list(stream)[-1].final.finish_reason == "abort"
    for stream in queued:
        final = list(stream)[-1].final
        assert (final.finish_reason, final.usage.completion_tokens) == ("length", 5)


def test_process_sigterm_drains_then_exits_0(process):
    p = process.get()
    long_stream = p.client.generate([1, 2, 3], **dict(LONG, max_tokens=124))
    long_first = next(long_stream)
    short_stream = p.client.generate([1, 4, 5], temperature=0, max_tokens=8, ignore_eos=True)
    short_first = [next(short_stream), next(short_stream)]  # both decode together: compiled
    p.proc.terminate()
    wait_until(lambda: p.client.health() == "NOT_SERVING", 5, "health NOT_SERVING")
    assert p.client.health(SERVICE) == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as info:
        list(p.client.generate("x", timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    short = [*short_first, *short_stream]  # finishes within the shutdown timeout
    assert short[-1].final.finish_reason == "length"
    assert sum(len(r.delta.token_ids) for r in short) == 8
    long = [long_first, *long_stream]  # aborted at the shutdown timeout (2.5 s < 120 x 0.04 s)
    assert long_stream.code() == grpc.StatusCode.OK
    assert long[-1].final.finish_reason == "abort" and long[-1].final.usage.completion_tokens < 124
    assert p.proc.proc.wait(30) == 0
    assert "1 request(s) aborted at the shutdown timeout" in p.proc.stderr_text()
