"""A genuinely two-model ensemble of TextNorm rewards on the benchmark (issue 14, item 3).

Member A (the shipped CLIP) and member B (a second, differently trained CLIP with the same
tokenizer) each score every benchmark image against [prompt, *contrastive] — each with its own
image processor, on the same images and prompt sets. Per benchmark prompt the rows are
(DESIGN.md 2.3; the ensembles are :mod:`service.textnorm`'s, over the members' TextNorm):

    raw_a, raw_b            each member's cosine similarity with the prompt
    textnorm_a, textnorm_b  each member's TextNorm probability at c
    models_mean             p̄ = mean of the two TextNorm probabilities
    models_uw               p̄ − λ · (1/M) Σ_m (p_m − p̄)²

and each row's score is mean per-prompt AUROC per category. λ is chosen on the validation seed
only (grid `LAMBDA_GRID`, highest mean AUROC of `models_uw` over categories, ties to the earlier
value), as the TextNorm authors choose it on held-out data; the evaluation seeds never tune
anything. Over several benchmark seeds :func:`summarise` reports each row's mean, std and range,
and for the ensembles on how many seeds they beat each member's TextNorm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.progress import Progress

from evaluation.auroc import mean_per_prompt_auroc
from evaluation.calibrate import LAMBDA_GRID
from evaluation.evaluate import (
    ContrastiveFn,
    ScoredPrompt,
    encode_benchmark_images,
    score_benchmark,
)
from export.clip_model import ClipBundle
from service.gateway.calibration import Calibration
from service.gateway.prompt_set_registry import contrastive_set_sha256
from service.textnorm import ensemble_mean, ensemble_uncertainty, textnorm
from shapes_world.benchmark import BenchmarkPrompt, build_benchmark

MEMBER_ROWS: tuple[str, ...] = ("raw_a", "raw_b", "textnorm_a", "textnorm_b")
ENSEMBLE_ROWS: tuple[str, ...] = ("models_mean", "models_uw")
ROWS: tuple[str, ...] = MEMBER_ROWS + ENSEMBLE_ROWS

Pair = tuple[ScoredPrompt, ScoredPrompt]  # one benchmark prompt scored by member A and by B
Rows = dict[str, dict[str, float]]  # row → category → mean per-prompt AUROC


def score_pairs(
    bundles: tuple[ClipBundle, ClipBundle],
    prompts: list[BenchmarkPrompt],
    rules: Mapping[str, ContrastiveFn],
) -> dict[str, list[Pair]]:
    """{rule: [(A's ScoredPrompt, B's ScoredPrompt) per prompt]}; images encoded once per model."""
    images = [encode_benchmark_images(bundle, prompts) for bundle in bundles]
    out: dict[str, list[Pair]] = {}
    for name, rule in rules.items():
        a, b = (
            score_benchmark(bundle, prompts, None, rule, imgs)
            for bundle, imgs in zip(bundles, images, strict=True)
        )
        out[name] = list(zip(a, b, strict=True))
    return out


PairChoice = Callable[[Pair], tuple[float, float, float]]  # one prompt's (c of A, c of B, λ)


def fixed_choice(scale: float, lam: float) -> PairChoice:
    """Both members at the same c, the ensemble at λ, for every prompt."""
    return lambda _pair: (scale, scale, lam)


def calibrated_choice(
    calibration: Calibration, member_sha256: str, default_scale: float, default_lambda: float
) -> PairChoice:
    """What the gateway picks from `calibration` for a rule-built set: A's c, B's own c (its
    `members` entry, else A's) and the models' λ (service/gateway/calibration.py)."""

    def choose(pair: Pair) -> tuple[float, float, float]:
        a = pair[0]
        sha = contrastive_set_sha256(a.prompt.prompt, a.contrastive)
        choice = calibration.choose(
            a.prompt.prompt, sha, None, None, default_scale, default_lambda, members=[member_sha256]
        )
        return choice.scale, choice.member_scales[0], choice.ensemble_models_lambda

    return choose


def row_scores(pair: Pair, scale_a: float, scale_b: float, lam: float) -> dict[str, np.ndarray]:
    """Every row's per-image reward [N] for one prompt scored by both members, each member's
    TextNorm at its own c."""
    a, b = pair
    if a.prompt != b.prompt or a.contrastive != b.contrastive:
        raise ValueError(f"the members scored different prompt sets for {a.prompt.prompt!r}")
    probs = np.stack(
        [
            textnorm(m.clip.astype(np.float64), c)
            for m, c in zip(pair, (scale_a, scale_b), strict=True)
        ]
    )
    return {
        "raw_a": a.clip[:, 0],
        "raw_b": b.clip[:, 0],
        "textnorm_a": probs[0],
        "textnorm_b": probs[1],
        "models_mean": ensemble_mean(probs),
        "models_uw": ensemble_uncertainty(probs, lam=lam),
    }


def auroc_rows(pairs: Sequence[Pair], choice: PairChoice) -> Rows:
    """{row: {category: mean per-prompt AUROC}}, each prompt at the c and λ `choice` gives."""
    scores = [row_scores(pair, *choice(pair)) for pair in pairs]
    categories = list(dict.fromkeys(a.prompt.category for a, _ in pairs))
    return {
        row: {
            cat: mean_per_prompt_auroc(
                [
                    (s[row], a.prompt.labels)
                    for (a, _), s in zip(pairs, scores, strict=True)
                    if a.prompt.category == cat
                ]
            )[0]
            for cat in categories
        }
        for row in ROWS
    }


def choose_lambda(
    pairs: Sequence[Pair], scale: float, grid: Sequence[float] = LAMBDA_GRID
) -> tuple[float, dict[float, float]]:
    """(λ of `grid` with the highest mean AUROC of `models_uw` over categories, that AUROC by λ);
    ties go to the earlier grid value. Pass validation-seed pairs only."""
    by_lambda = {
        lam: float(
            np.nanmean(list(auroc_rows(pairs, fixed_choice(scale, lam))["models_uw"].values()))
        )
        for lam in grid
    }
    best = max(grid, key=lambda lam: (by_lambda[lam], -list(grid).index(lam)))
    return best, by_lambda


def summarise(per_seed: Mapping[int, Rows]) -> dict[str, Any]:
    """Spread over seeds: {"rows": {row: {cat: mean, std (ddof 1), min, max}},
    "ensembles": {row: {cat: beats_a, beats_b, beats_both, seeds, diff_to_better_*}}}: an
    ensemble beats a member on a seed when its AUROC is strictly greater than that member's
    TextNorm; diff_to_better is ensemble − max(textnorm_a, textnorm_b), seed by seed."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for row, by_cat in first.items():
        rows[row] = {}
        for cat in by_cat:
            values = np.array([per_seed[s][row][cat] for s in seeds])
            rows[row][cat] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "min": float(values.min()),
                "max": float(values.max()),
            }
    ensembles: dict[str, dict[str, dict[str, Any]]] = {}
    for row in ENSEMBLE_ROWS:
        ensembles[row] = {}
        for cat in first[row]:
            ens = np.array([per_seed[s][row][cat] for s in seeds])
            a = np.array([per_seed[s]["textnorm_a"][cat] for s in seeds])
            b = np.array([per_seed[s]["textnorm_b"][cat] for s in seeds])
            diff = ens - np.maximum(a, b)
            ensembles[row][cat] = {
                "seeds": len(seeds),
                "beats_a": int(np.sum(ens > a)),
                "beats_b": int(np.sum(ens > b)),
                "beats_both": int(np.sum((ens > a) & (ens > b))),
                "diff_to_better_mean": float(diff.mean()),
                "diff_to_better_min": float(diff.min()),
                "diff_to_better_max": float(diff.max()),
            }
    return {"rows": rows, "ensembles": ensembles}


