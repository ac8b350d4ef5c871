"""TextNorm and reward-model ensembles in torch, written to be exported to ONNX.

This mirrors ``service/textnorm.py`` (the numpy reference; see DESIGN.md 2.3 for the maths)
so the calibration can run inside the exported reward graph:

    r̂_k = c · (r_k − min r) / (max r − min r),   TextNorm = softmax(r̂)[0],
    1/|P_valid| when max r == min r;
    ensembles over M models: p̄ = mean_m p_m,  R = p̄ − λ · (1/M) Σ_m (p_m − p̄)².

Export constraints honoured here:

* no Python control flow on tensor *values* (only on static ranks), so tracing is exact;
* no in-place operations on inputs;
* the degenerate case and padding are handled with ``torch.where``; no ``-inf`` logits are
  ever produced: padded entries are replaced by the true prompt's reward before min/max and
  get exactly 0 weight after the exponential, so the softmax denominator is always >= 1.

Shapes: ``rewards`` ``[..., P]`` (typically ``[B, P]``), index 0 the true prompt; ``mask``
bool ``[..., P]`` (``mask[..., 0]`` must be True, padded reward values are ignored); ``scale``
a float, a 0-d tensor or a tensor broadcastable to the leading shape (e.g. ``[B]``).
Computation happens in the dtype of ``rewards``. Unlike the numpy reference, these functions
do not validate values (that would need data-dependent control flow); callers validate
settings (scale > 0, λ >= 0) before building the graph.
"""

from __future__ import annotations

import torch

__all__ = [
    "ensemble_mean_torch",
    "ensemble_uncertainty_torch",
    "textnorm_probabilities_torch",
    "textnorm_torch",
]


def textnorm_probabilities_torch(
    rewards: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full TextNorm softmax ``[..., P]`` (0 on masked entries); see the module docstring."""
    if rewards.dim() < 1:
        raise ValueError("rewards must have shape [..., P]")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    elif mask.shape != rewards.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match rewards shape {tuple(rewards.shape)}"
        )
    mask = mask.to(torch.bool)
    c = torch.as_tensor(scale, dtype=rewards.dtype, device=rewards.device).unsqueeze(-1)

    # Padded entries take the true prompt's reward: min/max are unchanged and any NaN/inf
    # padding never enters the arithmetic. Halving is exact and avoids overflow of max - min.
    r = 0.5 * torch.where(mask, rewards, rewards[..., :1])
    r_min = r.amin(dim=-1, keepdim=True)
    r_max = r.amax(dim=-1, keepdim=True)
    span = r_max - r_min
    degenerate = span == 0
    safe_span = torch.where(degenerate, torch.ones_like(span), span)
    r_hat = torch.where(degenerate, torch.zeros_like(r), c * (r - r_min) / safe_span)

    # Stable softmax over the valid entries; the row max is attained by a valid entry, so the
    # denominator is >= 1.
    row_max = r_hat.amax(dim=-1, keepdim=True)
    e = torch.where(mask, torch.exp(r_hat - row_max), torch.zeros_like(r_hat))
    return e / e.sum(dim=-1, keepdim=True)


def textnorm_torch(
    rewards: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TextNorm reward ``[...]``: the probability of the true prompt (index 0)."""
    return textnorm_probabilities_torch(rewards, scale, mask)[..., 0]


def ensemble_mean_torch(probs: torch.Tensor) -> torch.Tensor:
    """Mean over the M reward models on dim 0: ``[M, ...]`` -> ``[...]``."""
    if probs.dim() < 1 or probs.shape[0] < 1:
        raise ValueError("probs must have shape [M, ...] with M >= 1")
    return probs.mean(dim=0)


def ensemble_uncertainty_torch(
    probs: torch.Tensor, lam: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Uncertainty-regularised ensemble ``p̄ − λ · (1/M) Σ_m (p_m − p̄)²`` (population variance)."""
    mean = ensemble_mean_torch(probs)
    var = (probs - mean).square().mean(dim=0)
    lam_t = torch.as_tensor(lam, dtype=probs.dtype, device=probs.device)
    return mean - lam_t * var
