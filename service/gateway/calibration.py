"""Calibrated TextNorm scales: which c (and ensemble λ) the gateway uses for an item.

`reward-service calibrate` (evaluation/commands.py) picks c and λ on a validation seed of the
benchmark, per benchmark category, per kind of prompt the gateway can tell apart, and per
prompt set when given a prompt-set file, and writes a calibration JSON
(`textnorm_calibration_file`). For each item the gateway then uses, in order:

1. the request's ``textnorm.scale`` / ``textnorm.ensemble_lambda`` (source "request");
2. the calibrated values of the item's exact contrastive set (by `contrastive_set_sha256`,
   whatever its source: a configured, registered or explicit set);
3. for a set the `auto` rule built (the rule `calibrate` calibrates), the calibrated values
   of the prompt's kind: "composition" (a
   "<NP1> and <NP2>" prompt: the auto rule's binding set) or "single_object" (counting plus
   attribute swaps) — the gateway cannot tell a counting prompt from a colour prompt, so
   those benchmark categories are pooled into one kind;
4. the model's defaults (provenance ``textnorm_defaults``; source "default").

A request that sets only one of c and λ takes the other from the same lookup.

A multi-model export (members) is calibrated per model, as the TextNorm authors chose c for each
reward model: `calibrate --member DIR` adds a ``members`` section (each member's c, by its
checkpoint hash, for the same categories, kinds and sets) and a ``models_lambda`` to each entry
(the λ of ``ensemble_models_uw`` at those c). A member uses the request's c, else its own
calibrated c by the same lookup, else the item's c (the first model's); ``ensemble_models_uw``
uses the request's λ, else the entry's ``models_lambda``, else the item's λ. Without a
``members`` section every model uses the item's c and λ. The file is JSON
only, checked when the gateway starts (one-line ValueError naming the problem), and refused
when it was calibrated for another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from service.contrastive.composition import find_composition
from service.contrastive.tokens import tokenize

CALIBRATION_FORMAT = 1
PROMPT_KINDS: tuple[str, ...] = ("composition", "single_object")
SCALE_SOURCES: tuple[str, ...] = ("request", "calibrated", "default")
CALIBRATED_RULE = "auto"  # the rule whose sets `calibrate` chose the prompt kinds' values on


@dataclass(frozen=True)
class ScaleChoice:
    """The c and λ one item is scored with, and where c came from (SCALE_SOURCES);
    `member_scales`: each member model's c (served order), `models_lambda`: the λ of the
    models' ensemble (both empty/None for a single-model export)."""

    scale: float
    ensemble_lambda: float
    source: str
    member_scales: tuple[float, ...] = ()
    models_lambda: float | None = None

    @property
    def model_scales(self) -> tuple[float, ...]:
        """Every model's c: the first model's, then each member's."""
        return (self.scale, *self.member_scales)

    @property
    def ensemble_models_lambda(self) -> float:
        """The λ of the models' ensemble (the item's λ when none was chosen for it)."""
        return self.ensemble_lambda if self.models_lambda is None else self.models_lambda


@dataclass(frozen=True)
class Calibrated:
    scale: float
    ensemble_lambda: float
    models_lambda: float | None = None  # λ of ensemble_models_uw (a calibration with members)


_Entry = TypeVar("_Entry")


@dataclass(frozen=True)
class MemberScales:
    """One member model's calibrated c, looked up like the first model's."""

    prompt_kinds: Mapping[str, float] = field(default_factory=dict)
    prompt_sets: Mapping[str, float] = field(default_factory=dict)
    categories: Mapping[str, float] = field(default_factory=dict)


def _lookup(
    kinds: Mapping[str, _Entry],
    sets: Mapping[str, _Entry],
    contrastive_sha256: str | None,
    kind: str | None,
) -> _Entry | None:
    """An exact set's entry (by hash), else the entry of `kind` (None: not a set the `auto`
    rule built, see :func:`_rule_kind`)."""
    if contrastive_sha256 is not None and contrastive_sha256 in sets:
        return sets[contrastive_sha256]
    return kinds.get(kind) if kind is not None else None


def _rule_kind(prompt: str, source: str, rule: str) -> str | None:
    """The prompt's kind for a set the `auto` rule built (the rule `calibrate` chose the
    kinds' values on); None for any other set."""
    return prompt_kind(prompt) if source == "rule" and rule == CALIBRATED_RULE else None


