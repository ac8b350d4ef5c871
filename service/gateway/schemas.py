"""Typed request and response models of the gateway's REST API (they document the OpenAPI).

Requests forbid unknown fields: a typo such as ``"scle"`` is a 422, not a silently ignored
setting that changes which reward a training run optimised. Limits that depend on settings
(items per request, prompt length, contrastive prompts per prompt) are checked by the app so
their errors can name the configured limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from textnorm_reward_client.results import REWARD_FIELDS

from service.gateway.calibration import LAMBDA_BOUND, SCALE_BOUND
from service.gateway.prompt_set_registry import PROMPT_SET_ID_PATTERN
from service.gateway.raw_images import RAW_IMAGE_SCHEMA
from service.gateway.request_ids import REQUEST_ID_PATTERN
from service.settings import ITEMS_BOUND

RequestId = Annotated[
    str,
    StringConstraints(pattern=REQUEST_ID_PATTERN),
    Field(description="client request id (1-128 printable ASCII characters, no spaces)"),
]
PromptSetId = Annotated[
    str,
    StringConstraints(pattern=PROMPT_SET_ID_PATTERN),
    Field(description="id of a registered prompt set: ps_ + 32 hex digits of its content hash"),
]
Rule = Literal["auto", "counting", "binding", "composition", "attributes"]
# Every reward field of a result, as the client lists them (one list for both sides).
RewardField = Literal[REWARD_FIELDS]
_BASE64_IMAGE_SCHEMA = {
    "type": "string",
    "description": "base64 PNG, JPEG or WebP (format detected from the content); an optional "
    "`data:image/...;base64,` prefix is accepted",
}


def _image_or_raw(value: Any) -> str | dict[str, Any]:
    """A base64 string or a raw tensor object; the object's keys, dtype, shape and bytes are
    checked where the image is decoded (service/gateway/raw_images.py), naming the field."""
    if isinstance(value, str | dict):
        return value
    raise ValueError(
        'an image is a base64 string or a raw tensor {"shape": [H, W, 3], "dtype": "uint8", '
        '"data": base64}'
    )


Base64Image = Annotated[
    Any,
    AfterValidator(_image_or_raw),
    WithJsonSchema({"anyOf": [_BASE64_IMAGE_SCHEMA, RAW_IMAGE_SCHEMA]}),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests --------------------------------------------------------------------------------------
class TextNormOptions(_Request):
    """TextNorm settings for the request; unset fields take the model's defaults."""

    scale: float | None = Field(
        default=None, gt=0, le=SCALE_BOUND, allow_inf_nan=False, description="TextNorm scale c"
    )
    ensemble_lambda: float | None = Field(
        default=None, ge=0, le=LAMBDA_BOUND, allow_inf_nan=False, description="λ of the ensemble"
    )
    contrastive: list[str] | None = Field(
        default=None, description="explicit contrastive prompts for every item (cleaned per item)"
    )
    prompt_set: PromptSetId | None = Field(
        default=None, description="registered prompt set to use (its prompt must be the item's)"
    )
    rule: Rule = Field(
        default="auto", description="rule that builds contrastive prompts when none are given"
    )
    allow_missing: bool = Field(
        default=False,
        description="when a prompt has no contrastive prompts, answer with null TextNorm "
        "fields instead of a 422",
    )


class ScoreItem(_Request):
    image: Base64Image
    prompt: str = Field(description="the prompt the image was generated for")
    contrastive: list[str] | None = Field(
        default=None, description="this item's contrastive prompts (overrides the request's)"
    )
    prompt_set: PromptSetId | None = Field(
        default=None, description="this item's registered prompt set (overrides the request's)"
    )


# A list past ITEMS_BOUND (the ceiling of settings.max_items_per_request) is refused before its
# elements are validated: two million tiny elements cost one error, not seconds of the event
# loop and gigabytes of error details.


class ScoreRequest(_Request):
    items: list[ScoreItem] = Field(
        min_length=1, max_length=ITEMS_BOUND, description="(image, prompt) pairs to score"
    )
    request_id: RequestId | None = None
    textnorm: TextNormOptions = Field(default_factory=TextNormOptions)


class GroupRequest(_Request):
    prompt: str = Field(description="the one prompt of the group")
    images: list[Base64Image] = Field(
        min_length=1, max_length=ITEMS_BOUND, description="the group's images"
    )
    request_id: RequestId | None = None
    textnorm: TextNormOptions = Field(default_factory=TextNormOptions)
    advantages: bool = Field(
        default=False, description="also return (r - mean) / (std + eps) over the group"
    )
    advantage_of: RewardField = Field(
        default="textnorm", description="the reward the advantages are computed from"
    )
    advantage_eps: float = Field(default=1e-6, gt=0, le=1.0, allow_inf_nan=False)


