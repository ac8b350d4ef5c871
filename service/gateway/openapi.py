"""The gateway's OpenAPI document, made exact (issue 13): `install_openapi(app, settings)`.

FastAPI's generated document is adjusted once, lazily, on first use:
- Bearer security is declared (scheme + every /v1 operation) only when API keys are configured;
  without keys there is no `securitySchemes` and no operation names one;
- every status code each route can return is documented with the `ErrorResponse` schema (the
  one JSON error shape of service/gateway/errors.py), FastAPI's `HTTPValidationError` (a shape
  the gateway never sends) replaced by it;
- the request schemas carry the limits the app enforces (items, images and contrastive prompts
  per request, prompt length, image size as base64 characters), so a client validating against
  the document is refused by neither.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.gateway.auth import PROTECTED_PREFIX, configured_keys
from service.settings import Settings

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
SCHEME = "HTTPBearer"

_DESCRIPTIONS = {
    "400": "malformed JSON, or an invalid Content-Length header",
    "401": "missing or invalid API key",
    "408": "the request body stalled: no bytes for body_read_timeout_s",
    "404": "no such prompt set",
    "409": "a content-hash id or request id already names different content",
    "413": "request body, image bytes or image pixels (per image or per request) over a limit",
    "415": "image not PNG, JPEG or WebP (detected from its content), or a body not JSON",
    "422": "invalid request or a limit exceeded (the field and the limit are named)",
    "429": "over a rate or admission limit: retry after Retry-After seconds",
    "502": "the reward backend failed",
    "503": "the reward backend is unavailable or serves another export (see Retry-After)",
    "504": "the reward backend did not answer within the deadline",
}
_BODY = ("400", "408", "413", "415", "422")  # any route that reads a JSON body
_SCORING = ("409", "429", "502", "503", "504")  # routes that call the backend
_ROUTE_CODES: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", "/v1/score"): _BODY + _SCORING,
    ("post", "/v1/score/group"): _BODY + _SCORING,
    ("post", "/v1/prompt-sets"): (*_BODY, "409", "429", "502", "503", "504"),
    ("post", "/v1/prompt-sets/import"): (*_BODY, "409", "429", "502", "503", "504"),
    ("get", "/v1/prompt-sets"): ("429",),
    ("get", "/v1/prompt-sets/{set_id}"): ("404", "429"),
    ("delete", "/v1/prompt-sets/{set_id}"): ("404", "429"),
    ("get", "/v1/models"): ("429",),
}
_EVERY_ROUTE = ("400", "413")  # the middleware: a bad or too large Content-Length, any path


def _limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The app's limits on the request schemas (where a JSON Schema keyword expresses them)."""
    image_chars = 2 * (4 * -(-settings.max_image_bytes // 3)) + 256  # whitespace allowed
    prompt = {"minLength": 1, "maxLength": settings.max_prompt_chars, "pattern": r"\S"}
    contrastive_text = {"maxLength": settings.max_prompt_chars}  # blank ones are dropped, not 422
    contrastive_items = {"maxItems": settings.max_contrastive_prompts}

    def props(name: str) -> dict[str, Any]:
        return (schemas.get(name) or {}).get("properties") or {}

    def contrastive_list(prop: dict[str, Any]) -> None:
        for alt in prop.get("anyOf", [prop]):
            if alt.get("type") == "array":
                alt.update(contrastive_items)
                alt.setdefault("items", {}).update(contrastive_text)

    def base64_string(prop: dict[str, Any]) -> None:  # the base64 form (beside a raw form)
        for alt in prop.get("anyOf", [prop]):
            if alt.get("type") == "string" or "$ref" not in alt and "type" not in alt:
                alt.update(minLength=1, maxLength=image_chars)

    score_item = props("ScoreItem")
    if "image" in score_item:
        base64_string(score_item["image"])
    if "prompt" in score_item:
        score_item["prompt"].update(prompt)
    if "contrastive" in score_item:
        contrastive_list(score_item["contrastive"])
    if "items" in props("ScoreRequest"):
        props("ScoreRequest")["items"]["maxItems"] = settings.max_items_per_request
    group = props("GroupRequest")
    if "images" in group:
        group["images"]["maxItems"] = settings.max_items_per_request
        base64_string(group["images"].setdefault("items", {}))
    if "prompt" in group:
        group["prompt"].update(prompt)
    if "contrastive" in props("TextNormOptions"):
        contrastive_list(props("TextNormOptions")["contrastive"])
    create = props("PromptSetCreate")
    if "prompt" in create:
        create["prompt"].update(prompt)
    if "contrastive" in create:
        contrastive_list(create["contrastive"])


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The exact document of `app` under `settings` (not cached; `install_openapi` caches)."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    keys = bool(configured_keys(settings.api_keys))
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            codes = set(_EVERY_ROUTE) | set(_ROUTE_CODES.get((method, path), ()))
            if path.startswith(PROTECTED_PREFIX):
                if keys:
                    codes.add("401")
                    op["security"] = [{SCHEME: []}]
                else:
                    op.pop("security", None)
            for code in sorted(codes):
                existing = responses.get(code)
                if existing and code == "503" and path == "/readyz":
                    continue  # /readyz answers its Readiness body with 503
                responses[code] = {
                    "description": _DESCRIPTIONS[code],
                    "content": {"application/json": {"schema": ERROR_REF}},
                }
                if code in ("429", "503"):
                    responses[code]["headers"] = {
                        "Retry-After": {
                            "description": "seconds to wait before retrying",
                            "schema": {"type": "integer", "minimum": 1},
                        }
                    }
            for code in [c for c in responses if c not in codes and c in _DESCRIPTIONS]:
                if not (code == "503" and path == "/readyz"):
                    del responses[code]  # a code this route never answers (e.g. 401 without keys)
    if keys:
        components.setdefault("securitySchemes", {})[SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key (REWARD_API_KEYS)",
        }
    else:
        components.pop("securitySchemes", None)
    existing = doc["paths"].get("/v1/prompt-sets", {}).get("post", {}).get("responses", {})
    if "201" in existing:  # the same set again: 200 with the same body, `created: false`
        existing["200"] = {**existing["201"], "description": "already registered (same id)"}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    _limits(schemas, settings)
    return doc


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve `build_openapi` as the app's document (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(app: FastAPI, path: str) -> list[str] | None:
    """Every method the app serves at `path`, from its document (None: no such path).

    Starlette's 405 names only the methods of the first route that matched the path, so
    `/v1/prompt-sets` (a GET route and a POST route) would answer `Allow: POST`."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {m.upper() for m in operations}
    return sorted(methods) or None
