"""Request bodies parsed off the event loop, strictly.

`OffloadedJsonRoute` is the APIRoute class of the routes that take large JSON bodies: it reads
the body, parses it in the gateway's worker pool (`decode_threads`; a 100 MB body takes the
parser hundreds of milliseconds, which on the event loop would stall /healthz and every other
request), and hands the parsed value to FastAPI, which validates it against the route's model
as usual. The parse is strict JSON (RFC 8259): a key repeated in one object and the
non-standard constants NaN / Infinity are 400s, not silently last-wins or a float the schema
never allowed; so are an integer longer than Python converts (`sys.get_int_max_str_digits`)
and a string holding an unpaired UTF-16 surrogate escape ("\\ud800": valid JSON syntax, but
not Unicode text, which the tokenizer and the response encoder cannot take), named by its
path. The body's sha256 is kept on `request.state.body_sha256` (the idempotency key).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.gateway.errors import ApiError


class _Invalid(ValueError):
    pass


# An escape of a UTF-16 surrogate (\uD800-\uDFFF): a cheap test of whether a body can hold one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Invalid(f"duplicate key {json.dumps(key)[:80]} in one object")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise _Invalid(f"{name} is not JSON")


def loads_strict(
    body: bytes, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None
) -> Any:
    """`body` parsed as strict JSON (module docstring), or ApiError 400 `malformed_json`.

    `object_pairs_hook` (default: a repeated key is malformed JSON) may raise its own errors,
    which propagate."""
    try:
        value = json.loads(
            body,
            object_pairs_hook=object_pairs_hook or _unique_keys,
            parse_constant=_no_constants,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as exc:
        message = f"request body is not valid JSON ({exc.msg} at character {exc.pos})"
        raise ApiError(400, "malformed_json", message, field="body") from None
    except (_Invalid, UnicodeDecodeError, RecursionError) as exc:
        message = f"request body is not valid JSON: {str(exc)[:200]}"
        raise ApiError(400, "malformed_json", message, field="body") from None
    if _may_hold_surrogate(body) and (where := _unpaired_surrogate(value)) is not None:
        raise ApiError(
            400,
            "malformed_json",
            f"{where}: holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff alone), "
            "which is not Unicode text",
            field=where,
        )
    return value


def parse_json(body: bytes) -> tuple[Any, str]:
    """(the parsed body, its sha256), or ApiError 400 `malformed_json`."""
    return loads_strict(body), hashlib.sha256(body).hexdigest()


def _bounded_int(text: str) -> int:
    limit = sys.get_int_max_str_digits()
    if limit and len(text.lstrip("-")) > limit:
        raise _Invalid(f"an integer of {len(text)} digits (Python converts at most {limit})")
    return int(text)


def _may_hold_surrogate(body: bytes) -> bool:
    """Whether `body` holds a surrogate escape (byte searches first: a 100 MB body of base64
    images costs milliseconds, not a regex scan; valid pairs, as emoji, pass too)."""
    return (b"\\ud" in body or b"\\uD" in body) and _SURROGATE_ESCAPE.search(body) is not None


def _not_unicode(text: str) -> bool:
    if text.isascii():  # base64 images: no copy
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unpaired_surrogate(value: Any) -> str | None:
    """The path of the first string (or key) in `value` that is not Unicode text, if any."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if _not_unicode(node):
                return path or "body"
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(node))))
        elif isinstance(node, dict):
            children = []
            for key, child in node.items():
                if _not_unicode(key):  # never echo the key itself: it cannot be encoded
                    return f"{path or 'body'} (a key)"
                children.append((f"{path}.{key}" if path else key, child))
            stack.extend(reversed(children))
    return None


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type")
    if not content_type:
        return True  # FastAPI reads a body without a content type as JSON too
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def require_json(request: Request) -> None:
    """A 415 naming the header for a body that is not JSON (not FastAPI's 422 "Input should
    be a valid dictionary"); every request body is application/json."""
    if not _is_json(request):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type: {request.headers.get('content-type', '')[:80]!r} is not "
            "JSON; request bodies are application/json",
            field="Content-Type",
            limit="application/json",
        )


async def parse_in_pool(pool: Executor | None, body: bytes) -> tuple[Any, str]:
    return await asyncio.get_running_loop().run_in_executor(pool, parse_json, body)


class OffloadedJsonRoute(APIRoute):
    """A route whose JSON body is parsed in the gateway's worker pool (see the module doc)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:  # no body model (GET, or a route that reads its own body)
            return handler

        async def offloaded(request: Request) -> Response:
            body = await request.body()
            if body:
                require_json(request)
                pool = getattr(request.app.state, "gateway", None)
                value, digest = await parse_in_pool(getattr(pool, "pool", None), body)
                request._json = value  # Starlette's cache of request.json(): FastAPI uses it
                request.state.body_sha256 = digest
            return await handler(request)

        return offloaded
