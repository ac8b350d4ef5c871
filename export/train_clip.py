"""Train the shipped shapes-world CLIP from a seed (`reward-service train-clip`).

Contrastive training as in CLIP, with one change that the known ground truth allows: targets are
soft over *every* caption that is true of an image (captions come at several levels of detail,
so "three triangles" is true of many images in a batch), and each batch adds hard negatives —
captions of one-attribute-off scenes — as extra texts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from transformers import CLIPModel

from export.clip_model import ClipBundle, image_processor, save_clip, tiny_clip_config, tokenize
from export.tokenizer_build import BOS, EOS, save_clip_tokenizer, train_bpe
from models import resolve_shipped
from shapes_world.features import encode, truth_matrix
from shapes_world.grammar import describe
from shapes_world.perturb import perturb, perturb_composition
from shapes_world.render import render
from shapes_world.sampling import miscount, random_scene, training_caption
from shapes_world.scene import Caption
from shapes_world.vocab import ATTRIBUTES


@dataclass(frozen=True)
class TrainConfig:
    """The shipped model is the defaults; `MEMBERS` names every shipped ensemble member."""

    seed: int = 0
    images: int = 24_000
    steps: int = 2_000
    batch_size: int = 192
    hard_negatives: int = 64
    miscount_rate: float = 0.25  # web-like caption noise on counts (see sampling.miscount)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    composition_fraction: float = 0.3
    image_size: int = 64
    patch_size: int = 8
    vision_layers: int = 4
    # A checkpoint directory whose BPE (vocab.json + merges.txt) to reuse instead of training
    # one: ensemble members share the token ids, so one tokenisation serves every member.
    tokenizer_from: str | None = None


# The shipped CLIPs, by directory name under models/. The second member differs from the first
# where an ensemble needs it to: its image tower (48 px input, 6 px patches, 5 layers — the
# same 64 patch tokens at a coarser resolution, one layer deeper), its training data (another
# seed: other scenes and renders) and its caption noise (10 % miscounted instead of 25 %). It
# shares the first member's tokenizer.
MEMBERS: dict[str, TrainConfig] = {
    "shapes-clip": TrainConfig(),
    "shapes-clip-b": TrainConfig(
        seed=1,
        image_size=48,
        patch_size=6,
        vision_layers=5,
        miscount_rate=0.1,
        tokenizer_from="shapes-clip",
    ),
}


def _tokenizer_corpus(rng: np.random.Generator, n: int = 4000) -> list[str]:
    return [describe(training_caption(random_scene(rng, 1 + (i % 3 == 0)), rng)) for i in range(n)]


def _read_bpe(checkpoint: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a checkpoint's CLIP tokenizer files, as `train_bpe` returns them."""
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    lines = (checkpoint / "merges.txt").read_text().splitlines()
    return vocab, [line for line in lines if line and not line.startswith("#version")]


def _hard_negative(scene, rng: np.random.Generator) -> Caption:
    if len(scene.groups) > 1 and rng.random() < 0.5:
        other = perturb_composition(scene, rng)
    else:
        other = perturb(scene, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))], rng)
    return training_caption(other, rng)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows that have at least one positive."""
    rows = targets.sum(-1) > 0
    t = targets[rows] / targets[rows].sum(-1, keepdim=True)
    return -(t * F.log_softmax(logits[rows], dim=-1)).sum(-1).mean()


def train_clip(cfg: TrainConfig, out_dir: Path, progress: Progress | None = None) -> dict:
    """Train from `cfg.seed` and `save_pretrained` into `out_dir`; returns training stats."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    progress = progress or Progress(transient=True)
    with progress:
        if cfg.tokenizer_from is None:
            vocab, merges = train_bpe(_tokenizer_corpus(rng))
        else:
            vocab, merges = _read_bpe(Path(resolve_shipped(cfg.tokenizer_from)))
        tok_dir = out_dir / "_tokenizer"
        tok_dir.mkdir(parents=True, exist_ok=True)
        save_clip_tokenizer(vocab, merges, tok_dir)
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        processor = image_processor(cfg.image_size)

        scenes, pixels = [], []
        task = progress.add_task("rendering training images", total=cfg.images)
        chunk = 500
        for start in range(0, cfg.images, chunk):
            batch = []
            for i in range(start, min(start + chunk, cfg.images)):
                scene = random_scene(rng, 2 if rng.random() < cfg.composition_fraction else 1)
                scenes.append(scene)
                batch.append(render(scene, seed=cfg.seed * 10_000_019 + i).image)
            px = processor(images=batch, return_tensors="np")["pixel_values"]
            pixels.append(torch.from_numpy(px).to(torch.float16))
            progress.advance(task, len(batch))
        pixels_all = torch.cat(pixels)
        scene_codes = np.stack([encode(s) for s in scenes])

        config = tiny_clip_config(
            len(vocab),
            vocab[BOS],
            vocab[EOS],
            cfg.image_size,
            patch_size=cfg.patch_size,
            vision_layers=cfg.vision_layers,
        )
        model = CLIPModel(config)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                min(1.0, (s + 1) / cfg.warmup)
                * 0.5
                * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
            ),
        )
        losses = []
        task = progress.add_task("training CLIP", total=cfg.steps)
        model.train()
        for _step in range(cfg.steps):
            idx = rng.choice(len(scenes), cfg.batch_size, replace=False)
            captions = [training_caption(scenes[i], rng) for i in idx]
            captions = [
                miscount(c, rng) if rng.random() < cfg.miscount_rate else c for c in captions
            ]
            captions += [_hard_negative(scenes[i], rng) for i in idx[: cfg.hard_negatives]]
            truth = truth_matrix(scene_codes[idx], np.stack([encode(c) for c in captions]))
            truth[np.arange(len(idx)), np.arange(len(idx))] = True  # each image's own caption
            targets = torch.from_numpy(truth).float()
            texts = [describe(c) for c in captions]
            ids = tokenize(tokenizer, texts)
            ids = ids[:, : int((ids != vocab[EOS]).sum(1).max()) + 1]  # causal mask: tail is inert
            img = F.normalize(
                model.get_image_features(pixel_values=pixels_all[idx].float()).pooler_output, dim=-1
            )
            txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            loss = 0.5 * (
                _soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.T, targets.T)
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            progress.update(
                task, advance=1, description=f"training CLIP (loss {np.mean(losses[-50:]):.3f})"
            )
        model.eval()
        save_clip(ClipBundle(model, tokenizer, processor, source="trained"), out_dir)
        save_clip_tokenizer(vocab, merges, out_dir)  # also vocab.json + merges.txt, as OpenAI's
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
    stats = {
        "config": asdict(cfg),
        "first_loss": float(np.mean(losses[:20])),
        "final_loss": float(np.mean(losses[-50:])),
    }
    (out_dir / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