class PromptSetCreate(_Request):
    """A contrastive set to register; its id is its content hash, the same on every replica."""

    prompt: str
    contrastive: list[str] = Field(min_length=1)
    request_id: RequestId | None = None


# -- responses -------------------------------------------------------------------------------------
class ModelInfo(BaseModel):
    name: str
    source: str
    checkpoint_sha256: str
    embed_dim: int
    image_size: int | None = None


class HeadInfo(BaseModel):
    source: str | None = None
    sha256: str | None = None


class TextNormUsed(BaseModel):
    scale: float | None = Field(
        description="the c every item used — the first model's, in a multi-model export (null "
        "when items used different calibrated values: see each item's textnorm_scale, and "
        "members[k].textnorm_scale for each model's)"
    )
    ensemble_lambda: float | None = Field(
        description="the λ every item used (null when items differ: each item's ensemble_lambda)"
    )
    member_scales: list[float] | None = Field(
        default=None,
        description="multi-model export: each model's c, in members order, when every item used "
        "the same (null otherwise: see members[k].textnorm_scale)",
    )
    ensemble_models_lambda: float | None = Field(
        default=None,
        description="multi-model export: the λ of ensemble_models_uw every item used (null when "
        "items differ: each item's ensemble_models_lambda)",
    )
    max_prompts: int
    rule: Rule | None = None
    allow_missing: bool | None = None
    scale_source: Literal["request", "calibrated", "default", "mixed"] | None = Field(
        default=None,
        description="where the items' c came from: the request, the calibration file "
        "(textnorm_calibration_file), the model's default, or a mix (see each item's "
        "textnorm_scale_source)",
    )
    calibration_sha256: str | None = Field(
        default=None, description="sha256 of the calibration file the gateway loaded, if any"
    )


class TokenizerInfo(BaseModel):
    file: str
    sha256: str
    context_length: int
    pad_id: int
    truncate_long_prompts: bool


class ExporterInfo(BaseModel):
    format: Any = None
    target: str | None = None
    precision: str | None = None
    max_batch: int | None = None
    versions: dict[str, Any] = Field(default_factory=dict)


class Provenance(BaseModel):
    """Which reward this is: enough for a training run to prove what it optimised."""

    model: ModelInfo
    head: HeadInfo | None
    textnorm: TextNormUsed
    tokenizer: TokenizerInfo
    exporter: ExporterInfo
    cache_key: str
    export_sha256: str | None = Field(
        default=None,
        description="content hash of the export that computed this reward (every call names "
        "its model version, model_version, so no other export can answer)",
    )
    model_version: int | None = None
    members: list[ModelInfo] | None = Field(
        default=None,
        description="every model of a multi-model export, the first (`model`) included, in "
        "the order of each item's `members` (null: one model)",
    )
    gateway: dict[str, str]


class MemberReward(BaseModel):
    """One model's rewards for an item, in a multi-model export."""

    name: str = Field(description="the model (provenance.members[k].name)")
    raw: float
    textnorm: float | None
    textnorm_scale: float | None = Field(
        default=None,
        description="the c this model's TextNorm used (a calibration with members gives each "
        "model its own; null without a contrastive set)",
    )


class ItemResult(BaseModel):
    raw: float = Field(description="CLIP reward: cosine of image and prompt embeddings")
    textnorm: float | None = Field(description="P(true prompt) over [prompt] + contrastive")
    head: float | None = Field(default=None, description="learned reward head (if exported)")
    textnorm_head: float | None = None
    ensemble_mean: float | None = None
    ensemble_uw: float | None = None
    members: list[MemberReward] | None = Field(
        default=None,
        description="multi-model export: each model's raw and TextNorm reward, in "
        "provenance.members order (null: one model)",
    )
    ensemble_models_mean: float | None = Field(
        default=None, description="mean of the models' TextNorm probabilities (multi-model)"
    )
    ensemble_models_uw: float | None = Field(
        default=None,
        description="uncertainty-regularised ensemble of the models' TextNorm probabilities: "
        "mean − λ · their variance (multi-model)",
    )
    ensemble_models_lambda: float | None = Field(
        default=None,
        description="the λ of ensemble_models_uw: the request's, else the calibration's "
        "models_lambda, else ensemble_lambda (multi-model)",
    )
    contrastive_count: int
    contrastive_source: Literal["explicit", "prompt_set", "rule", "none"]
    prompt_set: str | None = Field(default=None, description="id of the prompt set used")
    contrastive_sha256: str | None = Field(
        default=None,
        description="sha256 of the prompt set TextNorm used (normalised prompt + contrastive "
        "prompts, canonical JSON): proves which set produced this value",
    )
    export_sha256: str | None = Field(
        default=None,
        description="content hash of the export (model) that computed this item's rewards",
    )
    textnorm_scale: float | None = Field(
        default=None, description="the TextNorm scale c this item was scored with"
    )
    ensemble_lambda: float | None = Field(
        default=None, description="the ensemble λ this item was scored with"
    )
    textnorm_scale_source: Literal["request", "calibrated", "default"] | None = Field(
        default=None,
        description="where this item's c came from: the request, the calibration file, or the "
        "model's default",
    )
    prompt_truncated: bool
    contrastive_truncated: int = Field(
        default=0, description="contrastive prompts truncated to the context length"
    )