@dataclass(frozen=True)
class Calibration:
    """A calibration file, parsed: lookups by prompt kind and by exact contrastive set."""

    sha256: str
    checkpoint_sha256: str | None
    prompt_kinds: Mapping[str, Calibrated] = field(default_factory=dict)
    prompt_sets: Mapping[str, Calibrated] = field(default_factory=dict)
    categories: Mapping[str, Calibrated] = field(default_factory=dict)  # benchmark categories
    validation_seed: int | None = None  # the benchmark seed c was chosen on
    members: Mapping[str, MemberScales] = field(default_factory=dict)  # by checkpoint sha256

    def lookup(
        self, prompt: str, contrastive_sha256: str | None, source: str, rule: str = "auto"
    ) -> Calibrated | None:
        """The calibrated values for a set (by hash), else for a set the `auto` rule built, its
        prompt kind's (`calibrate` chose those on the auto rule's sets: another rule's set gets
        none of them)."""
        kind = _rule_kind(prompt, source, rule)
        return _lookup(self.prompt_kinds, self.prompt_sets, contrastive_sha256, kind)

    def calibrates_member(self, checkpoint_sha256: str) -> bool:
        """Whether the member has its own c for every prompt kind the first model has one for
        (what the gateway uses for rule-built sets); else it would be served at the item's c."""
        own = self.members.get(checkpoint_sha256)
        if own is None or not (own.prompt_kinds or own.prompt_sets or own.categories):
            return False
        return set(self.prompt_kinds) <= set(own.prompt_kinds)

    def choose(
        self,
        prompt: str,
        contrastive_sha256: str | None,
        request_scale: float | None,
        request_lambda: float | None,
        default_scale: float,
        default_lambda: float,
        source: str = "rule",
        rule: str = CALIBRATED_RULE,
        members: Sequence[str] = (),
    ) -> ScaleChoice:
        return choose_scale(
            self,
            prompt,
            contrastive_sha256,
            source,
            request_scale,
            request_lambda,
            default_scale,
            default_lambda,
            rule=rule,
            members=members,
        )


def prompt_kind(prompt: str) -> str:
    """ "composition" for a "<NP1> and <NP2>" prompt, else "single_object" (PROMPT_KINDS)."""
    return "composition" if find_composition(prompt, tokenize(prompt)) else "single_object"


def choose_scale(
    calibration: Calibration | None,
    prompt: str,
    contrastive_sha256: str | None,
    source: str,
    request_scale: float | None,
    request_lambda: float | None,
    default_scale: float,
    default_lambda: float,
    rule: str = CALIBRATED_RULE,
    members: Sequence[str] = (),
) -> ScaleChoice:
    """The item's (c, λ) by the order of the module docstring; `source`: its set's source,
    `rule`: the rule that built it (when `source` is "rule"); `members`: the member models'
    checkpoint hashes, in served order (their c and the models' λ are chosen too)."""
    kind = _rule_kind(prompt, source, rule) if calibration else None  # once for every model
    found = (
        _lookup(calibration.prompt_kinds, calibration.prompt_sets, contrastive_sha256, kind)
        if calibration
        else None
    )
    if request_scale is not None:
        scale, where = float(request_scale), "request"
    elif found is not None:
        scale, where = found.scale, "calibrated"
    else:
        scale, where = default_scale, "default"
    if request_lambda is not None:
        lam = float(request_lambda)
    else:
        lam = found.ensemble_lambda if found is not None else default_lambda
    if not members:
        return ScaleChoice(scale, lam, where)
    member_scales = []
    for checkpoint in members:
        own = calibration.members.get(checkpoint) if calibration else None
        calibrated = (
            _lookup(own.prompt_kinds, own.prompt_sets, contrastive_sha256, kind) if own else None
        )
        member_scales.append(
            scale if request_scale is not None or calibrated is None else calibrated
        )
    models_lambda = lam
    if request_lambda is None and found is not None and found.models_lambda is not None:
        models_lambda = found.models_lambda
    return ScaleChoice(scale, lam, where, tuple(member_scales), models_lambda)


def summarise_sources(sources: Iterable[str | None]) -> str | None:
    """One word for a response's provenance: the items' common scale source, or "mixed"."""
    found = {s for s in sources if s is not None}
    if not found:
        return None
    return found.pop() if len(found) == 1 else "mixed"


