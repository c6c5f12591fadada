"""API keys on both front ends, against real clients on 127.0.0.1: the official `openai` client
and raw httpx over HTTP, the jaxserve gRPC client (and raw channels) over gRPC, the metrics port;
health and metrics open by default and closed when asked; the refusal to serve a non-loopback host
without a key; `jaxserve serve --api-key` / JAXSERVE_API_KEY and `jaxserve client --api-key`
through the command line.

One in-process `Server` (gRPC + metrics port) with an `HTTPFrontEnd` on its engine, both behind
one key, over a small random Llama; the endpoint tests that need no model run on servers that
stay LOADING.
"""

import types

import grpc
import httpx
import openai
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jaxserve import LLM
from jaxserve.serving import auth as auth_module
from jaxserve.serving.auth import Auth, Endpoint, check_listen, is_loopback
from jaxserve.serving.client import Client
from jaxserve.serving.http import HTTPFrontEnd
from jaxserve.serving.server import SERVICE, Server
from tests.serving_helpers import ServerProcess, make_model_dir, scrape

KEY = "sk-test-0123456789abcdef"
ENGINE = dict(max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
              max_prefill_chunk=16)
SHORT = dict(temperature=0, max_tokens=2, ignore_eos=True)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def model_dir(hf_model_dir, tmp_path_factory):
    return make_model_dir(hf_model_dir("llama")[1], tmp_path_factory.mktemp("auth") / "model")


@pytest.fixture(scope="module")
def keyed(model_dir):
    """gRPC, HTTP and the metrics port behind KEY (health and metrics open), serving."""
    auth = Auth(KEY)
    server = Server("127.0.0.1", 0, metrics_port=0, auth=auth).start()
    http = HTTPFrontEnd(server.engine, "127.0.0.1", 0, auth=auth).start()
    server.attach(LLM(model_dir, **ENGINE))
    base = f"http://127.0.0.1:{http.port}"
    yield types.SimpleNamespace(server=server, http=http, base=base, model=model_dir.name,
                                grpc_target=f"127.0.0.1:{server.port}")
    server.drain(0)
    http.stop()
    server.stop()


@pytest.fixture
def loading_servers():
    """Start a gRPC Server (+ metrics port) and an HTTPFrontEnd over one engine that stays
    LOADING, behind a given Auth."""
    started = []

    def start(auth: Auth):
        server = Server("127.0.0.1", 0, metrics_port=0, auth=auth).start()
        http = HTTPFrontEnd(server.engine, "127.0.0.1", 0, auth=auth).start()
        started.append((server, http))
        return types.SimpleNamespace(server=server, base=f"http://127.0.0.1:{http.port}",
                                     grpc_target=f"127.0.0.1:{server.port}")

    yield start
    for server, http in started:
        http.stop()
        server.stop()


def openai_client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


# ---- the key itself ----

def test_refusal_accepts_only_the_exact_key_and_compares_in_constant_time(monkeypatch):
    compared = []
    real = auth_module.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    auth = Auth(KEY)
    assert auth.refusal(Endpoint.API, f"Bearer {KEY}") is None
    assert auth.refusal(Endpoint.API, f"bearer {KEY}") is None  # the scheme is case-insensitive
    for wrong in (KEY[:-1], KEY + "x", KEY.upper(), "x" * len(KEY)):
        assert auth.refusal(Endpoint.API, f"Bearer {wrong}") == "the API key is not valid"
    assert len(compared) == 6  # every key comparison went through hmac.compare_digest
    assert all(len(a) == len(b) == 32 for a, b in compared)  # digests: the length does not leak
    assert "needs an API key" in auth.refusal(Endpoint.API, None)
    assert "not a bearer token" in auth.refusal(Endpoint.API, f"Basic {KEY}")
    assert "not a bearer token" in auth.refusal(Endpoint.API, KEY)
    assert len(compared) == 6


def test_open_endpoints_by_default_and_closed_when_asked():
    assert Auth().refusal(Endpoint.API, None) is None  # no key: everything open
    open_ = Auth(KEY)
    assert open_.refusal(Endpoint.HEALTH, None) is None
    assert open_.refusal(Endpoint.METRICS, None) is None
    closed = Auth(KEY, health=True, metrics=True)
    assert closed.refusal(Endpoint.HEALTH, None) and closed.refusal(Endpoint.METRICS, None)
    assert closed.refusal(Endpoint.HEALTH, f"Bearer {KEY}") is None
    assert KEY not in repr(closed)


