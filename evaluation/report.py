"""The rows of `reward-service eval`: per-category-rule rows and the served default's rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evaluation.evaluate import EvalSettings, ScoredPrompt, evaluate, score_benchmark
from evaluation.served import (
    ScoreTable,
    auroc_rows,
    calibrated_choice,
    fixed_choice,
    served_contrastive,
    served_scores,
)
from service.gateway.calibration import Calibration
from shapes_world.benchmark import BenchmarkPrompt

# The paper's figures (DESIGN.md 2.4: mean per-prompt AUROC from the authors' released scores).
PAPER_FIGURES: dict[str, dict[str, float]] = {
    "paper: CLIP": {"counting": 0.595, "composition": 0.717},
    "paper: TextNorm": {"counting": 0.807, "composition": 0.844},
}


def category_rows(
    scored: Sequence[ScoredPrompt],
    scale: float,
    lam: float,
    calibration: Calibration | None = None,
) -> dict[str, dict[str, float]]:
    """Every reward with each category's own rule, at c (or each category's calibrated c/λ)."""
    if calibration is None or not calibration.categories:
        return evaluate(list(scored), EvalSettings(scale, lam))
    report: dict[str, dict[str, float]] = {}
    for category in dict.fromkeys(p.prompt.category for p in scored):
        found = calibration.categories.get(category)
        settings = EvalSettings(found.scale, found.ensemble_lambda) if found else None
        part = evaluate(
            [p for p in scored if p.prompt.category == category],
            settings or EvalSettings(scale, lam),
        )
        for name, row in part.items():
            report.setdefault(name, {}).update(row)
    return report


def served_rows(
    bundle,
    prompts: list[BenchmarkPrompt],
    head,
    images: list[np.ndarray],
    *,
    tokenizer,
    max_contrastive: int,
    vocabulary=None,
    scale: float,
    lam: float,
    calibration: Calibration | None = None,
) -> tuple[ScoreTable, dict[str, dict[str, float]]]:
    """What /v1/score returns with default settings (auto rule; default or calibrated c)."""
    contrastive = served_contrastive(tokenizer, max_contrastive, vocabulary=vocabulary)
    scored = score_benchmark(bundle, prompts, head, contrastive, images)
    choose = calibrated_choice(calibration, scale, lam) if calibration else fixed_choice(scale, lam)
    table = served_scores(scored, choose)
    return table, auroc_rows(prompts, table, "served_")


def markdown_table(report: dict[str, dict[str, float]], paper: bool = True) -> str:
    """The report as a markdown table (README), the paper's figures last."""
    rows = dict(report) | (PAPER_FIGURES if paper else {})
    categories = list(next(iter(report.values())))
    lines = [
        "| reward | " + " | ".join(categories) + " |",
        "| --- |" + " --- |" * len(categories),
    ]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in categories]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