class ScoreResponse(BaseModel):
    request_id: str
    results: list[ItemResult]
    provenance: Provenance


class GroupResponse(BaseModel):
    request_id: str
    prompt: str
    results: list[ItemResult]
    advantages: list[float] | None = None
    advantage_of: RewardField | None = None
    reward_mean: float | None = None
    reward_std: float | None = Field(default=None, description="population std (ddof 0)")
    provenance: Provenance


class PromptSetOut(BaseModel):
    id: str
    prompt: str
    contrastive: list[str]
    contrastive_count: int
    source: Literal["registered", "imported", "configured"]


class PromptSetResponse(BaseModel):
    request_id: str
    prompt_set: PromptSetOut
    created: bool
    pre_encoded: bool = Field(description="its embeddings are cached (backend was up)")
    provenance: Provenance


class PromptSetImportResponse(BaseModel):
    request_id: str
    prompt_sets: list[PromptSetOut]
    created: int
    pre_encoded: bool
    provenance: Provenance


class PromptSetList(BaseModel):
    request_id: str
    prompt_sets: list[PromptSetOut]
    provenance: Provenance


class PromptSetGet(BaseModel):
    request_id: str
    prompt_set: PromptSetOut
    provenance: Provenance


class PromptSetDeleted(BaseModel):
    request_id: str
    id: str
    deleted: bool
    provenance: Provenance


class ModelCard(BaseModel):
    name: str
    source: str
    checkpoint_sha256: str
    head: HeadInfo | None
    embed_dim: int
    image_size: int | None
    rewards: list[str]
    textnorm_defaults: dict[str, Any] = Field(
        description="the model's own c (scale) and λ: what an item gets when neither its "
        "request nor the calibration (textnorm_calibrated) sets them"
    )
    textnorm_calibration_sha256: str | None = Field(
        default=None,
        description="sha256 of the TextNorm calibration this gateway serves: "
        "REWARD_TEXTNORM_CALIBRATION_FILE if set, else the one the export bundles",
    )
    textnorm_calibrated: dict[str, dict[str, float | None]] | None = Field(
        default=None,
        description="that calibration's c (scale), λ (ensemble_lambda) and models' λ "
        "(models_lambda) per prompt kind: the served default of a set the auto rule builds "
        "for a prompt of that kind (a registered set may have its own); null without one",
    )
    max_batch: int | None
    cache_key: str
    members: list[ModelInfo] | None = None


class ServiceLimits(BaseModel):
    """The request limits of this gateway (clients chunk and validate by them)."""

    max_items_per_request: int
    max_image_bytes: int = Field(description="bytes per encoded image after base64 decoding")
    max_image_pixels: int = Field(description="width × height per image (encoded or raw)")
    max_image_aspect_ratio: float
    max_request_pixels: int = Field(description="width × height summed over a request")
    max_request_bytes: int = Field(description="HTTP request body size")
    max_prompt_chars: int
    max_contrastive_prompts: int
    image_formats: list[str] = Field(description='accepted image forms, "raw" the tensor form')
    raw_dtypes: list[str] = Field(description="dtypes of the raw tensor form")


class ModelsResponse(BaseModel):
    request_id: str
    models: list[ModelCard]
    limits: ServiceLimits
    provenance: Provenance


class Health(BaseModel):
    status: str
    request_id: str


class Readiness(BaseModel):
    ready: bool
    reason: str | None = Field(
        default=None, description="why not ready: backend down, or serving another export"
    )
    request_id: str


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error name")
    message: str
    field: str | None = Field(default=None, description="offending field, e.g. items[3].image")
    limit: Any = Field(default=None, description="the limit that was exceeded, if any")
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str
