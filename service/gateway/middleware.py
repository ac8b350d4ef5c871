"""The gateway's one ASGI middleware: request ids, auth, body size, metrics, last-resort errors.

For every HTTP request, before any route runs:
- a request id is taken from `X-Request-ID` (if valid) or generated; routes replace it with
  the body's `request_id`; every response carries the final one in `X-Request-ID`;
- paths under `/v1/` need a valid Bearer key when keys are configured (401 otherwise), checked
  before the body is read, so an unauthenticated client cannot make the gateway parse anything;
- a body over `max_request_bytes` is refused: at once from `Content-Length`, or while it
  streams in (chunked uploads); a body that goes `body_read_timeout_s` without a byte is
  refused with 408 (a stalled upload must not keep what it reserved);
- a request whose body the gateway works on (`ADMITTED_PATHS`: scoring, prompt sets) is
  admitted (`service.gateway.admission`): a request slot and its `Content-Length` bytes are
  reserved before the body is read (without a length, the bytes as they stream in), else 429
  with Retry-After at once; the ticket is on `scope["state"]["admission"]` for the route's
  image reservations, released after the response;
- the request is counted and timed by route template and status;
- an exception nothing else handled becomes a JSON 500 without a traceback (logged).
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.gateway.admission import Admission, Overloaded, Ticket
from service.gateway.auth import PROTECTED_PREFIX, bearer_token, key_matches, route_path
from service.gateway.errors import ApiError, error_response
from service.gateway.metrics import GatewayMetrics
from service.gateway.request_ids import HEADER, new_request_id, valid_request_id

CLIENT_CLOSED_REQUEST = 499  # status recorded in /metrics for a client that disconnected

log = logging.getLogger("service.gateway")

# POST routes whose body takes gateway memory and work: they share the admission budgets.
ADMITTED_PATHS = frozenset(
    {"/v1/score", "/v1/score/group", "/v1/prompt-sets", "/v1/prompt-sets/import"}
)


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: list[BaseRoute],
        metrics: GatewayMetrics,
        keys: list[bytes],
        max_request_bytes: int,
        admission: Admission | None = None,
        body_read_timeout_s: float = 60.0,
        body_total_timeout_s: float = 120.0,
    ) -> None:
        self.admission = admission
        self.body_read_timeout_s = body_read_timeout_s
        self.body_total_timeout_s = body_total_timeout_s
        self.app = app
        self.routes = routes  # filled by create_app once every route exists
        self.metrics = metrics
        self.keys = keys
        self.max_request_bytes = max_request_bytes

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return route.path
        path = route_path(scope)
        for candidate in self.routes:  # a request refused before routing (401, 413)
            regex = getattr(candidate, "path_regex", None)
            if regex is not None and regex.match(path):
                return candidate.path
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        state["request_id"] = valid_request_id(headers.get(HEADER)) or new_request_id()
        status = 500
        started = False
        ticket: Ticket | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = state["request_id"]
            await send(message)

        try:
            refusal = self._refuse(scope, headers)
            if refusal is None:
                ticket, refusal = self._admit(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            await self.app(scope, self._limited(receive, ticket), send_with_id)
        except ClientDisconnect:
            # The client went away mid-request (e.g. its own deadline cut the upload): nobody
            # to answer; counted as 499 (nginx's "client closed request"), not as our error.
            status = CLIENT_CLOSED_REQUEST
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = error_response(
                500, "internal_error", "internal error (logged)", state["request_id"]
            )
            await response(scope, receive, send_with_id)
        finally:
            if ticket is not None:
                ticket.release()
            endpoint = self._endpoint(scope)
            method = scope.get("method", "")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint, method, str(status)).observe(elapsed)

    def _refuse(self, scope: Scope, headers: Headers):
        rid = scope["state"]["request_id"]
        if self.keys and route_path(scope).startswith(PROTECTED_PREFIX):
            token = bearer_token(headers.get("authorization"))
            if not key_matches(token, self.keys):
                message = "missing API key" if token is None else "invalid API key"
                return error_response(
                    401,
                    "unauthorized",
                    f"{message}: send 'Authorization: Bearer <key>'",
                    rid,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size < 0:
                return error_response(400, "bad_request", "invalid Content-Length header", rid)
            if size > self.max_request_bytes:
                return self._too_large(rid)
        return None

    def _admit(self, scope: Scope, headers: Headers):
        """(the request's admission ticket, None) or (None, a 429 response)."""
        if (
            self.admission is None
            or scope.get("method") != "POST"
            or route_path(scope) not in ADMITTED_PATHS
        ):
            return None, None
        length = headers.get("content-length")
        try:
            ticket = self.admission.admit(int(length) if length is not None else 0)
        except Overloaded as exc:
            return None, error_response(
                exc.status_code,
                exc.code,
                exc.message,
                scope["state"]["request_id"],
                limit=exc.limit,
                headers=exc.headers,
                details=exc.details,
            )
        ticket.streamed = length is None  # bytes are reserved as they arrive
        scope["state"]["admission"] = ticket
        return ticket, None

    def _too_large(self, rid: str):
        return error_response(
            413,
            "request_too_large",
            f"the request body exceeds {self.max_request_bytes} bytes",
            rid,
            field="body",
            limit=self.max_request_bytes,
        )

    def _limited(self, receive: Receive, ticket: Ticket | None = None) -> Receive:
        limit = self.max_request_bytes
        received = 0
        streamed = ticket is not None and ticket.streamed
        timeout, total = self.body_read_timeout_s, self.body_total_timeout_s
        body_done = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total  # the whole body, however it trickles in

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later reads wait for a disconnect: no deadline on those
                return await receive()
            gap_ends = loop.time() + timeout
            try:
                async with asyncio.timeout_at(min(gap_ends, deadline)):  # no task per chunk
                    message = await receive()
            except TimeoutError:
                if gap_ends <= deadline:
                    why, bound = f"no bytes for {timeout:g} s, the upload stalled", timeout
                else:
                    why, bound = f"not all received within {total:g} s", total
                error = ApiError(408, "body_timeout", f"body: {why}", field="body", limit=bound)
                raise error from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                chunk = len(message.get("body", b""))
                received += chunk
                if streamed and received <= limit:
                    ticket.reserve("body_bytes", chunk)  # Overloaded: 429
                if received > limit:
                    raise ApiError(
                        413,
                        "request_too_large",
                        f"the request body exceeds {limit} bytes",
                        field="body",
                        limit=limit,
                    )
            return message

        return limited_receive