@pytest.mark.parametrize("kwargs, message", [
    (dict(api_key=""), "the API key is empty"),
    (dict(api_key="two words"), "printable ASCII without spaces"),
    (dict(api_key="caf\u00e9"), "printable ASCII without spaces"),
    (dict(health=True), "--auth-health needs an API key"),
    (dict(metrics=True), "--auth-metrics needs an API key"),
])
def test_bad_auth_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Auth(**kwargs)


# ---- HTTP ----

def test_openai_client_with_the_key_works(keyed):
    with openai_client(keyed.base, KEY) as client:
        r = client.completions.create(model=keyed.model, prompt="def f(x):", max_tokens=2,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
        assert [m.id for m in client.models.list().data] == [keyed.model]


def test_openai_client_with_a_wrong_key_gets_401(keyed):
    with openai_client(keyed.base, "sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.completions.create(model=keyed.model, prompt="x", max_tokens=2)
        assert info.value.status_code == 401
        assert info.value.body["code"] == "invalid_api_key"
        assert info.value.body["message"] == "the API key is not valid"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=keyed.model,
                                           messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_openai_client_without_a_key_gets_401(keyed):
    with openai_client(keyed.base, "unused") as client:
        with pytest.raises(openai.AuthenticationError) as info:  # no Authorization header
            client.completions.create(model=keyed.model, prompt="x", max_tokens=2,
                                      extra_headers={"Authorization": openai.Omit()})
    assert "needs an API key" in info.value.body["message"]


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": KEY}],
                         ids=["none", "wrong", "no scheme"])
def test_http_without_the_key_is_401_openai_shaped(keyed, headers):
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/models")):
        # judged before the body: even an invalid one gets 401
        r = httpx.request(method, f"{keyed.base}{path}", content=b"{not json", headers=headers)
        assert r.status_code == 401, (path, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert r.headers["www-authenticate"] == "Bearer"


def test_http_health_and_metrics_are_open_by_default(keyed):
    assert httpx.get(f"{keyed.base}/health").json() == {"status": "serving"}
    r = httpx.get(f"{keyed.base}/metrics")
    assert r.status_code == 200 and "jaxserve_kv_blocks_total" in r.text


# ---- gRPC ----

def test_grpc_without_or_with_a_wrong_key_is_unauthenticated(keyed):
    for key in (None, "sk-wrong"):
        with Client(keyed.grpc_target, api_key=key) as client:
            for call in (lambda: list(client.generate("x", timeout=10, **SHORT)),
                         client.model_info, lambda: client.score("x", [" y"]),
                         lambda: client.abort("some-id")):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == UNAUTHENTICATED, key
            # reflection (a stream-stream call) is behind the key too
            stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")]), timeout=10))
            assert info.value.code() == UNAUTHENTICATED
    with Client(keyed.grpc_target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.model_info()
        assert "needs an API key" in info.value.details()


def test_grpc_with_the_key_works(keyed):
    with Client(keyed.grpc_target, api_key=KEY) as client:
        [c] = client.complete("def f(x):", timeout=60, **SHORT)
        assert c.finish_reason == "length" and len(c.token_ids) == 2
        assert client.model_info().model == keyed.model
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        [listed] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10)
        assert SERVICE in {s.name for s in listed.list_services_response.service}
    # raw metadata, without the client's interceptor
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/GetModelInfo", request_serializer=bytes,
                                   response_deserializer=bytes)
        assert call(b"", metadata=[("authorization", f"Bearer {KEY}")], timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            call(b"", metadata=[("authorization", f"Bearer {KEY}x")], timeout=10)
        assert info.value.code() == UNAUTHENTICATED


def test_grpc_health_and_metrics_port_are_open_by_default(keyed):
    with Client(keyed.grpc_target) as client:
        assert client.health() == "SERVING" and client.health(SERVICE) == "SERVING"
    assert scrape(keyed.server.metrics_port)["jaxserve_kv_blocks_total"] > 0


def test_cli_client_takes_the_key(keyed, capsys, monkeypatch):
    from jaxserve.cli import main

    monkeypatch.delenv("JAXSERVE_API_KEY", raising=False)
    flags = ["client", "--target", keyed.grpc_target, "--prompt", "x", "--max-tokens", "2",
             "--temperature", "0", "--ignore-eos"]
    assert main(flags) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*flags, "--api-key", KEY]) == 0
    assert "[length: " in capsys.readouterr().err
    monkeypatch.setenv("JAXSERVE_API_KEY", KEY)
    assert main(flags) == 0


