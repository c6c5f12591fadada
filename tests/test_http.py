"""The OpenAI-compatible HTTP front end against the official `openai` client (and raw httpx) on
127.0.0.1: parity with offline generate / chat, streaming, n, logprobs, stop, OpenAI-shaped
errors with their status, disconnect freeing KV, one engine behind gRPC and HTTP, SIGTERM drain.

One in-process `Server` (gRPC port 0) with an `HTTPFrontEnd` on its engine, over a small random
Llama with a trained tokenizer and the embedded model's chat template; offline references are
computed on the same LLM before the server takes its engine.
"""

import json
import re
import shutil
import threading
import types

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxserve import LLM, SamplingParams
from jaxserve.package_data import embedded_model
from jaxserve.serving.client import Client
from jaxserve.serving.frontend import ServedEngine
from jaxserve.serving.http import HTTPFrontEnd
from jaxserve.serving.server import Server
from tests.serving_helpers import ServerProcess, make_model_dir, wait_until

ENGINE = dict(max_model_len=128, block_size=8, max_num_seqs=8, max_num_batched_tokens=64,
              max_prefill_chunk=32)
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["def f0(x):", [1, 5, 9, 40, 7]]
CHAT = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "import os"}]
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def model_dir(hf_model_dir, tmp_path_factory):
    d = make_model_dir(hf_model_dir("llama")[1], tmp_path_factory.mktemp("http") / "model")
    shutil.copy(embedded_model() / "chat_template.jinja", d)
    return d


@pytest.fixture(scope="module")
def served(model_dir):
    llm = LLM(model_dir, **ENGINE)
    greedy = SamplingParams(**GREEDY)
    offline = [o.outputs[0] for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    chat = llm.chat(CHAT, greedy, use_tqdm=False)[0].outputs[0]
    logprobs = llm.generate([PROMPTS[1]], SamplingParams(**GREEDY, logprobs=3),
                            use_tqdm=False)[0].outputs[0]
    server = Server("127.0.0.1", 0, max_queue=64, max_workers=32).start()
    http = HTTPFrontEnd(server.engine, "127.0.0.1", 0, max_workers=32,
                        max_body_bytes=MAX_BODY).start()
    server.attach(llm)
    base = f"http://127.0.0.1:{http.port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    yield types.SimpleNamespace(server=server, http=http, llm=llm, client=client, base=base,
                                offline=offline, chat=chat, logprobs=logprobs,
                                model=model_dir.name)
    client.close()
    server.drain(0)
    http.stop()
    server.stop()


def ids_body(**extra):
    return dict(extra_body={"ignore_eos": True, "return_token_ids": True, **extra})


# ---- generation ----

