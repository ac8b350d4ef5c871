"""DDIM sampling with per-step log-probabilities (the ddpo-pytorch algorithm, eta > 0).

With eta > 0 each DDIM step x_t → x_{t-1} is a Gaussian with mean μ_θ(x_t, t) and standard
deviation σ_t = eta · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)), so the policy's
log-likelihood of a trajectory is the sum of per-step Gaussian log-densities. As in ddpo-pytorch,
`log_prob` is the per-step log-density averaged over pixels (not summed), and the predicted x_0
is clipped to [-1, 1] (pixel space) while ε stays as predicted (diffusers' DDIM does the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Descending timesteps, 'leading' spacing with steps_offset 1 (as Stable Diffusion's DDIM):
    951, 901, …, 1, so the last step (to ᾱ_0) keeps a non-zero variance."""
    if not 1 <= num_steps < num_train_timesteps:  # t = steps × ratio + 1 must stay below it
        raise ValueError(f"ddim steps must be in 1..{num_train_timesteps - 1}, got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1) * ratio + 1


def _alpha(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t, with t < 0 meaning the final step's ᾱ_0 (set_alpha_to_one=False, as SD's DDIM)."""
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], alphas_cumprod[0])


def ddim_step_with_logprob(
    alphas_cumprod: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    x_t: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step: (x_{t-1}, log p(x_{t-1} | x_t)) per sample; `prev_sample` given → its
    log-probability under the current ε (the DDPO ratio's numerator), else a fresh draw."""
    if eta <= 0:
        raise ValueError("log-probabilities need a stochastic sampler: eta > 0")
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a_t = _alpha(alphas_cumprod, t).view(shape).to(x_t)
    a_prev = _alpha(alphas_cumprod, prev_t).view(shape).to(x_t)
    x0 = ((x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=1e-20).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_sample = mean + std * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.ndim)))


def guided_eps(
    unet: UNet2DConditionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guided ε: ε_u + w (ε_c − ε_u), one batched UNet call."""
    if guidance == 1.0:
        return unet(x, t.expand(len(x)), cond).sample
    both = unet(
        torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([null.expand_as(cond), cond])
    ).sample
    eps_u, eps_c = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@dataclass
class Trajectory:
    images: torch.Tensor  # float [N, 3, H, W], the final x_0 in [-1, 1]
    latents: torch.Tensor  # float [N, S + 1, 3, H, W]: x_T, …, x_0
    log_probs: torch.Tensor  # float [N, S]
    timesteps: torch.Tensor  # int [S]


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    alphas_cumprod: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor,
    num_steps: int,
    eta: float,
    guidance: float,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """DDIM from pure noise, keeping every latent and step log-probability."""
    n, size = len(cond), unet.config.sample_size
    device = cond.device
    x = torch.randn((n, 3, size, size), generator=generator, device=device)
    timesteps = ddim_timesteps(num_steps, len(alphas_cumprod)).to(device)
    ratio = len(alphas_cumprod) // num_steps
    latents, log_probs = [x], []
    for t in timesteps:
        eps = guided_eps(unet, x, t, cond, null, guidance)
        x, lp = ddim_step_with_logprob(
            alphas_cumprod, eps, t.expand(n), (t - ratio).expand(n), x, eta, generator=generator
        )
        latents.append(x)
        log_probs.append(lp)
    return Trajectory(x.clamp(-1, 1), torch.stack(latents, 1), torch.stack(log_probs, 1), timesteps)
