"""Typed results and limits, parsed from the service's JSON (shared by every client).

`ScoreResult` and `GroupResult` are the response's JSON object itself (a dict, as version 0.2
returned: `result["results"]`, `json.dumps(result)` keep working) with typed attributes on top:
`results` (one `ItemResult` per item, in item order), `provenance`, `request_id`, and
`rewards("textnorm")`, a float64 numpy array in item order (NaN where a reward is null; numpy
is imported only when this is called).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from textnorm_reward_client.errors import client_error

if TYPE_CHECKING:
    import numpy as np

REWARD_FIELDS = (
    "raw",
    "textnorm",
    "head",
    "textnorm_head",
    "ensemble_mean",
    "ensemble_uw",
    "ensemble_models_mean",  # a multi-model export: the models' TextNorm ensembles
    "ensemble_models_uw",
)


@dataclass(frozen=True)
class MemberReward:
    """One model's rewards for an item, from a multi-model export (`ItemResult.members`)."""

    name: str
    raw: float
    textnorm: float | None = None
    textnorm_scale: float | None = None  # the c this model's TextNorm used

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> MemberReward:
        return cls(
            name=item["name"],
            raw=item["raw"],
            textnorm=item.get("textnorm"),
            textnorm_scale=item.get("textnorm_scale"),
        )


@dataclass(frozen=True)
class ItemResult:
    """One item's rewards (None where the model or the request has no such reward)."""

    raw: float
    textnorm: float | None = None
    head: float | None = None
    textnorm_head: float | None = None
    ensemble_mean: float | None = None
    ensemble_uw: float | None = None
    contrastive_count: int = 0
    contrastive_source: str | None = None
    prompt_set: str | None = None
    contrastive_sha256: str | None = None
    prompt_truncated: bool = False
    contrastive_truncated: int = 0
    # the TextNorm c and ensemble λ this item used, where c came from ("request" |
    # "calibrated" | "default"), and the export that scored it
    textnorm_scale: float | None = None
    ensemble_lambda: float | None = None
    textnorm_scale_source: str | None = None
    export_sha256: str | None = None
    # a multi-model export: each model's rewards, and the ensembles of their TextNorm
    members: list[MemberReward] | None = None
    ensemble_models_mean: float | None = None
    ensemble_models_uw: float | None = None
    ensemble_models_lambda: float | None = None  # the λ of ensemble_models_uw
    extra: dict[str, Any] = field(default_factory=dict)  # fields this client does not know

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> ItemResult:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in item.items() if k in known}
        if values.get("members") is not None:
            values["members"] = [MemberReward.from_json(m) for m in values["members"]]
        return cls(**values, extra={k: v for k, v in item.items() if k not in known})

    def reward(self, name: str) -> float | None:
        if name not in REWARD_FIELDS:
            raise ValueError(f"unknown reward {name!r}: one of {', '.join(REWARD_FIELDS)}")
        return getattr(self, name)


@dataclass(eq=False, repr=False)
class ScoreResult(dict):
    """A /v1/score answer (several chunks' answers merged, for a chunked call)."""

    results: list[ItemResult]
    provenance: dict[str, Any]
    request_id: str
    raw_response: dict[str, Any]
    chunk_request_ids: list[str] = field(default_factory=list)  # one per request sent

    def __post_init__(self) -> None:
        dict.update(self, self.raw_response)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.results)} items, request_id={self.request_id!r})"

    def rewards(self, name: str = "textnorm") -> np.ndarray:
        """One reward per item, in item order, as float64 (NaN where null)."""
        import numpy as np

        values = [r.reward(name) for r in self.results]
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)

    @classmethod
    def from_json(cls, payload: dict[str, Any], chunk_ids: list[str] | None = None) -> ScoreResult:
        return cls(
            results=[ItemResult.from_json(r) for r in payload["results"]],
            provenance=payload.get("provenance") or {},
            request_id=payload.get("request_id", ""),
            raw_response=payload,
            chunk_request_ids=chunk_ids or [payload.get("request_id", "")],
        )


