"""AUROC from scores and binary labels (Mann–Whitney U with average ranks for ties)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # 1-based average rank of the tie block
        i = j + 1
    return ranks


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half.

    Raises ValueError when the labels are all one class (AUROC undefined), lengths differ, or
    a score is NaN (it would sort last: the best score, silently).
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D and equal length, got {s.shape} {y.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} NaN scores: AUROC would rank them highest")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_per_prompt_auroc(
    per_prompt: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[float, int]:
    """Mean AUROC over prompts, dropping prompts whose labels are all one class.

    Returns (mean, number of prompts used); the mean is NaN when none qualifies.
    """
    values = [auroc(s, y) for s, y in per_prompt if 0 < np.sum(y) < len(y)]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def by_category(
    results: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
) -> dict[str, float]:
    return {cat: mean_per_prompt_auroc(rows)[0] for cat, rows in results.items()}
