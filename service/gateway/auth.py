"""Bearer API keys for the /v1 endpoints, and the bind check the launcher runs.

Keys come from `Settings.api_keys`; a request's key is compared with every configured key with
`hmac.compare_digest` (constant time, no early exit), so timing reveals neither a key nor which
one matched. With no key configured the API is open, and `check_bind` then refuses any
non-loopback address: an open reward service is only ever reachable from its own host.

Keys are never logged: nothing here logs, and the request logging elsewhere names method, path
and status only. `KeyRateLimit` (optional, `rate_limit_per_key_rps`) gives each key a token
bucket for /v1; past it a request gets 429 with Retry-After before its body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.gateway.errors import error_response
from service.settings import Settings

PROTECTED_PREFIX = "/v1/"


def route_path(scope: Scope) -> str:
    """The path the router matches: the request's path without the ASGI root path. Behind a
    proxy that serves the gateway under a prefix (uvicorn --root-path /api), scope["path"] is
    "/api/v1/score" while the route is "/v1/score": checks on the raw path would skip auth."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


MAX_BUCKETS = 10_000  # distinct keys tracked (keys are configured, so a bound only in theory)


def configured_keys(keys: Sequence[SecretStr | str]) -> list[bytes]:
    """Non-blank keys as bytes (a blank key would accept `Authorization: Bearer `)."""
    out = []
    for key in keys:
        value = key.get_secret_value() if isinstance(key, SecretStr) else str(key)
        if value.strip():
            out.append(value.strip().encode("utf-8"))
    return out


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(token: str | None, keys: Sequence[bytes]) -> bool:
    if token is None:
        return False
    given = token.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public address


def check_bind(host: str, settings: Settings) -> None:
    """Raise ValueError (one line) for a non-loopback `host` when no API key is configured."""
    if is_loopback(host) or configured_keys(settings.api_keys):
        return
    raise ValueError(
        f"refusing to bind {host!r} without an API key: set REWARD_API_KEYS "
        "(e.g. '[\"<key>\"]') or bind 127.0.0.1"
    )


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` → 0 when granted, else seconds to wait."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class KeyRateLimit:
    """ASGI middleware: a token bucket per API key on /v1 (one shared bucket without keys).

    It runs inside the gateway middleware, so only authenticated requests reach it, the
    request id is set and the 429 is counted and timed like every response. Buckets are keyed
    by the sha256 of the key, never the key itself."""

    def __init__(self, app: ASGIApp, *, settings: Settings, metrics=None) -> None:
        self.app = app
        self.rate = settings.rate_limit_per_key_rps
        self.burst = settings.rate_limit_burst
        self.keyed = bool(configured_keys(settings.api_keys))
        self.metrics = metrics
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, token: str | None) -> TokenBucket:
        # Without keys a token proves nothing: a client sending a new one each time must not
        # get a new bucket each time.
        ident = hashlib.sha256((token or "").encode("utf-8")).hexdigest() if self.keyed else ""
        with self._lock:
            bucket = self._buckets.get(ident)
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._buckets.clear()
                assert self.rate is not None
                bucket = self._buckets[ident] = TokenBucket(self.rate, self.burst)
            return bucket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.rate is None
            or scope["type"] != "http"
            or not route_path(scope).startswith(PROTECTED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        token = bearer_token(Headers(scope=scope).get("authorization"))
        wait = self._bucket(token).take()
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        if self.metrics is not None:
            self.metrics.rate_limited.inc()
        retry = max(1, math.ceil(wait))
        response = error_response(
            429,
            "rate_limited",
            f"over this API key's rate limit of {self.rate:g} requests/s (burst "
            f"{self.burst}): retry after {retry} s",
            str((scope.get("state") or {}).get("request_id", "")),
            field="Authorization",
            limit=self.rate,
            headers={"Retry-After": str(retry)},
        )
        await response(scope, receive, send)
