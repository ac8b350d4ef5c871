"""Request ids: the client's (body `request_id`, else the `X-Request-ID` header) or a new one.

Ids are 1–128 printable ASCII characters without spaces, so they are safe to echo in a header
and in logs; an invalid header value is replaced by a generated id rather than echoed.
"""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request

REQUEST_ID_PATTERN = r"^[\x21-\x7e]{1,128}$"
_VALID = re.compile(REQUEST_ID_PATTERN)
HEADER = "X-Request-ID"


def valid_request_id(value: object) -> str | None:
    """`value` if it is a usable request id, else None."""
    if isinstance(value, str) and _VALID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id(request: Request) -> str:
    """The id set for this request by the middleware (or a route, from the body)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = new_request_id()
        request.state.request_id = rid
    return rid


def adopt_body_request_id(request: Request, body_id: str | None) -> str:
    """A request id given in the body takes precedence over the header's (and is echoed)."""
    if body_id is not None:
        request.state.request_id = body_id
    return current_request_id(request)
