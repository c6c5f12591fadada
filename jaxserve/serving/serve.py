"""`jaxserve serve`: the front ends over one engine, from start to drain.

The one place that composes the gRPC `Server` (server.py, with the metrics port) and the HTTP
front end (http.py) over the same `ServedEngine` (frontend.py): neither front end imports the
other. `serve(args, make_llm)` checks where it may listen and with which key (auth.py), binds,
loads the model, serves until SIGTERM / SIGINT, drains, and exits 0.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading

from jaxserve.serving.auth import Auth, api_key_from, check_listen, is_loopback
from jaxserve.serving.server import Server

log = logging.getLogger("jaxserve.serving")


def _decoding_streams(args) -> int:
    """Streams the engine can decode at once (known before the model loads): per DP replica
    `max_num_seqs`, times at most every device of the mesh being a replica."""
    from jaxserve.settings import SchedulerSettings
    from jaxserve.sharding import parse_mesh

    per_replica = args.max_num_seqs or SchedulerSettings().max_num_seqs
    devices = math.prod(parse_mesh(args.mesh).values()) if args.mesh else 1
    return per_replica * devices


def auth_of(args) -> Auth:
    """The key and open endpoints of `serve`'s flags; refuses a non-loopback host left open."""
    auth = Auth(api_key_from(args.api_key), health=args.auth_health, metrics=args.auth_metrics)
    check_listen(args.host, auth, args.allow_unauthenticated)
    return auth


def _describe(auth: Auth, host: str) -> str | None:
    if auth.api_key is None:
        return None if is_loopback(host) else \
            f"warning: {host} is served without an API key (--allow-unauthenticated)"
    open_ = [name for name, protected in (("health", auth.health), ("metrics", auth.metrics))
             if not protected]
    return "requests need the API key" + (f" ({' and '.join(open_)} open)" if open_ else "")


def serve(args, make_llm, on_ready=None) -> int:
    """`jaxserve serve`: start, load, serve until SIGTERM/SIGINT, drain, exit 0. `on_ready(llm)`
    runs once the model is loaded (and warmed up), before the engine thread owns it."""
    auth = auth_of(args)
    grpc_port = None if args.no_grpc else args.port
    http_port = args.http_port
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
    server = Server(args.host, grpc_port, metrics_port=args.metrics_port, auth=auth,
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
                http = HTTPFrontEnd(server.engine, args.host, http_port, auth=auth,
                                    max_workers=server.max_workers,
                                    max_body_bytes=server.max_message_bytes).start()
            except OSError as e:
                raise ValueError(f"cannot listen on {args.host}:{http_port} (HTTP): {e}"
                                 ) from None
        where = f"{args.host}:{server.port}" if grpc_port is not None else \
            f"{args.host} (gRPC off)"
        metrics = f"metrics on :{server.metrics_port}" if server.metrics_port else "metrics off"
        extra = f" (HTTP on :{http.port})" if http is not None else ""
        print(f"jaxserve: listening on {where} ({metrics}){extra}, loading {args.model}",
              file=sys.stderr, flush=True)
        if note := _describe(auth, args.host):
            print(f"jaxserve: {note}", file=sys.stderr, flush=True)
        if args.load_delay:
            stop.wait(args.load_delay)
        if not stop.is_set():
            llm = make_llm(args)
            if args.warmup:
                llm.warmup()
            if on_ready is not None:
                on_ready(llm)
            server.attach(llm)
            if llm.cluster is not None:  # a lost process: fail what runs, then exit non-zero
                llm.cluster.on_lost(server.engine.fail)
        if not stop.is_set():
            print(f"jaxserve serving on {where} ({metrics}){extra}", flush=True)
            while not stop.wait(0.2):
                server.engine.check_engine()
        aborted = server.drain(args.shutdown_timeout)
        print(f"jaxserve: drained ({aborted} request(s) aborted at the shutdown timeout)",
              file=sys.stderr, flush=True)
    finally:
        if http is not None:
            http.stop()
        server.stop()
    return 0