@pytest.mark.parametrize("i", [0, 1])
def test_completion_greedy_equals_offline(served, i):
    r = served.client.completions.create(model=served.model, prompt=PROMPTS[i], temperature=0,
                                         max_tokens=12, **ids_body())
    want = served.offline[i]
    [choice] = r.choices
    assert choice.text == want.text and choice.token_ids == want.token_ids
    assert choice.finish_reason == "length" and r.object == "text_completion"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(served):
    prompt = list(range(3, 3 + 40))
    cached = [served.client.completions.create(
        model=served.model, prompt=prompt + [i], temperature=0, max_tokens=2,
        **ids_body()).usage.prompt_tokens_details.cached_tokens for i in (1, 2)]
    block_size = served.llm.runner.block_size
    assert cached == [0, 40 // block_size * block_size]


def test_completion_stream_equals_offline_with_usage(served):
    chunks = list(served.client.completions.create(
        model=served.model, prompt=PROMPTS[0], temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **ids_body()))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == served.offline[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_greedy_equals_offline_chat(served):
    r = served.client.chat.completions.create(model=served.model, messages=CHAT, temperature=0,
                                              max_completion_tokens=12, **ids_body())
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == served.chat.text
    assert choice.token_ids == served.chat.token_ids and r.object == "chat.completion"
    rendered = served.llm.render_chat(CHAT)[0]
    assert r.usage.prompt_tokens == len(served.llm.tokenizer.encode(rendered, add_bos=False))


def test_chat_stream_equals_offline_chat(served):
    chunks = list(served.client.chat.completions.create(
        model=served.model, messages=CHAT, temperature=0, max_tokens=12, stream=True,
        **ids_body()))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == served.chat.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_chat_stream_n_2_each_choice_starts_and_finishes(served):
    chunks = list(served.client.chat.completions.create(
        model=served.model, messages=CHAT, n=2, seed=1, max_tokens=5, stream=True,
        extra_body={"ignore_eos": True}))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert all(c.finish_reason is None for c in mine[:-1])


def test_n_2_with_seed(served):
    r = served.client.completions.create(model=served.model, prompt="def g():", n=2, seed=3,
                                         temperature=1.0, max_tokens=6, **ids_body())
    assert [c.index for c in r.choices] == [0, 1]
    assert all(len(c.token_ids) == 6 for c in r.choices)
    assert r.usage.completion_tokens == 12
    again = served.client.completions.create(model=served.model, prompt="def g():", n=2, seed=3,
                                             temperature=1.0, max_tokens=6, **ids_body())
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_completion_logprobs_match_offline(served):
    r = served.client.completions.create(model=served.model, prompt=PROMPTS[1], temperature=0,
                                         max_tokens=12, logprobs=3, **ids_body())
    lp = r.choices[0].logprobs
    want = served.logprobs
    assert len(lp.tokens) == 12 and all(len(top) <= 3 for top in lp.top_logprobs)
    for got, token, ranked in zip(lp.token_logprobs, want.token_ids, want.logprobs):
        assert got == pytest.approx(ranked[token], abs=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text


def test_chat_logprobs(served):
    r = served.client.chat.completions.create(model=served.model, messages=CHAT, temperature=0,
                                              max_tokens=4, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 for c in content)


def test_stop_string_ends_the_text(served):
    full = served.offline[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = served.client.completions.create(model=served.model, prompt=PROMPTS[0], temperature=0,
                                         max_tokens=12, stop=[stop], **ids_body())
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_models_health_metrics_and_grpc_share_one_engine(served):
    assert [m.id for m in served.client.models.list().data] == [served.model]
    assert httpx.get(f"{served.base}/health").status_code == 200
    def finished():
        text = httpx.get(f"{served.base}/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "jaxserve_requests_finished_total"
                   and s.labels == {"finish_reason": "length"})

    before = finished()
    served.client.completions.create(model=served.model, prompt="x", max_tokens=2, n=2,
                                     extra_body={"ignore_eos": True})
    assert finished() == before + 2  # HTTP requests count in the shared registry
    with Client(f"127.0.0.1:{served.server.port}") as grpc_client:
        [c] = grpc_client.complete(PROMPTS[0], timeout=60, **GREEDY)
    assert c.token_ids == served.offline[0].token_ids


def test_concurrent_streams_give_offline_text(served):
    results, errors = {}, []

    def run(i):
        try:
            chunks = served.client.completions.create(
                model=served.model, prompt=PROMPTS[i % 2], temperature=0, max_tokens=12,
                stream=True, **ids_body())
            results[i] = "".join(c.choices[0].text for c in chunks if c.choices)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[i] for i in range(12)] == [served.offline[i % 2].text for i in range(12)]


# ---- errors ----

@pytest.mark.parametrize("path,body,param,pattern", [
    ("completions", {"max_tokens": 4}, "prompt", "prompt is required"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ("completions", {"prompt": [1, 99999]}, "prompt", "not in"),
    ("completions", {"prompt": "a", "temperature": "hot"}, "temperature", "temperature"),
    ("completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens", "max_tokens"),
    ("completions", {"prompt": "a", "top_p": 2}, "top_p", r"\(0, 1\]"),
    ("completions", {"prompt": "a", "n": 0}, "n", "n must be"),
    ("completions", {"prompt": "a", "max_tokens": 100000}, "max_tokens", "max_model_len"),
    ("completions", {"prompt": "a", "logprobs": 50}, "logprobs", "logprobs"),
    ("completions", {"prompt": "a", "stop": 3}, "stop", "stop"),
    ("completions", {"prompt": "a", "stream": "yes"}, "stream", "stream"),
    ("completions", {"prompt": [1] * 100, "max_tokens": 100}, "max_tokens", "max_model_len"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x " * 200}]}, "messages",
     "tokens"),
    ("chat/completions", {}, "messages", "messages is required"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages", "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages", "content"),
    ("chat/completions", {"messages": "hi"}, "messages", "list"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 0},
     "max_completion_tokens", "max_completion_tokens must be"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 30},
     "top_logprobs", "top_logprobs must be"),
])
def test_bad_field_is_400_naming_it(served, path, body, param, pattern):
    r = httpx.post(f"{served.base}/v1/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert re.search(pattern, error["message"]), error


def test_unknown_model_is_404_for_the_openai_client(served):
    with pytest.raises(openai.NotFoundError) as info:
        served.client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        served.client.chat.completions.create(model=served.model, messages=[
            {"role": "wizard", "content": "x"}])
    assert info.value.body["param"] == "messages"


def test_invalid_json_oversized_body_and_unknown_route(served):
    r = httpx.post(f"{served.base}/v1/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{served.base}/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(f"{served.base}/v1/completions",
                   json={"prompt": "x" * (MAX_BODY + 10), "max_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(f"{served.base}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_full_is_429(served):
    loop = served.server.engine.loop
    saved, loop.max_queue = loop.max_queue, 0
    try:
        with pytest.raises(openai.RateLimitError) as info:
            served.client.completions.create(model=served.model, prompt="x", max_tokens=2)
        assert "queue full" in info.value.body["message"]
    finally:
        loop.max_queue = saved


def test_still_serves_correctly_after_bad_requests(served):
    r = served.client.completions.create(model=served.model, prompt=PROMPTS[1], temperature=0,
                                         max_tokens=12, **ids_body())
    assert r.choices[0].token_ids == served.offline[1].token_ids


def test_disconnect_mid_stream_frees_every_kv_block(served):
    served.server.step_delay = 0.03
    try:
        body = {"prompt": [1, 2, 3, 4], "max_tokens": 120, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", f"{served.base}/v1/completions", json=body) as r:
                assert r.status_code == 200
                chunks = []
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                    if len(chunks) == 3:
                        break
                assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
                assert served.llm.engine.kv_blocks_used > 0
            # leaving the block closes the connection mid-stream
        wait_until(lambda: served.llm.engine.kv_blocks_used == 0 and
                   not served.server.engine.in_flight, 1.0, "every KV block to be free")
        assert not served.llm.engine.requests
    finally:
        served.server.step_delay = 0.0


def test_disconnect_while_waiting_for_a_non_streamed_reply_frees_every_kv_block(served):
    served.server.step_delay = 0.03
    try:
        body = {"prompt": [1, 2, 3, 4], "max_tokens": 120, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{served.base}/v1/completions", json=body, timeout=httpx.Timeout(
                30, read=0.5))
        wait_until(lambda: served.llm.engine.kv_blocks_used == 0 and
                   not served.server.engine.in_flight, 1.0, "every KV block to be free")
        assert not served.llm.engine.requests
    finally:
        served.server.step_delay = 0.0


def test_embedded_model_has_a_chat_template():
    from jaxserve.text.chat import render_chat
    from jaxserve.text.load import chat_template_of

    template = chat_template_of(embedded_model())
    assert render_chat(template, CHAT) == ("### system:\nAnswer in code.\n### user:\nimport os\n"
                                           "### assistant:\n")


def test_engine_failure_gives_500_then_503(model_dir, monkeypatch):
    llm = LLM(model_dir, **ENGINE)  # its own engine; never compiles: the first step fails

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine, "step", broken_step)
    engine = ServedEngine()
    http = HTTPFrontEnd(engine, "127.0.0.1", 0).start()
    try:
        engine.attach(llm)
        base = f"http://127.0.0.1:{http.port}"
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "def f():"}, timeout=30)
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/health").status_code == 503
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "def f():"}, timeout=30)
        assert r.status_code == 503
    finally:
        http.stop()
        engine.stop()


def test_no_grpc_needs_http_port(capsys):
    from jaxserve.cli import main

    assert main(["serve", "--no-grpc"]) == 2
    assert "--no-grpc needs --http-port" in capsys.readouterr().err


def test_loading_server_answers_503():
    engine = ServedEngine()
    http = HTTPFrontEnd(engine, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{http.port}"
        assert httpx.get(f"{base}/health").status_code == 503
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{base}/v1/models").status_code == 503
    finally:
        http.stop()
        engine.stop()


# ---- the `jaxserve serve --no-grpc --http-port 0` process ----

def test_process_http_only_sigterm_drains_then_exits_0(model_dir):
    proc = ServerProcess("--model", str(model_dir), "--no-grpc", "--http-port", "0",
                         "--max-model-len", "128", "--max-num-seqs", "2",
                         "--shutdown-timeout", "2", "--step-delay", "0.04")
    try:
        m = proc.wait_for("stderr", r"listening on 127\.0\.0\.1 \(gRPC off\) \(metrics off\) "
                                    r"\(HTTP on :(\d+)\)", 120)
        base = f"http://127.0.0.1:{m[1]}"
        proc.wait_for("stdout", r"^jaxserve serving on 127\.0\.0\.1 \(gRPC off\)", 180)
        assert httpx.get(f"{base}/health").json() == {"status": "serving"}
        body = {"prompt": [1, 2, 3], "max_tokens": 120, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.Client(timeout=60) as h, h.stream("POST", f"{base}/v1/completions",
                                                     json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            proc.terminate()
            wait_until(lambda: httpx.get(f"{base}/health").status_code == 503, 5,
                       "health 503")
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "service_unavailable"
            rest = [line for line in lines if line.startswith("data: ")]
        # aborted at the shutdown timeout (2 s < 120 x 0.04 s); the stream still ends cleanly
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finishes[-1] == "abort" and rest[-1] == "data: [DONE]"
        assert proc.proc.wait(30) == 0
        assert "1 request(s) aborted at the shutdown timeout" in proc.stderr_text()
    finally:
        proc.kill()
