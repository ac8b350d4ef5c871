"""The gateway's FastAPI app: `create_app(settings, backend, provenance)`.

Endpoints (all JSON; /v1 needs a Bearer key when keys are configured):
- `POST /v1/score`: items of (base64 image, prompt) → per item raw, TextNorm (and head rewards)
- `POST /v1/score/group`: one prompt × N images (GRPO/DDPO), optional normalised advantages
- `POST /v1/prompt-sets`, `POST /v1/prompt-sets/import`, `GET /v1/prompt-sets`,
  `GET|DELETE /v1/prompt-sets/{id}`: the contrastive prompt-set registry
- `GET /v1/models`: the served model (from the repository's provenance)
- `GET /healthz` (process alive), `GET /readyz` (backend ready), `GET /metrics` (Prometheus)

Every response carries the request id (body `request_id`, else `X-Request-ID`, else generated)
in its body and its `X-Request-ID` header; every /v1 success carries the provenance block.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response, Security
from fastapi.security import HTTPBearer
from starlette.responses import JSONResponse
from textnorm_reward_client.clip_tokenizer import ClipTokenizer

from service import model_contract as contract
from service.contrastive import (
    NoContrastivePrompts,
    PromptSetFormatError,
    Vocabulary,
    load_prompt_sets,
    load_vocabulary,
    parse_prompt_sets,
)
from service.contrastive.errors import quote_prompt
from service.contrastive.prompt_sets import reject_duplicate_keys
from service.gateway.admission import Admission
from service.gateway.auth import KeyRateLimit, bearer_token, configured_keys
from service.gateway.backend import (
    MAX_CALL_BYTES,
    BackendError,
    BackendUnavailable,
    CallBound,
    GuardedBackend,
    RewardBackendProtocol,
    request_call_slots,
)
from service.gateway.calibration import gateway_calibration, with_scale_sources
from service.gateway.coalescing import CoalescingBackend
from service.gateway.embedding_cache import CacheKey, EmbeddingCache
from service.gateway.errors import ApiError, install_error_handlers
from service.gateway.idempotency import IdempotencyCache
from service.gateway.identity import IdentityCheck
from service.gateway.images import ImageLimits, decode_images, set_pillow_limits
from service.gateway.metrics import GatewayMetrics
from service.gateway.middleware import GatewayMiddleware
from service.gateway.openapi import install_openapi
from service.gateway.prompt_set_registry import (
    PromptSet,
    PromptSetConflict,
    PromptSetRegistry,
    RegistryFull,
)
from service.gateway.provenance import MODEL_ENSEMBLE_REWARDS, ProvenanceInfo
from service.gateway.raw_images import RAW_DTYPES
from service.gateway.request_body import OffloadedJsonRoute, loads_strict, require_json
from service.gateway.request_ids import (
    HEADER,
    adopt_body_request_id,
    current_request_id,
    valid_request_id,
)
from service.gateway.schemas import (
    ErrorResponse,
    GroupRequest,
    GroupResponse,
    Health,
    ModelsResponse,
    PromptSetCreate,
    PromptSetDeleted,
    PromptSetGet,
    PromptSetImportResponse,
    PromptSetList,
    PromptSetOut,
    PromptSetResponse,
    Readiness,
    ScoreRequest,
    ScoreResponse,
    ServiceLimits,
)
from service.gateway.scoring import PlannedItem, Scorer, ScoringModel, cut_to_the_prompt
from service.settings import Settings

log = logging.getLogger("service.gateway")
_Response = TypeVar("_Response")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in {
        400: "malformed JSON or request",
        401: "missing or invalid API key",
        413: "request, image bytes or image pixels (per image or per request) over a limit",
        415: "image not PNG, JPEG or WebP",
        422: "invalid request or a limit exceeded (the field and limit are named)",
        429: "a limit on work in flight is full, retry after Retry-After seconds",
        502: "the reward backend failed",
        503: "the reward backend is unavailable (see Retry-After)",
        504: "the reward backend did not answer in time (see Retry-After)",
    }.items()
}
_CONFLICT = {409: {"model": ErrorResponse, "description": "request_id re-used with another body"}}
_IMPORT_SCHEMA = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": 'the TextNorm authors\' format: {"prompt": ["contrastive", ...]}',
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
            }
        }
    },
}


@dataclass
class GatewayState:
    """Everything the routes share, on `app.state.gateway` (tests and the launcher read it)."""

    settings: Settings
    backend: GuardedBackend
    provenance: ProvenanceInfo
    tokenizer: ClipTokenizer
    cache: EmbeddingCache
    registry: PromptSetRegistry
    metrics: GatewayMetrics
    scorer: Scorer
    image_limits: ImageLimits
    admission: Admission | None = None  # the shared budgets of scoring requests
    idempotency: IdempotencyCache | None = None  # responses by request_id
    pool: ThreadPoolExecutor | None = None  # JSON parsing and image decoding (while serving)


def tokenizer_path(settings: Settings, provenance: dict[str, Any]) -> Path:
    if settings.tokenizer_file:
        return Path(settings.tokenizer_file)
    return Path(str(provenance["model"]["source"])).expanduser() / "tokenizer.json"


def _vocabulary(settings: Settings) -> Vocabulary | None:
    if not settings.contrastive_vocabulary_file:
        return None
    try:
        return load_vocabulary(settings.contrastive_vocabulary_file)
    except OSError as exc:
        raise ValueError(f"cannot read the contrastive vocabulary: {exc}") from None


def guarded_backend(
    backend: RewardBackendProtocol,
    settings: Settings,
    *,
    identity: IdentityCheck,
    max_batch: int,
    embed_dim: int,
    metrics: GatewayMetrics,
    calls: CallBound,
    member: bool = False,
) -> GuardedBackend:
    """One model's backend as the gateway calls it: the guard rails, then the merging of
    concurrent requests' calls, which takes a slot of `calls` (the bound on calls out at once,
    shared by every model of the export) for each call it sends, then the backend. Waiting to
    be merged takes no slot."""
    merged = CoalescingBackend(
        backend,
        max_rows=max_batch,
        max_bytes=MAX_CALL_BYTES,
        max_in_flight=settings.merged_calls_in_flight,
        timeout_s=settings.backend_timeout_s,
        metrics=metrics,
        bound=calls,
    )
    return GuardedBackend(
        merged,
        identity=identity,
        identity_interval_s=settings.identity_check_interval_s,
        timeout_s=settings.backend_timeout_s,
        max_batch=max_batch,
        embed_dim=embed_dim,
        metrics=metrics,
        member=member,
    )


def create_app(
    settings: Settings,
    backend: RewardBackendProtocol,
    provenance: dict[str, Any],
    *,
    members: Sequence[RewardBackendProtocol] = (),
    close_backend_on_shutdown: bool = False,
) -> FastAPI:
    """The gateway app for one exported model (`provenance`: its provenance.json, parsed);
    `members`: a multi-model export's further models, one backend each, in provenance order.

    Raises ValueError (one line) when the tokenizer cannot be found or loaded, or `members`
    does not match the export's.
    """
    path = tokenizer_path(settings, provenance)
    if not path.is_file():
        raise ValueError(
            f"tokenizer.json not found at {path}: set REWARD_TOKENIZER_FILE to the exported "
            "model's tokenizer.json"
        )
    tokenizer = ClipTokenizer(path)
    exported = (provenance.get("artifacts") or {}).get("tokenizer.json")
    if exported and tokenizer.sha256 != exported:
        raise ValueError(
            f"{path} (sha256 {tokenizer.sha256[:16]}…) is not the tokenizer the export ships "
            f"(sha256 {exported[:16]}…): other token ids would give wrong rewards"
        )
    info = ProvenanceInfo(provenance, tokenizer, settings.truncate_long_prompts)
    metrics = GatewayMetrics()
    max_batch = info.max_batch or 64
    calls = CallBound(settings.max_backend_calls, metrics)  # one bound for every model
    guarded = guarded_backend(
        backend,
        settings,
        identity=IdentityCheck.from_provenance(provenance),
        max_batch=max_batch,
        embed_dim=info.embed_dim,
        metrics=metrics,
        calls=calls,
    )
    if len(members) != len(info.members):
        raise ValueError(
            f"the export has {len(info.members)} further ensemble member(s), the gateway was "
            f"given {len(members)} backend(s) for them"
        )
    expected = [
        contract.MEMBER_ROLES,
        *(tuple(n[r] for r in contract.MEMBER_ROLES) for _, n in info.members),
    ]
    for k, (each, names) in enumerate(zip((backend, *members), expected, strict=True)):
        called = getattr(each, "models", None)  # backends that say which models they call
        if called is not None and tuple(called) != names:
            raise ValueError(
                f"the backend of model {k} calls {', '.join(called)}, the export names "
                f"{', '.join(names)} for it: a reward would be computed by another model"
            )
    scoring_members = [
        ScoringModel(
            model.name,
            model.checkpoint_sha256,
            model.embed_dim,
            guarded_backend(
                member,
                settings,
                identity=IdentityCheck(guarded.identity.expected, tuple(names.values())),
                max_batch=max_batch,
                embed_dim=model.embed_dim,
                metrics=metrics,
                calls=calls,
                member=True,
            ),
        )
        for member, (model, names) in zip(members, info.members, strict=True)
    ]
    cache = EmbeddingCache(settings.embedding_cache_entries)
    registry = PromptSetRegistry(settings.max_prompt_sets)
    limits = ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        max_aspect_ratio=settings.max_image_aspect_ratio,
        max_request_pixels=settings.max_request_pixels,
    )
    set_pillow_limits(limits)
    scorer = Scorer(
        backend=guarded,
        tokenizer=tokenizer,
        cache=cache,
        registry=registry,
        metrics=metrics,
        provenance=info,
        max_prompt_chars=settings.max_prompt_chars,
        max_contrastive=settings.max_contrastive_prompts,
        truncate_long_prompts=settings.truncate_long_prompts,
        vocabulary=_vocabulary(settings),
        token_bucket=settings.text_token_bucket,
        calibration=gateway_calibration(
            settings.textnorm_calibration_file, info.checkpoint_sha256, provenance
        ),
        members=scoring_members,
    )
    info.calibration = scorer.calibration  # every response's provenance names it
    state = GatewayState(
        settings, guarded, info, tokenizer, cache, registry, metrics, scorer, limits
    )
    state.admission = Admission.from_settings(settings, metrics)
    state.idempotency = IdempotencyCache(settings.idempotency_cache_entries, metrics)
    configured: list[str] = []
    if settings.prompt_sets_file:
        configured = _load_configured_sets(state, Path(settings.prompt_sets_file))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        ready, reason = await _readiness(state)  # at start: is it the export we name?
        if ready:
            log.info("backend ready, serving export %s", guarded.identity.expected)
            await _pre_encode(state, configured)
        else:
            log.warning("backend not ready: %s", reason)
        yield
        pool, state.pool = state.pool, None
        pool.shutdown(wait=False)  # queued work finishes: cancelled, its requests were 500s
        if close_backend_on_shutdown:
            for each in (backend, *members):
                await each.close()

    app = FastAPI(
        title="TextNorm reward gateway",
        version="1",
        summary="CLIP rewards calibrated with TextNorm, for online RL of text-to-image models",
        lifespan=lifespan,
        docs_url="/docs" if settings.expose_docs else None,  # expose_docs: /docs, /redoc and
        redoc_url="/redoc" if settings.expose_docs else None,  # /openapi.json, or all 404
        openapi_url="/openapi.json" if settings.expose_docs else None,
    )
    install_openapi(app, settings)  # the exact document: service/gateway/openapi.py
    app.state.gateway = state
    install_error_handlers(app, settings.retry_after_s, metrics)
    labelled_routes: list = []  # route templates for metric labels, filled below
    app.add_middleware(KeyRateLimit, settings=settings, metrics=metrics)  # inside the auth check
    app.add_middleware(
        GatewayMiddleware,
        routes=labelled_routes,
        metrics=metrics,
        keys=configured_keys(settings.api_keys),
        max_request_bytes=settings.max_request_bytes,
        admission=state.admission,
        body_read_timeout_s=settings.body_read_timeout_s,
        body_total_timeout_s=settings.body_total_timeout_s,
    )
    v1 = APIRouter(
        prefix="/v1",
        dependencies=[Security(HTTPBearer(auto_error=False, description="an API key"))],
        responses=_ERRORS,
        route_class=OffloadedJsonRoute,  # JSON bodies parsed off the event loop
    )
    _score_routes(v1, state)
    _prompt_set_routes(v1, state)

    @v1.get("/models", response_model=ModelsResponse, tags=["models"])
    async def models(request: Request) -> ModelsResponse:
        """The served model: name, checkpoint sha256, head, embedding size, TextNorm defaults
        and the calibrated c per prompt kind."""
        return ModelsResponse(
            request_id=current_request_id(request),
            models=[info.model_card()],
            limits=_service_limits(state),
            provenance=info.block(),
        )

    app.include_router(v1)
    # Not a duplicate: the app's router holds v1 as one included-router entry (no path_regex),
    # so v1's routes are labelled from v1 itself and the app's own routes (ops, docs) below.
    labelled_routes += v1.routes
    _ops_routes(app, state)
    labelled_routes += [r for r in app.router.routes if hasattr(r, "path_regex")]
    return app


# -- scoring ---------------------------------------------------------------------------------------
async def _decode_all(
    state: GatewayState, request: Request, images: list[tuple[str | dict, str]]
) -> list[np.ndarray]:
    """Decode in the worker pool, within the request's admission: its images first, then each
    image's decoded bytes from its header (429 when a budget is full)."""
    ticket = getattr(request.state, "admission", None)
    reserve = None
    if ticket is not None:
        ticket.reserve("images", len(images))

        def reserve(nbytes: int) -> None:
            ticket.reserve("decoded_bytes", nbytes)

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        state.pool, decode_images, images, state.image_limits, reserve
    )


