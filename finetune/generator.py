"""The shapes-world text-to-image generator: a small pixel-space diffusers `UNet2DConditionModel`
conditioned on the shipped CLIP's frozen text encoder, trained with DDPM, sampled with DDIM
(`reward-service train-generator` reproduces the shipped `models/shapes-generator/`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from rich.progress import Progress

from finetune.config import TRAIN_TIMESTEPS
from finetune.text_encoder import TextConditioner
from finetune.world_data import IMAGE_SIZE, check_size, rendered_set

GUIDANCE_SCALE = 3.0  # classifier-free guidance at sampling time (the generator's default)


def unet_config(cross_attention_dim: int, size: int = IMAGE_SIZE) -> dict:
    """At 32 px 1.1 M parameters: 32 → 16 → 8 px (16/32/64 channels), cross-attention at 16
    and 8 px (sized for a training run on two shared CPU cores). Each doubling of the size adds
    a level at the top, so attention stays at 16 and 8 px, its token count unchanged (64 px:
    16/32/64/64 channels, 1.7 M parameters; 128 px: 2.1 M)."""
    levels = check_size(size).bit_length() - 3  # 32 px: 3 levels down to 8 px
    plain = levels - 2
    return dict(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32, 64, 64, 64)[:levels],
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",) * plain,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2", clip_sample=True
    )


def to_model_space(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] → uint8 [N, H, W, 3] (rounded, as a PNG would hold it)."""
    x = ((x.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass(frozen=True)
class GeneratorTrainConfig:
    seed: int = 0
    images: int = 12_000
    steps: int = 800
    batch_size: int = 24
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    uncond_rate: float = 0.1  # prompts dropped to '' for classifier-free guidance
    miscount_rate: float = 0.25  # web-like count noise in captions, as the shipped CLIP had
    ema_decay: float = 0.99
    size: int = IMAGE_SIZE  # px of the renders it learns from and of its samples

    def __post_init__(self) -> None:
        check_size(self.size)


def denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """DDPM ε-prediction loss (the negative ELBO up to weights): per sample if not `reduce`."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(
        0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator, device=x0.device
    )
    noisy = scheduler.add_noise(x0, noise, t)
    pred = unet(noisy, t, cond).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return per_sample.mean() if reduce else per_sample


def save_generator(unet: UNet2DConditionModel, out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out_dir), safe_serialization=True)
    noise_scheduler().save_pretrained(str(out_dir))
    (out_dir / "generator.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_generator(path: str | Path, device: str = "cpu") -> tuple[UNet2DConditionModel, dict]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a generator directory (no config.json): {path}")
    unet = UNet2DConditionModel.from_pretrained(str(path), low_cpu_mem_usage=False).to(device)
    meta_path = path / "generator.json"  # a fine-tuning checkpoint's unet/ has none
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return unet, meta


def train_generator(
    cfg: GeneratorTrainConfig,
    out_dir: Path,
    progress: Progress | None = None,
    log_every: int = 0,
    device: str = "cpu",
) -> dict:
    """Train from `cfg.seed` on rendered one-kind scenes; save the EMA weights into `out_dir`."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    progress = progress or Progress()
    began = time.monotonic()
    with progress:
        data = rendered_set(
            cfg.images, 1000 + cfg.seed, cfg.miscount_rate, cfg.size, progress=progress
        )
        x_all = to_model_space(data.images).to(device)
        text = TextConditioner(device=device)
        cond_all = text.encode(data.prompts)
        null = text.encode([""])[0]
        unet = UNet2DConditionModel(**unet_config(text.dim, cfg.size)).to(device)
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        scheduler = noise_scheduler()
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                min(1.0, (s + 1) / cfg.warmup)
                * 0.5
                * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
            ),
        )
        losses: list[float] = []
        task = progress.add_task("training generator", total=cfg.steps)
        unet.train()
        for _step in range(cfg.steps):
            idx = torch.from_numpy(rng.choice(len(x_all), cfg.batch_size, replace=False))
            x0 = x_all[idx]
            flip = torch.from_numpy(rng.random(cfg.batch_size) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            cond = cond_all[idx].clone()
            drop = torch.from_numpy(rng.random(cfg.batch_size) < cfg.uncond_rate).to(device)
            cond[drop] = null
            loss = denoising_loss(unet, scheduler, x0, cond, gen if device == "cpu" else None)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    ema[k].lerp_(v, 1 - cfg.ema_decay) if v.is_floating_point() else ema[k].copy_(v)
            losses.append(loss.item())
            if log_every and (_step + 1) % log_every == 0:
                progress.console.log(f"step {_step + 1}: loss {np.mean(losses[-log_every:]):.4f}")
            progress.update(
                task,
                advance=1,
                description=f"training generator (loss {np.mean(losses[-50:]):.4f})",
            )
        unet.load_state_dict(ema)
        unet.eval()
    stats = {
        "config": asdict(cfg),
        "unet": unet_config(text.dim, cfg.size),
        "text_encoder": "models/shapes-clip (frozen), last hidden states, 16 tokens",
        "guidance_scale": GUIDANCE_SCALE,
        "image_size": cfg.size,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "first_loss": float(np.mean(losses[:20])),
        "final_loss": float(np.mean(losses[-50:])),
        "train_seconds": round(time.monotonic() - began, 1),
        "device": device,  # seed-reproducible on the CPU; CUDA kernels are not bit-exact
    }
    save_generator(unet, out_dir, stats)
    return stats
