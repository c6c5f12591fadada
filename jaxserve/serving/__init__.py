"""The gRPC and HTTP front ends of jaxserve: `jaxserve serve` (serve.py) and its client (client.py).

    jaxserve.proto       the API (package jaxserve.v1); jaxserve_pb2*.py are generated from it by
                         `python -m jaxserve.serving.gen_stubs` and checked in
    convert.py           proto messages <-> SamplingParams, token ids, stream events
    metrics.py           Prometheus metrics and their port
    auth.py              API keys: bearer checks, open endpoints, where a server may listen open
    frontend.py          what the front ends share: life cycle, health, requests in flight, drain,
                         abort (`ServedEngine`)
    server.py            the gRPC front end: the service, health, reflection
    http.py              the OpenAI-compatible HTTP front end (FastAPI + uvicorn)
    serve.py             `jaxserve serve`: both front ends over one ServedEngine, drain on SIGTERM
    client.py            a small Python client

Imports point down: serve.py -> server.py, http.py -> frontend.py -> metrics.py -> auth.py;
neither front end imports the other. This package sits on top of `jaxserve.api` /
`jaxserve.engine.loop` and nothing below imports it. The front ends never touch the Engine
directly: all request traffic goes through EngineLoop.
This __init__ imports nothing (importing `jaxserve` itself loads jax, via jaxserve/__init__.py).
"""