async def _idempotent(
    state: GatewayState,
    request: Request,
    endpoint: str,
    body_id: str | None,
    compute: Callable[[], Awaitable[_Response]],
) -> _Response:
    """`compute()` once per client request id and body (service/gateway/idempotency.py),
    with the request's bound on backend calls in flight."""
    client_id = body_id or valid_request_id(request.headers.get(HEADER))
    digest = getattr(request.state, "body_sha256", None) or ""
    token = bearer_token(request.headers.get("authorization")) if state.settings.api_keys else None
    tenant = hashlib.sha256(token.encode("utf-8")).hexdigest() if token else ""
    assert state.idempotency is not None
    with request_call_slots(state.settings.max_backend_calls_per_request):
        return await state.idempotency.run(endpoint, client_id, digest, compute, tenant)


def _service_limits(state: GatewayState) -> ServiceLimits:
    s = state.settings
    return ServiceLimits(
        max_items_per_request=s.max_items_per_request,
        max_image_bytes=s.max_image_bytes,
        max_image_pixels=s.max_image_pixels,
        max_image_aspect_ratio=s.max_image_aspect_ratio,
        max_request_pixels=s.max_request_pixels,
        max_request_bytes=s.max_request_bytes,
        max_prompt_chars=s.max_prompt_chars,
        max_contrastive_prompts=state.scorer.max_contrastive,
        image_formats=["png", "jpeg", "webp", "raw"],
        raw_dtypes=list(RAW_DTYPES),
    )


