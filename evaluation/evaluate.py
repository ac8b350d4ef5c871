"""Score the world's benchmark and report mean per-prompt AUROC for every reward.

Each benchmark prompt is encoded once, together with its contrastive prompts (from the rule that
matches its category: ``service.contrastive.CONTRASTIVE_RULES``). Both reward models — raw CLIP
and the learned head — then score every image against [prompt, contrastive prompts...], and each
reward in `REWARDS` is a function of those score matrices: raw scores, TextNorm over them, and
ensembles of the two TextNorms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress

from evaluation.auroc import mean_per_prompt_auroc
from export.clip_model import ClipBundle, image_embeddings, text_embeddings, tokenize
from export.reward_head import RewardHead
from service.contrastive import CONTRASTIVE_RULES
from service.textnorm import ensemble_mean, ensemble_uncertainty, textnorm
from shapes_world.benchmark import BenchmarkPrompt


@dataclass(frozen=True)
class ScoredPrompt:
    """One benchmark prompt's images scored against [prompt, *contrastive] by each model."""

    prompt: BenchmarkPrompt
    contrastive: list[str]
    clip: np.ndarray  # [N images, 1 + K] cosine similarities
    head: np.ndarray | None  # [N, 1 + K] learned-head logits (see export.reward_head), if any


@dataclass(frozen=True)
class EvalSettings:
    textnorm_scale: float = 5.0
    ensemble_lambda: float = 1.0


def _encode_images(
    bundle: ClipBundle, prompts: list[BenchmarkPrompt], batch: int = 256
) -> np.ndarray:
    items = [item for p in prompts for item in p.items]
    embs: list[np.ndarray] = []
    with Progress(transient=True) as progress:
        task = progress.add_task("encoding benchmark images", total=len(items))
        for start in range(0, len(items), batch):
            chunk = [item.image() for item in items[start : start + batch]]
            px = bundle.processor(images=chunk, return_tensors="pt")["pixel_values"]
            embs.append(image_embeddings(bundle.model, px).numpy())
            progress.advance(task, len(chunk))
    return np.concatenate(embs)


def _encode_texts(bundle: ClipBundle, texts: list[str], batch: int = 512) -> np.ndarray:
    return np.concatenate(
        [
            text_embeddings(bundle.model, tokenize(bundle.tokenizer, texts[i : i + batch])).numpy()
            for i in range(0, len(texts), batch)
        ]
    )


ContrastiveFn = Callable[[BenchmarkPrompt], list[str]]


def category_contrastive(prompt: BenchmarkPrompt) -> list[str]:
    """The per-category rule (``CONTRASTIVE_RULES``): each category's own contrastive set."""
    return CONTRASTIVE_RULES[prompt.category](prompt.prompt)


def encode_benchmark_images(bundle: ClipBundle, prompts: list[BenchmarkPrompt]) -> list[np.ndarray]:
    """Every prompt's image embeddings [N, D] (encode once, score with several rules)."""
    images = _encode_images(bundle, prompts)
    out, at = [], 0
    for p in prompts:
        out.append(images[at : at + len(p.items)])
        at += len(p.items)
    return out


def score_benchmark(
    bundle: ClipBundle,
    prompts: list[BenchmarkPrompt],
    head: RewardHead | None = None,
    contrastive: ContrastiveFn = category_contrastive,
    images: list[np.ndarray] | None = None,
) -> list[ScoredPrompt]:
    """Score every image against [prompt, *contrastive(prompt)] with CLIP (and the head).

    `images`: precomputed :func:`encode_benchmark_images` (None: encoded here)."""
    images = encode_benchmark_images(bundle, prompts) if images is None else images
    sets = [[p.prompt, *contrastive(p)] for p in prompts]
    flat = [t for s in sets for t in s]
    texts = _encode_texts(bundle, flat)
    out, txt_at = [], 0
    for p, s, img in zip(prompts, sets, images, strict=True):
        txt = texts[txt_at : txt_at + len(s)]
        txt_at += len(s)
        head_scores = None
        if head is not None:
            with torch.no_grad():
                head_scores = head.logits(
                    torch.from_numpy(img)[:, None], torch.from_numpy(txt)[None]
                ).numpy()
        out.append(ScoredPrompt(p, s[1:], img @ txt.T, head_scores))
    return out


RewardFn = Callable[[ScoredPrompt, EvalSettings], np.ndarray]


def _tn(scores: np.ndarray, s: EvalSettings) -> np.ndarray:
    return textnorm(scores.astype(np.float64), scale=s.textnorm_scale)


REWARDS: dict[str, RewardFn] = {
    "clip": lambda p, s: p.clip[:, 0],
    "head": lambda p, s: p.head[:, 0],
    "textnorm_clip": lambda p, s: _tn(p.clip, s),
    "textnorm_head": lambda p, s: _tn(p.head, s),
    "ensemble_mean": lambda p, s: ensemble_mean(np.stack([_tn(p.clip, s), _tn(p.head, s)])),
    "ensemble_uw": lambda p, s: ensemble_uncertainty(
        np.stack([_tn(p.clip, s), _tn(p.head, s)]), lam=s.ensemble_lambda
    ),
}
CLIP_ONLY = ("clip", "textnorm_clip")


def evaluate(
    scored: list[ScoredPrompt], settings: EvalSettings | None = None
) -> dict[str, dict[str, float]]:
    """{reward name: {category: mean per-prompt AUROC}}; head rewards only if a head scored."""
    settings = settings or EvalSettings()
    has_head = all(p.head is not None for p in scored)
    categories = list(dict.fromkeys(p.prompt.category for p in scored))
    report: dict[str, dict[str, float]] = {}
    for name, fn in REWARDS.items():
        if not has_head and name not in CLIP_ONLY:
            continue
        report[name] = {}
        for cat in categories:
            rows = [(fn(p, settings), p.prompt.labels) for p in scored if p.prompt.category == cat]
            report[name][cat] = mean_per_prompt_auroc(rows)[0]
    return report