@dataclass(frozen=True)
class EnsembleSettings:
    """What one evaluation runs: its seeds, the validation seed λ is chosen on, sizes, c."""

    seeds: tuple[int, ...]
    validation_seed: int
    prompts_per_category: int = 10
    images_per_prompt: int = 50
    textnorm_scale: float = 5.0
    lambda_grid: tuple[float, ...] = LAMBDA_GRID

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("at least one benchmark seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"benchmark seeds repeat: {list(self.seeds)}")
        if self.validation_seed in self.seeds:
            raise ValueError(
                f"seed {self.validation_seed} is the validation seed λ is chosen on: "
                "evaluate on other seeds"
            )

    def benchmark(self, seed: int) -> list[BenchmarkPrompt]:
        return build_benchmark(
            seed=seed,
            prompts_per_category=self.prompts_per_category,
            images_per_prompt=self.images_per_prompt,
        )


def evaluate_ensemble(
    bundles: tuple[ClipBundle, ClipBundle],
    rules: Mapping[str, ContrastiveFn],
    settings: EnsembleSettings,
    calibrated: Mapping[str, PairChoice] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per contrastive rule: {ensemble_lambda, validation_auroc_by_lambda (mean over categories),
    per_seed: {seed: Rows}, summary: :func:`summarise`}. λ comes from the validation seed alone,
    at the settings' c; a rule named in `calibrated` takes each prompt's c and λ from its
    choice instead (a calibration file, itself chosen on the validation seed) and reports
    ensemble_lambda "calibrated"."""
    c = settings.textnorm_scale
    calibrated = calibrated or {}
    out: dict[str, dict[str, Any]] = {}
    choices: dict[str, PairChoice] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("benchmarks (validation first)", total=1 + len(settings.seeds))
        validation = score_pairs(bundles, settings.benchmark(settings.validation_seed), rules)
        for rule, pairs in validation.items():
            if rule in calibrated:
                choices[rule] = calibrated[rule]
                out[rule] = {"ensemble_lambda": "calibrated", "per_seed": {}}
                continue
            lam, by_lambda = choose_lambda(pairs, c, settings.lambda_grid)
            choices[rule] = fixed_choice(c, lam)
            out[rule] = {
                "ensemble_lambda": lam,
                "validation_auroc_by_lambda": {str(k): v for k, v in by_lambda.items()},
                "per_seed": {},
            }
        progress.advance(task)
        for seed in settings.seeds:
            scored = score_pairs(bundles, settings.benchmark(seed), rules)
            for rule, pairs in scored.items():
                out[rule]["per_seed"][seed] = auroc_rows(pairs, choices[rule])
            progress.advance(task)
    for result in out.values():
        result["summary"] = summarise(result["per_seed"])
    return out