def _check_count(n: int, limit: int, field: str, what: str) -> None:
    if n > limit:
        raise ApiError(
            422,
            "too_many_items",
            f"{field}: {n} {what}, over the limit of {limit} per request",
            field=field,
            limit=limit,
        )


def _settings_used(state: GatewayState, options) -> tuple[float | None, float | None]:
    """The request's c and λ; None where it sets none: each item then takes its calibrated
    value or the model's default (service/gateway/calibration.py, Scorer.score)."""
    scale = None if options.scale is None else float(options.scale)
    lam = None if options.ensemble_lambda is None else float(options.ensemble_lambda)
    return scale, lam


def _score_routes(router: APIRouter, state: GatewayState) -> None:
    scorer = state.scorer

    @router.post("/score", response_model=ScoreResponse, tags=["scoring"], responses=_CONFLICT)
    async def score(request: Request, body: ScoreRequest) -> ScoreResponse:
        """Score (image, prompt) items: raw CLIP reward and TextNorm, in item order. An image
        is base64 PNG/JPEG/WebP or a raw tensor {shape: [H, W, 3], dtype: uint8, data}."""
        rid = adopt_body_request_id(request, body.request_id)
        return await _idempotent(
            state, request, "/v1/score", body.request_id, lambda: _score(request, body, rid)
        )

    async def _score(request: Request, body: ScoreRequest, rid: str) -> ScoreResponse:
        _check_count(len(body.items), state.settings.max_items_per_request, "items", "items")
        options = body.textnorm
        planned = []
        for i, item in enumerate(body.items):
            prompt_field = f"items[{i}].prompt"
            scorer.check_prompt(item.prompt, prompt_field)
            plan = scorer.plan_contrastive(
                item.prompt, prompt_field, options, f"items[{i}]", item.contrastive, item.prompt_set
            )
            planned.append(PlannedItem(item.prompt, plan, prompt_field, f"items[{i}].image"))
        text_plan = scorer.plan_texts(planned)
        images = await _decode_all(
            state,
            request,
            [(item.image, p.image_field) for item, p in zip(body.items, planned, strict=True)],
        )
        scale, lam = _settings_used(state, options)
        results = await scorer.score(planned, text_plan, images, scale, lam)
        state.metrics.images_scored.labels("/v1/score").inc(len(images))
        return ScoreResponse(
            request_id=rid,
            results=results,
            provenance=with_scale_sources(
                state.provenance.block(scale, lam, options.rule, options.allow_missing),
                results,
            ),
        )

    @router.post(
        "/score/group", response_model=GroupResponse, tags=["scoring"], responses=_CONFLICT
    )
    async def score_group(request: Request, body: GroupRequest) -> GroupResponse:
        """One prompt × N images (a GRPO/DDPO group): one text encode, optional advantages
        (r − mean) / (std + eps) of `advantage_of` over the group (population std)."""
        rid = adopt_body_request_id(request, body.request_id)
        return await _idempotent(
            state, request, "/v1/score/group", body.request_id, lambda: _group(request, body, rid)
        )

    async def _group(request: Request, body: GroupRequest, rid: str) -> GroupResponse:
        _check_count(len(body.images), state.settings.max_items_per_request, "images", "images")
        options = body.textnorm
        scorer.check_prompt(body.prompt, "prompt")
        plan = scorer.plan_contrastive(body.prompt, "prompt", options)
        if body.advantages:
            _check_advantage_field(state, body.advantage_of, bool(plan.prompts))
        planned = [
            PlannedItem(body.prompt, plan, "prompt", f"images[{i}]")
            for i in range(len(body.images))
        ]
        text_plan = scorer.plan_texts(planned)
        images = await _decode_all(
            state, request, [(b, f"images[{i}]") for i, b in enumerate(body.images)]
        )
        scale, lam = _settings_used(state, options)
        results = await scorer.score(planned, text_plan, images, scale, lam)
        state.metrics.images_scored.labels("/v1/score/group").inc(len(images))
        response = GroupResponse(
            request_id=rid,
            prompt=body.prompt,
            results=results,
            provenance=with_scale_sources(
                state.provenance.block(scale, lam, options.rule, options.allow_missing),
                results,
            ),
        )
        if body.advantages:
            values = np.array([getattr(r, body.advantage_of) for r in results], np.float64)
            mean, std = float(values.mean()), float(values.std())
            response.advantages = ((values - mean) / (std + body.advantage_eps)).tolist()
            response.advantage_of = body.advantage_of
            response.reward_mean, response.reward_std = mean, std
        return response


