"""API keys for the front ends: who may call, which endpoints stay open, where a server may listen
without a key.

With a key (`jaxserve serve --api-key KEY`, or the environment variable JAXSERVE_API_KEY) every
request must carry `Authorization: Bearer KEY`: the HTTP header (else 401) or the gRPC metadata
`authorization` (else UNAUTHENTICATED). Health checks and Prometheus metrics stay open by default,
so load balancers and scrapers need no secret; `--auth-health` / `--auth-metrics` close them too.
The key is compared in constant time, as digests, so that neither its bytes nor its length leak
through timing.

Without a key a server listens only on loopback (127.0.0.0/8, ::1, localhost): binding any other
host open needs `--allow-unauthenticated`, so exposing a model is a decision, not a default.

This module knows no wire protocol: each front end reads its header or metadata and asks
`Auth.refusal`. It must never log or repeat a key.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import ipaddress
import os

ENV_VAR = "JAXSERVE_API_KEY"
HOW = "send 'Authorization: Bearer KEY'"


class Endpoint(enum.Enum):
    API = "api"  # generation, scoring, abort, model info, reflection
    HEALTH = "health"  # grpc.health.v1, HTTP /health
    METRICS = "metrics"  # Prometheus: HTTP /metrics, --metrics-port


@dataclasses.dataclass(frozen=True)
class Auth:
    api_key: str | None = dataclasses.field(default=None, repr=False)
    health: bool = False  # health checks need the key too
    metrics: bool = False  # metrics need the key too

    def __post_init__(self):
        key = self.api_key
        if key is not None:
            if not key:
                raise ValueError("the API key is empty")
            if not all("!" <= c <= "~" for c in key):
                raise ValueError("the API key must be printable ASCII without spaces (it travels "
                                 "in an Authorization header)")
        for flag, on in (("--auth-health", self.health), ("--auth-metrics", self.metrics)):
            if on and key is None:
                raise ValueError(f"{flag} needs an API key (--api-key KEY or {ENV_VAR})")

    def protects(self, endpoint: Endpoint) -> bool:
        if self.api_key is None:
            return False
        return {Endpoint.API: True, Endpoint.HEALTH: self.health,
                Endpoint.METRICS: self.metrics}[endpoint]

    def refusal(self, endpoint: Endpoint, authorization: str | None) -> str | None:
        """None if a request to `endpoint` carrying this Authorization value may pass, else
        why not (for the client: it never holds the key)."""
        if not self.protects(endpoint):
            return None
        if not authorization:
            return f"this server needs an API key: {HOW}"
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return f"the authorization is not a bearer token: {HOW}"
        if not hmac.compare_digest(_digest(token.strip()), _digest(self.api_key)):
            return "the API key is not valid"
        return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def api_key_from(flag: str | None, environ=os.environ) -> str | None:
    """The key of `--api-key` if given, else JAXSERVE_API_KEY (unset or empty: no key)."""
    if flag is not None:
        return flag
    return environ.get(ENV_VAR) or None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name (other than localhost), or "" (every interface)
        return False


def check_listen(host: str, auth: Auth, allow_unauthenticated: bool = False) -> None:
    """Refuse to serve a non-loopback host without an API key unless told to."""
    if auth.api_key is None and not allow_unauthenticated and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host!r} without an API key: anyone who can "
                         f"reach it could use the model. Give --api-key KEY (or set {ENV_VAR}), "
                         "or --allow-unauthenticated to serve it open")