# ---- health and metrics protected when asked (servers still LOADING: no model needed) ----

def test_health_and_metrics_need_the_key_when_asked(loading_servers):
    s = loading_servers(Auth(KEY, health=True, metrics=True))
    with Client(s.grpc_target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.health()
        assert info.value.code() == UNAUTHENTICATED
    with Client(s.grpc_target, api_key=KEY) as client:
        assert client.health() == "NOT_SERVING"  # loading
    assert httpx.get(f"{s.base}/health").status_code == 401
    assert httpx.get(f"{s.base}/health", headers=bearer("sk-wrong")).status_code == 401
    assert httpx.get(f"{s.base}/health", headers=bearer(KEY)).json() == {"status": "loading"}
    assert httpx.get(f"{s.base}/metrics").status_code == 401
    assert httpx.get(f"{s.base}/metrics", headers=bearer(KEY)).status_code == 200
    port = s.server.metrics_port
    r = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "needs an API key" in r.text
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers=bearer("sk-no")).status_code \
        == 401
    assert "jaxserve_kv_blocks_total" in scrape(port, bearer(KEY))


def test_health_alone_protected_leaves_metrics_open(loading_servers):
    s = loading_servers(Auth(KEY, health=True))
    assert httpx.get(f"{s.base}/health").status_code == 401
    assert httpx.get(f"{s.base}/metrics").status_code == 200
    assert "jaxserve_kv_blocks_total" in scrape(s.server.metrics_port)


def test_no_key_keeps_every_endpoint_open(loading_servers):
    s = loading_servers(Auth())
    with Client(s.grpc_target) as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.model_info()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # loading, not refused
    assert httpx.post(f"{s.base}/v1/completions", json={"prompt": "x"}).status_code == 503


# ---- where a server may listen without a key ----

@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost",
                                  "LOCALHOST"])
def test_loopback_hosts_need_no_key(host):
    assert is_loopback(host)
    check_listen(host, Auth())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "example.com"])
def test_non_loopback_hosts_need_a_key_or_allow_unauthenticated(host):
    assert not is_loopback(host)
    with pytest.raises(ValueError, match=f"refusing to listen on {host!r} without an API key"):
        check_listen(host, Auth())
    check_listen(host, Auth(), allow_unauthenticated=True)
    check_listen(host, Auth(KEY))


def test_serve_refuses_a_non_loopback_host_without_a_key(capsys, monkeypatch):
    from jaxserve.cli import main

    monkeypatch.delenv("JAXSERVE_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--no-grpc"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0' without an API key" in err
    assert "--allow-unauthenticated" in err
    # the host check passes: the next check (a later, unrelated error) is the one that fails
    for extra, env in ((["--allow-unauthenticated"], None), (["--api-key", KEY], None),
                       ([], KEY)):
        if env:
            monkeypatch.setenv("JAXSERVE_API_KEY", env)
        assert main(["serve", "--host", "0.0.0.0", "--no-grpc", *extra]) == 2
        assert "--no-grpc needs --http-port" in capsys.readouterr().err
    assert main(["serve", "--auth-metrics", "--api-key", ""]) == 2
    assert "the API key is empty" in capsys.readouterr().err


def test_serve_process_takes_the_key_from_the_environment(model_dir):
    """`jaxserve serve` with JAXSERVE_API_KEY: gRPC and HTTP need it while the model loads."""
    proc = ServerProcess("--model", str(model_dir), "--port", "0", "--http-port", "0",
                         "--load-delay", "120", env={"JAXSERVE_API_KEY": KEY})
    try:
        m = proc.wait_for("stderr", r"listening on 127\.0\.0\.1:(\d+) \(metrics off\) "
                                    r"\(HTTP on :(\d+)\)", 120)
        proc.wait_for("stderr", r"^jaxserve: requests need the API key \(health and metrics "
                                r"open\)$", 10)
        target, base = f"127.0.0.1:{m[1]}", f"http://127.0.0.1:{m[2]}"
        with Client(target) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                client.model_info()
            assert info.value.code() == UNAUTHENTICATED
        with Client(target, api_key=KEY) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.model_info()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # past the key: loading
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers=bearer(KEY)).status_code == 503
        assert httpx.get(f"{base}/health").status_code == 503
    finally:
        proc.kill()
