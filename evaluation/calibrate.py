"""Choosing TextNorm's scale c (and the ensemble's λ) on a validation seed, as the authors did.

For a group of benchmark prompts (one category, one kind of prompt the gateway tells apart, or
the prompts a prompt-set file covers), c is the value of the grid with the highest mean
per-prompt AUROC of TextNorm over raw CLIP; λ is then the value with the highest AUROC of the
uncertainty-regularised ensemble at that c. Ties go to the earlier grid value. Only a
validation seed may be used (`calibrate` refuses the held-out one): choosing on the held-out
seed would report a tuned number as a measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.auroc import mean_per_prompt_auroc
from evaluation.evaluate import ScoredPrompt
from service.gateway.calibration import prompt_kind
from service.gateway.prompt_set_registry import contrastive_set_sha256
from service.textnorm import ensemble_uncertainty, textnorm

SCALE_GRID: tuple[float, ...] = (0.1, 1.0, 3.0, 5.0, 10.0, 20.0, 50.0)  # authors' + 20, 50
LAMBDA_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
Groups = dict[str, list[int]]  # group name → indices of its benchmark prompts


def _auroc(scored: Sequence[ScoredPrompt], reward) -> float:
    return mean_per_prompt_auroc([(reward(p), p.prompt.labels) for p in scored])[0]


def choose(
    scored: Sequence[ScoredPrompt],
    scale_grid: Sequence[float] = SCALE_GRID,
    lambda_grid: Sequence[float] = LAMBDA_GRID,
) -> dict[str, Any]:
    """{scale, ensemble_lambda, prompts, auroc_by_scale, auroc_by_lambda} for one group."""
    by_scale = {
        c: _auroc(scored, lambda p, c=c: textnorm(p.clip.astype(np.float64), c)) for c in scale_grid
    }
    scale = max(scale_grid, key=lambda c: (by_scale[c], -scale_grid.index(c)))
    out: dict[str, Any] = {
        "scale": scale,
        "prompts": len(scored),
        "auroc_by_scale": {str(c): round(v, 6) for c, v in by_scale.items()},
    }
    if all(p.head is not None for p in scored):

        def uw(p: ScoredPrompt, lam: float) -> np.ndarray:
            probs = np.stack([textnorm(p.clip.astype(np.float64), scale), textnorm(p.head, scale)])
            return ensemble_uncertainty(probs, lam=lam)

        by_lambda = {lam: _auroc(scored, lambda p, lam=lam: uw(p, lam)) for lam in lambda_grid}
        lam = max(lambda_grid, key=lambda x: (by_lambda[x], -lambda_grid.index(x)))
        out["ensemble_lambda"] = lam
        out["auroc_by_lambda"] = {str(x): round(v, 6) for x, v in by_lambda.items()}
    else:
        out["ensemble_lambda"] = 1.0
    return out


def by_groups(
    scored: Sequence[ScoredPrompt], groups: Groups, **grids: Any
) -> dict[str, dict[str, Any]]:
    """One :func:`choose` per group of prompts."""
    return {name: choose([scored[i] for i in indices], **grids) for name, indices in groups.items()}


def by_category(scored: Sequence[ScoredPrompt], **grids: Any) -> dict[str, dict[str, Any]]:
    return by_groups(scored, groups_by_category(scored), **grids)


def by_prompt_kind(scored: Sequence[ScoredPrompt], **grids: Any) -> dict[str, dict[str, Any]]:
    """One choice per kind of prompt the gateway tells apart (calibration.PROMPT_KINDS)."""
    return by_groups(scored, groups_by_prompt_kind(scored), **grids)


def by_prompt_set(scored: Sequence[ScoredPrompt], **grids: Any) -> dict[str, dict[str, Any]]:
    """For prompts scored with a prompt-set file's sets: one choice per category of those
    prompts, stored under each set's content hash (the gateway looks sets up by it)."""
    return per_set(by_category(scored, **grids), scored)


def groups_by_category(scored: Sequence[ScoredPrompt]) -> Groups:
    groups: Groups = {}
    for i, p in enumerate(scored):
        groups.setdefault(p.prompt.category, []).append(i)
    return groups


def groups_by_prompt_kind(scored: Sequence[ScoredPrompt]) -> Groups:
    groups: Groups = {}
    for i, p in enumerate(scored):
        groups.setdefault(prompt_kind(p.prompt.prompt), []).append(i)
    return groups


def per_set(
    choices: dict[str, dict[str, Any]], scored: Sequence[ScoredPrompt]
) -> dict[str, dict[str, Any]]:
    """Per-category choices stored under each prompt's set hash."""
    return {
        contrastive_set_sha256(p.prompt.prompt, p.contrastive): {
            "prompt": p.prompt.prompt,
            "category": p.prompt.category,
            **choices[p.prompt.category],
        }
        for p in scored
    }


# -- a multi-model export: each member's own c, then the models' λ ---------------------------------
def with_members(
    first: dict[str, dict[str, Any]],
    groups: Groups,
    models: Sequence[Sequence[ScoredPrompt]],
    scale_grid: Sequence[float] = SCALE_GRID,
    lambda_grid: Sequence[float] = LAMBDA_GRID,
) -> list[dict[str, dict[str, Any]]]:
    """Per group, each member's own c (as :func:`choose`: its TextNorm's AUROC), then the λ of
    the models' uncertainty-regularised ensemble at those c, written into `first`'s entries as
    `models_lambda` (with `auroc_by_models_lambda`). `models`: every model's scored prompts,
    the first model's first, aligned prompt by prompt. Returns each member's {group: choice}."""
    first_scored, *members = models
    for scored in members:
        for a, b in zip(first_scored, scored, strict=True):
            if a.prompt != b.prompt or a.contrastive != b.contrastive:
                raise ValueError(f"the models scored different sets for {a.prompt.prompt!r}")
    member_choices: list[dict[str, dict[str, Any]]] = [{} for _ in members]
    for group, indices in groups.items():
        for k, scored in enumerate(members):
            choice = choose([scored[i] for i in indices], scale_grid, lambda_grid)
            member_choices[k][group] = {
                "scale": choice["scale"],
                "auroc_by_scale": choice["auroc_by_scale"],
            }
        scales = [first[group]["scale"], *(m[group]["scale"] for m in member_choices)]

        def uw(i: int, lam: float, scales: list[float] = scales) -> np.ndarray:
            probs = [
                textnorm(m[i].clip.astype(np.float64), c)
                for m, c in zip(models, scales, strict=True)
            ]
            return ensemble_uncertainty(np.stack(probs), lam=lam)

        by_lambda = {
            lam: mean_per_prompt_auroc(
                [(uw(i, lam), first_scored[i].prompt.labels) for i in indices]
            )[0]
            for lam in lambda_grid
        }
        lam = max(lambda_grid, key=lambda x: (by_lambda[x], -lambda_grid.index(x)))
        first[group]["models_lambda"] = lam
        first[group]["auroc_by_models_lambda"] = {str(x): round(v, 6) for x, v in by_lambda.items()}
    return member_choices
