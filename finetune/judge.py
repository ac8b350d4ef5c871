"""The ground-truth judge: a supervised CNN attribute classifier on rendered images (32 px, the
shipped generator's resolution, or the `--size` a generator is trained at).

The world knows the truth of rendered images but not of generated ones; the judge, trained on
renders with exact labels, reads count, colour, shape and background back from any image at the
generator's resolution. It stands in for the papers' human raters and never enters a reward.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.world_data import ATTRIBUTE_NAMES, CLASSES, IMAGE_SIZE, check_size, rendered_set


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


# The judge's network works at 32 px: a larger image is first averaged over size/32-px squares
# (a fixed layer, so a judge trained at 64 px costs what one at 32 px does on CPU). The 32-px
# network reads every attribute of 32 px renders at ≥ 0.99; the averaging is learned with
# (the shipped 32-px judge on averaged 64 px renders, never trained on them: count 0.89,
# background 0.84 — a judge is trained at its generator's size).
NETWORK_SIZE = 32


class Judge(nn.Module):
    """Average to 32 px, three conv blocks (32 → 4 px), a shared 256-d layer, one linear head
    per attribute."""

    def __init__(self, width: int = 32, size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.width, self.size = width, size
        self.average = nn.AvgPool2d(size // NETWORK_SIZE) if size > NETWORK_SIZE else nn.Identity()
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        )
        flat = 4 * width * (min(size, NETWORK_SIZE) // 8) ** 2
        self.trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(flat, 256), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(256, len(CLASSES[a])) for a in ATTRIBUTE_NAMES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [N, 3, H, W] in [-1, 1] → logits per attribute."""
        h = self.trunk(self.features(self.average(x)))
        return {a: head(h) for a, head in self.heads.items()}


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def check_reads(judge: Judge, size: int) -> None:
    """A judge reads images of its own resolution only (resizing would judge what the generator
    did not draw): a ValueError that says which judge to train otherwise."""
    if size != judge.size:
        raise ValueError(
            f"the judge reads {judge.size} px images, the generator draws {size} px: judge it "
            f"with a judge of its size (reward-service train-judge --size {size})"
        )


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """uint8 [N, H, W, 3] → int64 [N, 4] predicted class index per attribute.

    The images must be at the judge's resolution (`check_reads`)."""
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected uint8 [N, H, H, 3] images, got shape {tuple(images.shape)}")
    check_reads(judge, images.shape[1])
    judge.eval()
    device = next(judge.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        logits = judge(_to_input(images[start : start + batch_size]).to(device))
        out.append(torch.stack([logits[a].argmax(-1) for a in ATTRIBUTE_NAMES], -1).cpu())
    return torch.cat(out).numpy() if out else np.empty((0, len(ATTRIBUTE_NAMES)), np.int64)


def alignment(judge: Judge, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Fraction of images whose judged attribute equals the prompt's, per attribute, plus `all`
    (every attribute right)."""
    hits = predict(judge, images) == labels
    result = {a: float(hits[:, i].mean()) for i, a in enumerate(ATTRIBUTE_NAMES)}
    result["all"] = float(hits.all(1).mean())
    return result


@dataclass(frozen=True)
class JudgeTrainConfig:
    seed: int = 0
    images: int = 24_000
    held_out: int = 3_000
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 32
    noise_sigma: float = 6.0  # extra pixel noise (grey levels, random up to this) as augmentation
    size: int = IMAGE_SIZE  # px of the renders it learns from and of the images it judges

    def __post_init__(self) -> None:
        check_size(self.size)


def save_judge(judge: Judge, out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()},
        out_dir / "judge.safetensors",
    )
    config = {
        "width": judge.width,
        "size": judge.size,
        "classes": {a: list(CLASSES[a]) for a in CLASSES},
    }
    (out_dir / "judge_config.json").write_text(json.dumps({**config, **meta}, indent=2) + "\n")


def load_judge(path: str | Path, device: str = "cpu") -> Judge:
    path = Path(path)
    if not (path / "judge.safetensors").is_file():
        raise FileNotFoundError(f"not a judge directory (no judge.safetensors): {path}")
    config = json.loads((path / "judge_config.json").read_text())
    judge = Judge(width=config["width"], size=config["size"])
    judge.load_state_dict(load_file(path / "judge.safetensors"))
    return judge.eval().to(device)


def train_judge(
    cfg: JudgeTrainConfig, out_dir: Path, progress: Progress | None = None, device: str = "cpu"
) -> dict:
    """Train from `cfg.seed` on fresh renders; report held-out accuracy per attribute."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    progress = progress or Progress()
    began = time.monotonic()
    with progress:
        train = rendered_set(cfg.images, 5000 + cfg.seed, size=cfg.size, progress=progress)
        held = rendered_set(cfg.held_out, 6000 + cfg.seed, size=cfg.size, progress=progress)
        x_all, y_all = _to_input(train.images).to(device), torch.from_numpy(train.labels).to(device)
        judge = Judge(cfg.width, cfg.size).to(device)
        opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(cfg.images / cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
        task = progress.add_task("training judge", total=steps)
        losses: list[float] = []
        for _epoch in range(cfg.epochs):
            judge.train()
            order = torch.from_numpy(rng.permutation(cfg.images)).to(device)
            for start in range(0, cfg.images, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                x, y = x_all[idx], y_all[idx]
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                sigma = torch.from_numpy(rng.random(len(idx))).float().to(device)
                sigma = sigma * cfg.noise_sigma / 127.5
                x = x + sigma[:, None, None, None] * torch.randn_like(x)
                logits = judge(x)
                loss = sum(
                    F.cross_entropy(logits[a], y[:, i]) for i, a in enumerate(ATTRIBUTE_NAMES)
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                progress.update(
                    task,
                    advance=1,
                    description=f"training judge (loss {np.mean(losses[-50:]):.3f})",
                )
        judge.eval()
        accuracy = alignment(judge, held.images, held.labels)
    stats = {
        "config": asdict(cfg),
        "held_out_accuracy": accuracy,
        "final_loss": float(np.mean(losses[-50:])),
        "train_seconds": round(time.monotonic() - began, 1),
        "device": device,  # seed-reproducible on the CPU; CUDA kernels are not bit-exact
    }
    save_judge(judge, out_dir, stats)
    return stats