def gateway_calibration(
    path: str | None, checkpoint_sha256: str, provenance: Mapping[str, Any] | None = None
) -> Calibration | None:
    """The gateway's calibration: `textnorm_calibration_file` if set, else the one the export
    bundles (provenance `textnorm_calibration`: the document and its sha256, so a gateway with
    only provenance.json and tokenizer.json serves it too), else None."""
    if path:
        return load_calibration(path, checkpoint_sha256)
    bundled = (provenance or {}).get("textnorm_calibration")
    if not bundled:
        return None
    try:
        calibration = parse_calibration(bundled["document"], bundled["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"provenance.json: unusable textnorm_calibration ({exc})") from None
    if calibration.checkpoint_sha256 not in (None, checkpoint_sha256):
        raise ValueError("provenance.json: the bundled calibration is for another checkpoint")
    return calibration


def with_scale_sources(provenance: Any, results: Iterable[Any]):
    """`provenance` (a response's block) saying where the items' c came from (the block
    names the calibration the gateway serves already: `ProvenanceInfo.block`)."""
    results = list(results)
    provenance.textnorm.scale_source = summarise_sources(r.textnorm_scale_source for r in results)
    scales = {r.textnorm_scale for r in results if r.textnorm_scale is not None}
    lambdas = {r.ensemble_lambda for r in results if r.ensemble_lambda is not None}
    if scales:  # the c and λ the items used: one value, or null when they differ
        provenance.textnorm.scale = scales.pop() if len(scales) == 1 else None
    if lambdas:
        provenance.textnorm.ensemble_lambda = lambdas.pop() if len(lambdas) == 1 else None
    members = {  # each model's c, of the items that have a set
        tuple(m.textnorm_scale for m in r.members)
        for r in results
        if r.members and r.textnorm_scale is not None
    }
    if members:
        provenance.textnorm.member_scales = list(members.pop()) if len(members) == 1 else None
    models_lambdas = {r.ensemble_models_lambda for r in results}
    models_lambdas.discard(None)
    if models_lambdas:
        provenance.textnorm.ensemble_models_lambda = (
            models_lambdas.pop() if len(models_lambdas) == 1 else None
        )
    return provenance


# The largest c and λ a request or a calibration file may set. The reward head computes in
# float32; past c ≈ 3.4e38 the scale itself became inf and TextNorm NaN.
SCALE_BOUND = 1e4
LAMBDA_BOUND = 1e4


def _number(where: str, value: object, low: float, high: float, low_open: bool) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: must be a number within float range") from None
    if isinstance(value, bool) or not (
        math.isfinite(x) and (x > low if low_open else x >= low) and x <= high
    ):
        bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise ValueError(f"{where}: must be {bound}, got {value!r}")
    return x


def _calibrated(where: str, value: object) -> Calibrated:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object with scale and ensemble_lambda")
    missing = [k for k in ("scale", "ensemble_lambda") if k not in value]
    if missing:
        raise ValueError(f"{where}: missing {missing[0]}")
    scale = _number(f"{where}.scale", value["scale"], 0, SCALE_BOUND, True)
    lam = _number(f"{where}.ensemble_lambda", value["ensemble_lambda"], 0, LAMBDA_BOUND, False)
    models_lambda = value.get("models_lambda")
    if models_lambda is not None:
        models_lambda = _number(f"{where}.models_lambda", models_lambda, 0, LAMBDA_BOUND, False)
    return Calibrated(scale, lam, models_lambda)


def _scales(where: str, entries: object) -> dict[str, float]:
    """A member's {name: {"scale": c}} section."""
    if not isinstance(entries, dict):
        raise ValueError(f"{where}: must be an object")
    out = {}
    for name, value in entries.items():
        if not isinstance(value, dict) or "scale" not in value:
            raise ValueError(f"{where}.{name}: expected an object with scale")
        out[name] = _number(f"{where}.{name}.scale", value["scale"], 0, SCALE_BOUND, True)
    return out


_MEMBER_PARTS = ("prompt_kinds", "prompt_sets", "categories")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _members(data: object) -> dict[str, MemberScales]:
    """The `members` section: {checkpoint sha256: {"name", *_MEMBER_PARTS}}."""
    if not isinstance(data, dict):
        raise ValueError("calibration: members must be an object")
    members = {}
    for checkpoint, section in data.items():
        if not _SHA256.fullmatch(checkpoint):
            raise ValueError(
                f"calibration: members key {checkpoint[:70]!r} is not a checkpoint sha256 (64 "
                "hex digits; `calibrate --member` writes them)"
            )
        where = f"members.{checkpoint[:12]}"
        if not isinstance(section, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = sorted(set(section) - {"name", *_MEMBER_PARTS})
        if unknown:
            raise ValueError(
                f"{where}: unknown key {unknown[0]!r}; known: name, {', '.join(_MEMBER_PARTS)}"
            )
        parts = {p: _scales(f"{where}.{p}", section.get(p, {})) for p in _MEMBER_PARTS}
        kinds = [k for k in parts["prompt_kinds"] if k not in PROMPT_KINDS]
        if kinds:
            raise ValueError(f"{where}: unknown prompt kind {kinds[0]!r}")
        members[checkpoint] = MemberScales(**{p: MappingProxyType(v) for p, v in parts.items()})
    return members


def parse_calibration(data: object, sha256: str = "") -> Calibration:
    """Validate decoded calibration JSON (format CALIBRATION_FORMAT, see `calibrate`)."""
    if not isinstance(data, dict):
        raise ValueError("calibration: expected a JSON object")
    if data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"calibration: format {data.get('format')!r} is not {CALIBRATION_FORMAT}")
    kinds_in = data.get("prompt_kinds") or {}
    sets_in = data.get("prompt_sets") or {}
    categories_in = data.get("categories") or {}
    if not all(isinstance(x, dict) for x in (kinds_in, sets_in, categories_in)):
        raise ValueError("calibration: prompt_kinds, prompt_sets and categories must be objects")
    unknown = [k for k in kinds_in if k not in PROMPT_KINDS]
    if unknown:
        raise ValueError(
            f"calibration: unknown prompt kind {unknown[0]!r}; known: {', '.join(PROMPT_KINDS)}"
        )
    kinds = {k: _calibrated(f"prompt_kinds.{k}", v) for k, v in kinds_in.items()}
    sets = {k: _calibrated(f"prompt_sets.{k}", v) for k, v in sets_in.items()}
    categories = {k: _calibrated(f"categories.{k}", v) for k, v in categories_in.items()}
    model = data.get("model") or {}
    checkpoint = model.get("checkpoint_sha256") if isinstance(model, dict) else None
    seed = data.get("validation_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"calibration: validation_seed must be an integer, got {seed!r}")
    members = _members(data["members"] if data.get("members") is not None else {})
    return Calibration(
        sha256=sha256,
        checkpoint_sha256=checkpoint,
        prompt_kinds=MappingProxyType(kinds),
        prompt_sets=MappingProxyType(sets),
        categories=MappingProxyType(categories),
        validation_seed=seed,
        members=MappingProxyType(members),
    )


def load_calibration(
    path: str | os.PathLike[str], checkpoint_sha256: str | None = None
) -> Calibration:
    """Read a calibration file (JSON only); ValueError (one line, naming the file) when it is
    unusable or was calibrated for another checkpoint than `checkpoint_sha256`."""
    try:
        raw = open(path, "rb").read()  # noqa: SIM115 - one read
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the calibration file ({exc.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
        calibration = parse_calibration(data, hashlib.sha256(raw).hexdigest())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON calibration file ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if (
        checkpoint_sha256 is not None
        and calibration.checkpoint_sha256 is not None
        and calibration.checkpoint_sha256 != checkpoint_sha256
    ):
        raise ValueError(
            f"{path}: calibrated for checkpoint {calibration.checkpoint_sha256[:12]}, but the "
            f"served model is {checkpoint_sha256[:12]}"
        )
    return calibration


def calibration_document(
    *,
    checkpoint_sha256: str,
    validation_seed: int,
    grid: Mapping[str, list[float]],
    categories: Mapping[str, Mapping[str, Any]],
    prompt_kinds: Mapping[str, Mapping[str, Any]],
    prompt_sets: Mapping[str, Mapping[str, Any]] | None = None,
    members: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON a calibration file holds (what `calibrate` writes, `parse_calibration` reads);
    `members`: {member checkpoint sha256: {"name", "categories", "prompt_kinds",
    "prompt_sets"}}, each entry {"scale": c, ...}."""
    return {
        "format": CALIBRATION_FORMAT,
        "model": {"checkpoint_sha256": checkpoint_sha256},
        "validation_seed": validation_seed,
        "grid": dict(grid),
        "categories": dict(categories),
        "prompt_kinds": dict(prompt_kinds),
        "prompt_sets": dict(prompt_sets or {}),
        **({"members": dict(members)} if members else {}),
        **dict(extra or {}),
    }


__all__ = [
    "CALIBRATION_FORMAT",
    "PROMPT_KINDS",
    "SCALE_SOURCES",
    "Calibrated",
    "Calibration",
    "MemberScales",
    "ScaleChoice",
    "calibration_document",
    "choose_scale",
    "gateway_calibration",
    "load_calibration",
    "parse_calibration",
    "prompt_kind",
    "summarise_sources",
    "with_scale_sources",
]
