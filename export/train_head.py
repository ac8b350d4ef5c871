"""Train the learned reward head from simulated binary feedback (`reward-service train-head`).

Feedback data: prompts from the world, images that either match them or are one attribute off,
each labelled by three noisy annotators (majority vote), as in Lee et al. The CLIP towers stay
frozen: images and prompts are encoded once, then the head trains on embeddings with

    loss = MSE(r(x, y), label) + λ · CE(softmax_k r(x_k, y) / T, k = true prompt)

the second term on positive images only, over the true prompt and N−1 perturbed prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from export.clip_model import ClipBundle, image_embeddings, text_embeddings, tokenize
from export.reward_head import RewardHead
from shapes_world.benchmark import ANNOTATORS
from shapes_world.grammar import describe
from shapes_world.perturb import perturb, perturb_composition
from shapes_world.render import render
from shapes_world.sampling import random_scene
from shapes_world.scene import Caption, Scene
from shapes_world.vocab import ATTRIBUTES


@dataclass(frozen=True)
class HeadConfig:
    seed: int = 0
    prompts: int = 1_500
    images_per_prompt: int = 16
    annotator_error: float = 0.1
    lam: float = 0.5  # weight of the prompt-classification loss
    n_prompts: int = 10  # N: the true prompt + N−1 perturbed ones
    temperature: float = 0.1  # T
    steps: int = 3_000
    batch_size: int = 256
    lr: float = 1e-3
    hidden: int = 256


@dataclass
class FeedbackData:
    images: torch.Tensor  # [M, D] image embeddings
    prompt_of: torch.Tensor  # [M] index of the image's prompt
    labels: torch.Tensor  # [M] majority label (0/1)
    texts: torch.Tensor  # [P, N, D] true prompt (index 0) + perturbed prompts


def _feedback_render_seed(seed: int, prompt: int, image: int) -> int:
    return 3 * 10**9 + seed * 10**7 + prompt * 100 + image


def _perturbed_captions(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    """n distinct prompts each one attribute (or one composition change) away from `scene`."""
    out: dict[str, None] = {}
    true_text = describe(Caption.of(scene))
    for _ in range(50 * n):
        if len(scene.groups) > 1 and rng.random() < 0.5:
            other = perturb_composition(scene, rng)
        else:
            other = perturb(scene, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))], rng)
        text = describe(Caption.of(other))
        if text != true_text:
            out[text] = None
        if len(out) == n:
            break
    return list(out)


def build_feedback(bundle: ClipBundle, cfg: HeadConfig, progress: Progress) -> FeedbackData:
    rng = np.random.default_rng(cfg.seed + 7919)
    scenes, texts, prompt_of, labels, images = [], [], [], [], []
    for p in range(cfg.prompts):
        scene = random_scene(rng, 2 if rng.random() < 0.3 else 1)
        scenes.append(scene)
        texts.append(
            [describe(Caption.of(scene)), *_perturbed_captions(scene, cfg.n_prompts - 1, rng)]
        )
        for j in range(cfg.images_per_prompt):
            shown = scene
            if rng.random() >= 0.5:
                shown = (
                    perturb_composition(scene, rng)
                    if len(scene.groups) > 1 and rng.random() < 0.5
                    else perturb(scene, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))], rng)
                )
            truth = Caption.of(scene).is_true_of(shown)
            votes = sum(truth != (rng.random() < cfg.annotator_error) for _ in range(ANNOTATORS))
            labels.append(float(votes * 2 > ANNOTATORS))
            prompt_of.append(p)
            images.append((shown, _feedback_render_seed(cfg.seed, p, j)))
    task = progress.add_task("encoding feedback images", total=len(images))
    embs = []
    for start in range(0, len(images), 256):
        chunk = [render(s, seed).image for s, seed in images[start : start + 256]]
        px = bundle.processor(images=chunk, return_tensors="pt")["pixel_values"]
        embs.append(image_embeddings(bundle.model, px))
        progress.advance(task, len(chunk))
    width = max(len(t) for t in texts)
    flat = [t for row in texts for t in row + [row[0]] * (width - len(row))]  # pad with the truth
    text_embs = torch.cat(
        [
            text_embeddings(bundle.model, tokenize(bundle.tokenizer, flat[i : i + 512]))
            for i in range(0, len(flat), 512)
        ]
    )
    return FeedbackData(
        images=torch.cat(embs),
        prompt_of=torch.tensor(prompt_of),
        labels=torch.tensor(labels),
        texts=text_embs.view(len(texts), width, -1),
    )


def head_loss(head: RewardHead, data: FeedbackData, idx: torch.Tensor, cfg: HeadConfig) -> tuple:
    """(total, mse, prompt-classification) losses on the examples `idx`."""
    img, prompts = data.images[idx], data.texts[data.prompt_of[idx]]
    reward = head(img, prompts[:, 0])
    mse = F.mse_loss(reward, data.labels[idx])
    positive = data.labels[idx] > 0.5
    if cfg.lam > 0 and positive.any():
        scores = head(img[positive, None, :], prompts[positive]) / cfg.temperature  # [B+, N]
        pc = F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long))
    else:
        pc = torch.zeros(())
    return mse + cfg.lam * pc, mse, pc


def train_head(bundle: ClipBundle, cfg: HeadConfig, progress: Progress | None = None) -> tuple:
    """Returns (head, stats) — stats holds the config and the loss before/after training."""
    torch.manual_seed(cfg.seed)
    progress = progress or Progress(transient=True)
    with progress:
        data = build_feedback(bundle, cfg, progress)
        head = RewardHead(data.images.shape[-1], cfg.hidden)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
        every = torch.arange(len(data.labels))
        with torch.no_grad():
            before = [float(x) for x in head_loss(head, data, every, cfg)]
        gen = torch.Generator().manual_seed(cfg.seed)
        task = progress.add_task("training reward head", total=cfg.steps)
        for _ in range(cfg.steps):
            idx = torch.randint(len(data.labels), (cfg.batch_size,), generator=gen)
            loss, _, _ = head_loss(head, data, idx, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            progress.advance(task)
        head.eval()
        with torch.no_grad():
            after = [float(x) for x in head_loss(head, data, every, cfg)]
    names = ("total", "mse", "prompt_classification")
    stats = {
        "config": asdict(cfg),
        "loss_before": dict(zip(names, before, strict=True)),
        "loss_after": dict(zip(names, after, strict=True)),
        "feedback_positive_rate": float(data.labels.mean()),
    }
    return head, stats
