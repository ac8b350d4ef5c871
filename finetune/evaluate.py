"""Judge alignment of a generator on a fixed prompt set (the baseline row), and image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune.ddim import sample
from finetune.generator import GUIDANCE_SCALE, noise_scheduler, to_uint8
from finetune.judge import Judge, alignment
from finetune.text_encoder import TextConditioner
from finetune.world_data import labels_of, prompt_of, prompt_set


def generate(
    unet,
    text: TextConditioner,
    prompts: list[str],
    ddim_steps: int = 20,
    eta: float = 1.0,
    guidance: float = GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """uint8 [N, H, W, 3] samples for `prompts`, deterministic in `seed` and `batch_size` (one
    random stream drawn batch by batch: another batch size gives other samples)."""
    device = next(unet.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    acp = noise_scheduler().alphas_cumprod.to(device)
    null = text.encode([""])[0]
    unet.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        cond = text.encode(prompts[start : start + batch_size])
        out.append(to_uint8(sample(unet, acp, cond, null, ddim_steps, eta, guidance, gen).images))
    return np.concatenate(out)


def judge_generator(
    unet,
    text: TextConditioner,
    judge: Judge,
    prompts: int = 60,
    per_prompt: int = 4,
    prompt_seed: int = 0,
    seed: int = 0,
    ddim_steps: int = 20,
    guidance: float = GUIDANCE_SCALE,
    batch_size: int = 32,
) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Alignment per attribute on `prompts` fixed prompts x `per_prompt` samples each."""
    scenes = [s for s in prompt_set(prompts, prompt_seed) for _ in range(per_prompt)]
    texts = [prompt_of(s) for s in scenes]
    images = generate(
        unet, text, texts, ddim_steps, guidance=guidance, seed=seed, batch_size=batch_size
    )
    labels = np.stack([labels_of(s) for s in scenes])
    return alignment(judge, images, labels), images, texts


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 3) -> None:
    """Images side by side, `columns` per row, upscaled `scale`x (nearest) for viewing."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)