async def _readiness(state: GatewayState) -> tuple[bool, str | None]:
    """Every model of the export ready and the one provenance names (checked concurrently)."""
    answers = await asyncio.gather(*(m.backend.readiness() for m in state.scorer.models))
    return next(((False, why) for ready, why in answers if not ready), (True, None))


def _check_advantage_field(state: GatewayState, field: str, has_contrastive: bool) -> None:
    if field in MODEL_ENSEMBLE_REWARDS and not state.provenance.members:
        raise ApiError(
            422,
            "advantage_unavailable",
            f"advantage_of: {field!r} needs a multi-model export (REWARD_MEMBERS), and this "
            "one has a single model",
            field="advantage_of",
        )
    if field in ("head", "textnorm_head", "ensemble_mean", "ensemble_uw") and (
        not state.provenance.has_head
    ):
        raise ApiError(
            422,
            "advantage_unavailable",
            f"advantage_of: {field!r} needs a learned reward head, and this model has none",
            field="advantage_of",
        )
    if field != "raw" and field != "head" and not has_contrastive:
        raise ApiError(
            422,
            "advantage_unavailable",
            f"advantage_of: {field!r} is null without contrastive prompts (allow_missing)",
            field="advantage_of",
        )


# -- prompt sets -----------------------------------------------------------------------------------
def _out(prompt_set: PromptSet) -> PromptSetOut:
    return PromptSetOut(
        id=prompt_set.id,
        prompt=prompt_set.prompt,
        contrastive=list(prompt_set.contrastive),
        contrastive_count=len(prompt_set.contrastive),
        source=prompt_set.source,  # type: ignore[arg-type]
    )


