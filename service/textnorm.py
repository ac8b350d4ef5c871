"""TextNorm reward calibration and reward-model ensembles (numpy reference implementation).

TextNorm (Kim et al., ICLR 2024, "Confidence-aware Reward Optimization ...", DESIGN.md 2.3)
turns raw rewards into a calibrated probability. For an image y and prompt x build the prompt
set P = [x] + contrastive prompts and score every prompt, r_k = r(P_k, y). Then

    r̂_k = c · (r_k − min r) / (max r − min r)        (min/max over the valid prompts)
    TextNorm(x, y) = softmax(r̂)[0]                    (probability of the true prompt)

with the degenerate case max r == min r (this includes |P| = 1) defined as 1/|P|.

Conventions used throughout this module:

* ``rewards`` has shape ``[..., P]``; index 0 along the last axis is the TRUE prompt and
  indices 1..P-1 are its contrastive prompts. Every function is vectorised over the leading
  axes ``...``.
* ``mask`` (optional, boolean, same shape as ``rewards``) marks valid prompts so that rows with
  different numbers of contrastive prompts can be batched; padded entries are ``False``.
  ``mask[..., 0]`` must be ``True``. Padded reward values are ignored entirely (they may hold
  any value, NaN included); they get probability 0.
* ``scale`` is the TextNorm temperature c > 0: a float, or an array broadcastable to the
  leading shape ``rewards.shape[:-1]`` (one scale per row).

Ensembles over M reward models take probabilities of shape ``[M, ...]``:

    p̄ = mean_m p_m,        R = p̄ − λ · (1/M) · Σ_m (p_m − p̄)²      (population variance)

This module is torch-free; ``export/textnorm_torch.py`` mirrors it in torch for ONNX export.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ensemble_mean",
    "ensemble_uncertainty",
    "textnorm",
    "textnorm_probabilities",
]


def _validate(
    rewards: np.ndarray, scale: float | np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check inputs; return (rewards float64, scale float64 [..., 1], mask bool [..., P])."""
    r = np.asarray(rewards)
    if r.ndim < 1:
        raise ValueError("rewards must have at least one axis: shape [..., P]")
    if r.shape[-1] < 1:
        raise ValueError("rewards must contain at least one prompt (P >= 1) along the last axis")
    if not (np.issubdtype(r.dtype, np.floating) or np.issubdtype(r.dtype, np.integer)):
        raise ValueError(f"rewards must be a real numeric array, got dtype {r.dtype}")
    r = r.astype(np.float64, copy=False)

    if mask is None:
        m = np.ones(r.shape, dtype=bool)
    else:
        m = np.asarray(mask)
        if m.shape != r.shape:
            raise ValueError(f"mask shape {m.shape} does not match rewards shape {r.shape}")
        if m.dtype != np.bool_:
            raise ValueError(f"mask must be a boolean array, got dtype {m.dtype}")
        if not np.all(m[..., 0]):
            raise ValueError("mask[..., 0] must be True: the true prompt (index 0) is always valid")

    if not np.all(np.isfinite(r[m])):
        raise ValueError("rewards contain NaN or infinite values (in valid, unmasked entries)")

    s = np.asarray(scale)
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"scale must be a real number, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    try:
        s = np.broadcast_to(s, r.shape[:-1])
    except ValueError:
        raise ValueError(
            f"scale of shape {s.shape} does not broadcast to the leading shape {r.shape[:-1]}"
        ) from None
    return r, s[..., np.newaxis], m


def textnorm_probabilities(
    rewards: np.ndarray,
    scale: float | np.ndarray = 1.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Full TextNorm softmax over the prompt set.

    Args:
        rewards: raw rewards, shape ``[..., P]``; index 0 is the true prompt.
        scale: TextNorm scale c > 0 (float, or array broadcastable to ``[...]``).
        mask: optional boolean validity mask, shape ``[..., P]``; ``mask[..., 0]`` must be True.

    Returns:
        float64 array ``[..., P]``: softmax of the min-max normalised, scaled rewards over the
        valid entries, 0 on masked entries. Rows with max r == min r are uniform over their
        valid entries (1/|P_valid| each).

    Raises:
        ValueError: on invalid shapes, mask, scale, or non-finite valid rewards.
    """
    r, c, m = _validate(rewards, scale, mask)
    # Replace padded entries by the true prompt's reward: it leaves min/max unchanged (the
    # true prompt is always valid) and keeps NaN/inf in padding out of the arithmetic.
    r = np.where(m, r, r[..., :1])
    # Halving is exact for normal floats and keeps r_max - r_min from overflowing.
    r = 0.5 * r
    r_min = r.min(axis=-1, keepdims=True)
    r_max = r.max(axis=-1, keepdims=True)
    span = r_max - r_min
    degenerate = span == 0.0
    safe_span = np.where(degenerate, 1.0, span)
    r_hat = np.where(degenerate, 0.0, c * ((r - r_min) / safe_span))  # in [0, 1] before c
    # Stable softmax: every valid r_hat lies in [0, c] and the row max equals c (or 0 when
    # degenerate); subtract the row max over the valid entries.
    row_max = r_hat.max(axis=-1, keepdims=True)  # padded entries equal r_hat[..., 0] <= max
    e = np.where(m, np.exp(r_hat - row_max), 0.0)
    return e / e.sum(axis=-1, keepdims=True)


def textnorm(
    rewards: np.ndarray,
    scale: float | np.ndarray = 1.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """TextNorm-calibrated reward: the probability of the true prompt (index 0).

    Args:
        rewards: raw rewards, shape ``[..., P]``; index 0 is the true prompt.
        scale: TextNorm scale c > 0 (float, or array broadcastable to ``[...]``).
        mask: optional boolean validity mask, shape ``[..., P]``; ``mask[..., 0]`` must be True.

    Returns:
        float64 array of shape ``[...]`` with values in (0, 1]; 1/|P_valid| when max r == min r
        (1.0 when only the true prompt is valid).

    Raises:
        ValueError: on invalid shapes, mask, scale, or non-finite valid rewards.
    """
    return textnorm_probabilities(rewards, scale, mask)[..., 0]


def _validate_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim < 1:
        raise ValueError("probs must have shape [M, ...] with M reward models along axis 0")
    if p.shape[0] < 1:
        raise ValueError("probs must hold at least one reward model (M >= 1) along axis 0")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"probs must be a real numeric array, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or infinite values")
    return p


def ensemble_mean(probs: np.ndarray) -> np.ndarray:
    """Mean over M reward models: ``probs`` ``[M, ...]`` -> float64 ``[...]``.

    Raises:
        ValueError: if M < 1, probs is 0-d, or contains NaN/inf.
    """
    return _validate_probs(probs).mean(axis=0)


def ensemble_uncertainty(probs: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Uncertainty-regularised ensemble reward ``p̄ − λ · (1/M) Σ_m (p_m − p̄)²``.

    Args:
        probs: per-model TextNorm probabilities, shape ``[M, ...]``.
        lam: penalty weight λ >= 0 (finite) on the population variance across models.

    Returns:
        float64 array of shape ``[...]``.

    Raises:
        ValueError: if M < 1, probs is 0-d or non-finite, or lam is negative / non-finite.
    """
    p = _validate_probs(probs)
    lam_f = float(lam)
    if not np.isfinite(lam_f) or lam_f < 0:
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    mean = p.mean(axis=0)
    var = ((p - mean) ** 2).mean(axis=0)
    return mean - lam_f * var
