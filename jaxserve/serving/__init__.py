"""The gRPC and HTTP front ends of jaxserve: `jaxserve serve` (server.py) and its client (client.py).

    jaxserve.proto       the API (package jaxserve.v1); jaxserve_pb2*.py are generated from it by
                         `python -m jaxserve.serving.gen_stubs` and checked in
    convert.py           proto messages <-> SamplingParams, token ids, stream events
    metrics.py           Prometheus metrics
    server.py            the service, health, reflection, drain on SIGTERM
    http.py              the OpenAI-compatible HTTP API (FastAPI + uvicorn) over the same Server
    client.py            a small Python client

This package sits on top of `jaxserve.api` / `jaxserve.engine.loop` and nothing below imports it.
The server never touches the Engine directly: all request traffic goes through EngineLoop.
This __init__ imports nothing (importing `jaxserve` itself loads jax, via jaxserve/__init__.py).
"""