@dataclass(eq=False, repr=False)
class GroupResult(ScoreResult):
    """A /v1/score/group answer: one prompt × N images, with the group's advantages."""

    prompt: str = ""
    advantages: list[float] | None = None
    advantage_of: str | None = None
    reward_mean: float | None = None
    reward_std: float | None = None
    advantages_computed_by: str = "service"  # "client" when the group was split into chunks

    def advantage_array(self) -> np.ndarray:
        import numpy as np

        if self.advantages is None:
            raise ValueError("no advantages: call score_group(..., advantages=True)")
        return np.asarray(self.advantages, dtype=np.float64)

    @classmethod
    def from_json(cls, payload: dict[str, Any], chunk_ids: list[str] | None = None) -> GroupResult:
        base = ScoreResult.from_json(payload, chunk_ids)
        return cls(
            **{f.name: getattr(base, f.name) for f in fields(ScoreResult)},
            prompt=payload.get("prompt", ""),
            advantages=payload.get("advantages"),
            advantage_of=payload.get("advantage_of"),
            reward_mean=payload.get("reward_mean"),
            reward_std=payload.get("reward_std"),
            advantages_computed_by=payload.get("advantages_computed_by", "service"),
        )


def check_advantage_eps(eps: float) -> float:
    """`eps` as the service takes it: 0 < eps ≤ 1 (a group whose rewards are all equal has
    std 0, and 0 / 0 is no advantage)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps <= 1:
        raise ValueError(f"advantage_eps must be a number in (0, 1], got {eps!r}")
    return float(eps)


def group_advantages(values: list[float | None], eps: float, name: str) -> dict[str, Any]:
    """The service's formula: (r − mean) / (std + eps) over the group, population std (ddof 0).

    Plain Python (no numpy), so the merged answer of a chunked group has exactly the fields of
    an unchunked one."""
    if any(v is None for v in values):
        raise client_error(
            "advantage_unavailable",
            f"advantage_of: {name!r} is null for some images (no head, or no contrastive set)",
        )
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
    return {
        "advantages": [(v - mean) / (std + eps) for v in values],
        "advantage_of": name,
        "reward_mean": mean,
        "reward_std": std,
    }


@dataclass(frozen=True)
class ServiceLimits:
    """The service's request limits (`limits` of GET /v1/models; contract item 2).

    An older service without the block: `fallback()`, 64 items per request, PNG only."""

    max_items_per_request: int = 64
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None
    max_image_aspect_ratio: float | None = None
    max_request_pixels: int | None = None
    max_request_bytes: int | None = None
    max_prompt_chars: int | None = None
    max_contrastive_prompts: int | None = None
    image_formats: tuple[str, ...] = ("png", "jpeg", "webp")
    raw_dtypes: tuple[str, ...] = ()
    image_size: int | None = None  # the model's input size (models[0].image_size)
    from_service: bool = False  # False: the service sent no `limits` (the fallback is in use)

    @property
    def accepts_raw(self) -> bool:
        return "raw" in self.image_formats and "uint8" in self.raw_dtypes

    @classmethod
    def from_models(cls, payload: dict[str, Any]) -> ServiceLimits:
        models = payload.get("models") or [{}]
        size = models[0].get("image_size")
        block = payload.get("limits")
        if not isinstance(block, dict):
            return cls(image_size=size)
        known = {f.name for f in fields(cls)} - {"image_size", "from_service"}
        values = {k: v for k, v in block.items() if k in known and v is not None}
        for key in ("image_formats", "raw_dtypes"):
            if key in values:
                values[key] = tuple(str(v).lower() for v in values[key])
        return cls(**values, image_size=size, from_service=True)

    def capped(self, max_items: int | None) -> ServiceLimits:
        """These limits with at most `max_items` items per request (a client-side cap)."""
        if max_items is None or max_items >= self.max_items_per_request:
            return self
        from dataclasses import replace

        return replace(self, max_items_per_request=max_items)


def reward_model(provenance: dict[str, Any]) -> str:
    """What must be equal for two answers' rewards to be comparable, as one string: the
    export (content hash) and the calibration file the gateway chose c and λ from."""
    export = str(provenance.get("export_sha256") or provenance.get("cache_key") or "?")
    calibration = (provenance.get("textnorm") or {}).get("calibration_sha256")
    return (
        f"export {export}" if calibration is None else f"export {export}, calibration {calibration}"
    )
