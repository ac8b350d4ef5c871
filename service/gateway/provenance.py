"""An exported repository's provenance.json, read (JSON only) and turned into response blocks.

Response blocks name the model, the head and the tokenizer by name and content hash only
(`public_name`: a hub id as is, a local directory by its last component): provenance.json keeps
the exporter's local paths for the torch-side tools (`verify`, `bench`), but a caller never
learns the server's filesystem layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from textnorm_reward_client.clip_tokenizer import ClipTokenizer

from service import model_contract as contract
from service.gateway.schemas import (
    ExporterInfo,
    HeadInfo,
    ModelCard,
    ModelInfo,
    Provenance,
    TextNormUsed,
    TokenizerInfo,
)

if TYPE_CHECKING:
    from service.gateway.calibration import Calibration

GATEWAY_VERSION = "1"


def load_provenance(repository: str | Path) -> dict[str, Any]:
    """provenance.json of an exported repository; ValueError with one line if unusable."""
    path = Path(repository) / "provenance.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"not an exported repository (no provenance.json): {repository}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable {path}: {exc}") from None
    check_provenance(data, str(path))
    return data


def check_provenance(data: object, where: str = "provenance") -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object")
    model = data.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{where}: no 'model' object")
    for key in ("source", "checkpoint_sha256", "embed_dim"):
        if key not in model:
            raise ValueError(f"{where}: model.{key} is missing")
    members = data.get("members") or []
    if not isinstance(members, list):
        raise ValueError(f"{where}: members must be a list")
    needed = ("source", "checkpoint_sha256", "embed_dim", "models")
    for k, member in enumerate(members):
        if not isinstance(member, dict) or any(key not in member for key in needed):
            raise ValueError(f"{where}: members[{k}] needs {', '.join(needed)}")
        names = member["models"]
        if not isinstance(names, dict) or set(names) != set(contract.MEMBER_ROLES):
            raise ValueError(f"{where}: members[{k}].models must name {contract.MEMBER_ROLES}")
        if not set(names.values()) <= set(data.get("models") or ()):
            raise ValueError(f"{where}: members[{k}]'s models are not among the export's models")
    if not isinstance(data.get("cache_key"), str):
        raise ValueError(f"{where}: cache_key is missing")


def model_name(source: str) -> str:
    """A readable name: a hub id as is, a local directory by its last component."""
    path = PurePosixPath(source)
    if source.startswith((".", "/", "~")) or len(path.parts) != 2:
        return path.name or source
    return source


def public_name(source: object) -> str | None:
    """`source` as a caller may see it: a hub id as is, a path by its last component only."""
    if source is None:
        return None
    text = str(source).replace("\\", "/").rstrip("/")
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or ".." in text:
        return PurePosixPath(text).name or "model"
    return text


MODEL_ENSEMBLE_REWARDS = ("ensemble_models_mean", "ensemble_models_uw")


def reward_names(has_head: bool, multi_model: bool = False) -> list[str]:
    names = contract.CLIP_REWARDS + (contract.HEAD_REWARDS if has_head else ())
    return [n.lower() for n in names] + list(MODEL_ENSEMBLE_REWARDS if multi_model else ())


def _model_info(entry: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        name=str(entry.get("name") or model_name(str(entry["source"]))),
        source=str(public_name(entry["source"])),
        checkpoint_sha256=str(entry["checkpoint_sha256"]),
        embed_dim=int(entry["embed_dim"]),
        image_size=entry.get("image_size"),
    )


class ProvenanceInfo:
    """The fixed part of every response's provenance block, built once per app."""

    def __init__(
        self, data: dict[str, Any], tokenizer: ClipTokenizer, truncate_long_prompts: bool
    ) -> None:
        check_provenance(data)
        self.data = data
        self.model = _model_info(data["model"])
        # further models of a multi-model export: (info, their Triton model names by role)
        self.members = [
            (_model_info(m), {str(k): str(v) for k, v in m["models"].items()})
            for m in data.get("members") or []
        ]
        head = data.get("head")
        self.head = (
            HeadInfo(source=public_name(head.get("source")), sha256=head.get("sha256"))
            if head
            else None
        )
        options = data.get("options") or {}
        self.exporter = ExporterInfo(
            format=data.get("format"),
            target=options.get("target"),
            precision=options.get("precision"),
            max_batch=options.get("max_batch"),
            versions=data.get("versions") or {},
        )
        defaults = data.get("textnorm_defaults") or {}
        self.default_scale = float(defaults.get("scale", options.get("textnorm_scale", 1.0)))
        self.default_lambda = float(
            defaults.get("ensemble_lambda", options.get("ensemble_lambda", 1.0))
        )
        self.max_prompts = int(defaults.get("max_prompts", contract.MAX_PROMPTS))
        self.tokenizer = TokenizerInfo(
            file=Path(tokenizer.path).name,  # its name; the sha256 says which one
            sha256=tokenizer.sha256,
            context_length=tokenizer.context_length,
            pad_id=tokenizer.eos_id,
            truncate_long_prompts=truncate_long_prompts,
        )
        self.cache_key = str(data["cache_key"])
        # Exports since format 2 take [B, T] token ids with T as short as the batch allows.
        self.dynamic_tokens = data.get("text_tokens") == "dynamic"
        self.has_head = self.head is not None
        self.calibration: Calibration | None = None  # the calibration served (set by the app)

    @property
    def checkpoint_sha256(self) -> str:
        return self.model.checkpoint_sha256

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def max_batch(self) -> int | None:
        return self.exporter.max_batch

    def block(
        self,
        scale: float | None = None,
        lam: float | None = None,
        rule: str | None = None,
        allow_missing: bool | None = None,
    ) -> Provenance:
        return Provenance(
            model=self.model,
            head=self.head,
            textnorm=TextNormUsed(
                scale=self.default_scale if scale is None else scale,
                ensemble_lambda=self.default_lambda if lam is None else lam,
                max_prompts=self.max_prompts,
                rule=rule,
                allow_missing=allow_missing,
                calibration_sha256=self.calibration.sha256 if self.calibration else None,
            ),
            tokenizer=self.tokenizer,
            exporter=self.exporter,
            cache_key=self.cache_key,
            export_sha256=self.data.get("export_sha256"),
            model_version=self.data.get("model_version"),
            members=self.all_models,
            gateway={"version": GATEWAY_VERSION},
        )

    @property
    def all_models(self) -> list[ModelInfo] | None:
        """Every model of a multi-model export, the first included (None: one model)."""
        return [self.model, *(info for info, _ in self.members)] if self.members else None

    def model_card(self) -> ModelCard:
        """The served model, with the calibration the gateway serves (its file, else the
        export's bundled one), whose c per prompt kind overrides the model's own."""
        calibration = self.calibration
        return ModelCard(
            name=self.model.name,
            source=self.model.source,
            checkpoint_sha256=self.model.checkpoint_sha256,
            head=self.head,
            embed_dim=self.model.embed_dim,
            image_size=self.model.image_size,
            rewards=reward_names(self.has_head, bool(self.members)),
            textnorm_defaults={
                "scale": self.default_scale,
                "ensemble_lambda": self.default_lambda,
                "max_prompts": self.max_prompts,
            },
            textnorm_calibration_sha256=calibration.sha256 if calibration else None,
            textnorm_calibrated=(
                {kind: asdict(values) for kind, values in calibration.prompt_kinds.items()}
                if calibration
                else None
            ),
            max_batch=self.max_batch,
            cache_key=self.cache_key,
            members=self.all_models,
        )