def _validated_set(
    state: GatewayState, prompt: str, contrastive: list[str], prompt_field: str, set_field: str
) -> tuple[str, ...]:
    """The cleaned contrastive set of `prompt`; ApiError naming the field when it is unusable."""
    scorer = state.scorer
    scorer.check_prompt(prompt, prompt_field)
    scorer.check_contrastive_list(contrastive, set_field)
    try:
        cleaned = PromptSetRegistry.clean(prompt, contrastive)
    except NoContrastivePrompts as exc:
        raise ApiError(
            422, "no_contrastive_prompts", f"{set_field}: {exc}", field=set_field
        ) from None
    tokenized = state.tokenizer.encode([prompt, *cleaned])
    if tokenized.truncated.any() and state.settings.truncate_long_prompts:
        # as scoring does: kept, they would be dropped there, and the set's id, hash and
        # calibrated c would name prompts that are never used
        first = tokenized.distinct(list(range(len(cleaned) + 1)))
        if len(first) == 1:
            raise cut_to_the_prompt(set_field, prompt, state.tokenizer.context_length)
        cleaned = tuple(cleaned[j - 1] for j in first[1:])
    if tokenized.truncated.any() and not state.settings.truncate_long_prompts:
        j = int(np.argmax(tokenized.truncated))
        where = prompt_field if j == 0 else set_field
        raise ApiError(
            422,
            "prompt_too_long",
            f"{where}: {quote_prompt(([prompt, *cleaned])[j])} has "
            f"{int(tokenized.lengths[j])} tokens, over CLIP's "
            f"{state.tokenizer.context_length}-token context",
            field=where,
            limit=state.tokenizer.context_length,
        )
    return cleaned


def _add_sets(
    state: GatewayState,
    sets: list[PromptSet],
    cache_keys: Mapping[str, list[CacheKey]] | None = None,
) -> list[str]:
    """Add `sets` to the registry, pin their prompts in the cache (`cache_keys`: each set's,
    by id, when already computed); the texts to pre-encode."""
    texts: list[str] = []
    for prompt_set in sets:
        state.registry.add(prompt_set)
        keys = cache_keys[prompt_set.id] if cache_keys else state.scorer.set_cache_keys(prompt_set)
        for key in keys:
            state.cache.pin(key)
        texts += [prompt_set.prompt, *prompt_set.contrastive]
    return texts


async def _pre_encode(state: GatewayState, texts: list[str]) -> bool:
    """Encode and cache `texts` now if the backend is up (else the first use encodes them)."""
    if not texts:
        return True
    try:
        await state.scorer.pre_encode(texts)
    except (BackendUnavailable, BackendError) as exc:
        log.warning("prompt sets registered without pre-encoding: %s", exc)
        return False
    return True


def _load_configured_sets(state: GatewayState, path: Path) -> list[str]:
    """The operator's prompt sets (`REWARD_PROMPT_SETS_FILE`), added at start on every replica:
    they apply to their prompts without an id. ValueError (one line) for a bad file."""
    try:
        sets = load_prompt_sets(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read prompt sets {path}: {exc}") from None
    prepared = []
    for prompt, contrastive in sets.items():
        where = f"{path}[{json.dumps(prompt, ensure_ascii=False)}]"
        try:
            cleaned = _validated_set(state, prompt, contrastive, where, where)
            prompt_set, _ = state.registry.prepare(prompt, cleaned, "configured", len(prepared))
        except ApiError as exc:
            raise ValueError(exc.message) from None
        prepared.append(prompt_set)
    log.info("loaded %d configured prompt sets from %s", len(prepared), path)
    return _add_sets(state, prepared)


def _prompt_set_routes(router: APIRouter, state: GatewayState) -> None:
    scorer, registry = state.scorer, state.registry

    def validated(prompt: str, contrastive: list[str], prompt_field: str, set_field: str):
        return _validated_set(state, prompt, contrastive, prompt_field, set_field)

    async def register(
        sets: list[PromptSet], cache_keys: Mapping[str, list[CacheKey]] | None = None
    ) -> bool:
        return await _pre_encode(state, _add_sets(state, sets, cache_keys))

    @router.post(
        "/prompt-sets",
        response_model=PromptSetResponse,
        status_code=201,
        tags=["prompt sets"],
        responses={409: {"model": ErrorResponse, "description": "content-hash id collision"}},
    )
    async def create_prompt_set(
        request: Request, response: Response, body: PromptSetCreate
    ) -> PromptSetResponse:
        """Register a contrastive set for a prompt under its content-hash id (the same on every
        replica); its embeddings are encoded now when the backend is up, and kept cached. It
        applies where a request names its id."""
        rid = adopt_body_request_id(request, body.request_id)
        cleaned = validated(body.prompt, body.contrastive, "prompt", "contrastive")
        try:
            prompt_set, created = registry.prepare(body.prompt, cleaned, "registered")
        except PromptSetConflict as exc:
            raise ApiError(409, "prompt_set_conflict", str(exc), field="contrastive") from None
        except RegistryFull as exc:
            raise ApiError(
                422, "registry_full", str(exc), field="contrastive", limit=registry.max_sets
            ) from None
        if created:
            pre_encoded = await register([prompt_set])
        else:
            response.status_code = 200
            pre_encoded = all(k in state.cache for k in scorer.set_cache_keys(prompt_set))
        return PromptSetResponse(
            request_id=rid,
            prompt_set=_out(prompt_set),
            created=created,
            pre_encoded=pre_encoded,
            provenance=state.provenance.block(),
        )

    def valid_import(raw: bytes) -> list[tuple[str, str, tuple[str, ...], list[CacheKey]]]:
        """(field, prompt, cleaned set, its cache keys) of each set of an import body; ApiError
        on the first invalid one. Thread-safe: it reads only the settings and the tokenizer."""
        try:  # malformed JSON: ApiError 400; a repeated prompt: PromptSetFormatError, 422
            data = loads_strict(raw, reject_duplicate_keys)
            if isinstance(data, dict) and len(data) > registry.max_sets:  # before validating
                raise registry_full(len(data))
            sets = parse_prompt_sets(data)
        except PromptSetFormatError as exc:
            raise ApiError(422, "invalid_prompt_sets", str(exc), field="body") from None
        candidates = []
        for prompt, contrastive in sets.items():
            where = f"[{json.dumps(prompt, ensure_ascii=False)}]"
            cleaned = validated(prompt, contrastive, where, where)
            candidates.append((where, prompt, cleaned, scorer.cache_keys(prompt, cleaned)))
        return candidates

    def registry_full(count: int) -> ApiError:
        return ApiError(
            422,
            "registry_full",
            f"importing {count} sets would exceed the registry's {registry.max_sets} prompt sets",
            field="body",
            limit=registry.max_sets,
        )

    @router.post(
        "/prompt-sets/import",
        response_model=PromptSetImportResponse,
        tags=["prompt sets"],
        openapi_extra={"requestBody": _IMPORT_SCHEMA},
        responses={409: {"model": ErrorResponse, "description": "a content-hash id is taken"}},
    )
    async def import_prompt_sets(request: Request) -> PromptSetImportResponse:
        """Import the TextNorm authors' JSON (`{"prompt": ["contrastive", ...], ...}`) as the
        request body: all sets or none; each gets a content-hash id."""
        rid = current_request_id(request)
        require_json(request)  # as every other body (this route reads its own)
        raw = await request.body()
        # Parsing and validating 10,000 sets takes seconds: a worker thread does it, so the
        # event loop goes on answering (it touches neither the registry nor the cache).
        candidates = await asyncio.get_running_loop().run_in_executor(state.pool, valid_import, raw)
        prepared: list[PromptSet] = []
        new: list[PromptSet] = []
        cache_keys: dict[str, list[CacheKey]] = {}
        for where, prompt, cleaned, keys in candidates:
            try:
                prompt_set, created = registry.prepare(
                    prompt, cleaned, "imported", pending=len(new)
                )
            except PromptSetConflict as exc:
                raise ApiError(409, "prompt_set_conflict", f"{where}: {exc}", field=where) from None
            except RegistryFull:
                raise registry_full(len(candidates)) from None
            if created:
                new.append(prompt_set)
            prepared.append(prompt_set)
            cache_keys[prompt_set.id] = keys
        pre_encoded = await register(new, cache_keys)
        if not new:
            pre_encoded = all(k in state.cache for keys in cache_keys.values() for k in keys)
        return PromptSetImportResponse(
            request_id=rid,
            prompt_sets=[_out(s) for s in prepared],
            created=len(new),
            pre_encoded=pre_encoded,
            provenance=state.provenance.block(),
        )

    @router.get("/prompt-sets", response_model=PromptSetList, tags=["prompt sets"])
    async def list_prompt_sets(request: Request) -> PromptSetList:
        """Every registered set, oldest first."""
        return PromptSetList(
            request_id=current_request_id(request),
            prompt_sets=[_out(s) for s in registry.all()],
            provenance=state.provenance.block(),
        )

    def lookup(set_id: str) -> PromptSet:
        found = registry.get(set_id)
        if found is None:
            raise ApiError(
                404, "prompt_set_not_found", f"no prompt set with id {set_id!r}", field="id"
            )
        return found

    @router.get(
        "/prompt-sets/{set_id}",
        response_model=PromptSetGet,
        tags=["prompt sets"],
        responses={404: {"model": ErrorResponse, "description": "no such prompt set"}},
    )
    async def get_prompt_set(request: Request, set_id: str) -> PromptSetGet:
        return PromptSetGet(
            request_id=current_request_id(request),
            prompt_set=_out(lookup(set_id)),
            provenance=state.provenance.block(),
        )

    @router.delete(
        "/prompt-sets/{set_id}",
        response_model=PromptSetDeleted,
        tags=["prompt sets"],
        responses={
            404: {"model": ErrorResponse, "description": "no such prompt set"},
            409: {"model": ErrorResponse, "description": "a set from the server's file"},
        },
    )
    async def delete_prompt_set(request: Request, set_id: str) -> PromptSetDeleted:
        """Remove a set; its embeddings become ordinary (evictable) cache entries. A set the
        operator configured (REWARD_PROMPT_SETS_FILE) is not the API's to remove: 409."""
        found = lookup(set_id)
        if found.source == "configured":
            raise ApiError(
                409,
                "prompt_set_configured",
                f"prompt set {set_id!r} comes from the server's prompt-sets file; remove it "
                "there (every replica loads it at start)",
                field="id",
            )
        registry.remove(set_id)
        for key in scorer.set_cache_keys(found):
            state.cache.unpin(key)
        return PromptSetDeleted(
            request_id=current_request_id(request),
            id=set_id,
            deleted=True,
            provenance=state.provenance.block(),
        )


# -- operations ------------------------------------------------------------------------------------
def _ops_routes(app: FastAPI, state: GatewayState) -> None:
    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz(request: Request) -> Health:
        """The process is alive (says nothing about the backend)."""
        return Health(status="ok", request_id=current_request_id(request))

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["operations"],
        responses={503: {"model": Readiness, "description": "the backend is not ready"}},
    )
    async def readyz(request: Request):
        """200 when the backend is ready to score and serves the export this gateway's
        provenance names (checked anew), else 503 with Retry-After and the reason."""
        ready, reason = await _readiness(state)
        body = Readiness(ready=ready, reason=reason, request_id=current_request_id(request))
        if ready:
            return body
        return JSONResponse(
            body.model_dump(),
            status_code=503,
            headers={"Retry-After": str(state.settings.retry_after_s)},
        )

    async def metrics() -> Response:
        """Prometheus metrics of this gateway."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    if state.settings.expose_metrics:  # else /metrics is a 404
        app.get(
            "/metrics",
            tags=["operations"],
            response_class=Response,
            responses={
                200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}
            },
        )(metrics)
