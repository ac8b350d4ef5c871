"""Does a reward rank the generator's own samples the way the judge does?

DDPO normalises rewards per prompt, so what steers it is the order a reward puts on samples of
one prompt. `reward-service finetune reward-signal` samples the generator on a fixed prompt
set, asks the judge which attributes each sample gets right, scores the same samples through
the service under each TextNorm setting asked for, and reports, per reward field, setting and
attribute (count, colour, shape, background, all four), the mean per-prompt AUROC of the reward
against the judge's verdict: the probability that of two samples of one prompt, the one the
judge finds right on that attribute gets the higher reward (ties count one half; 0.5 is no
signal). A prompt whose samples are all right or all wrong on an attribute says nothing about
it and is left out; the number of prompts used is reported beside each value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from finetune.world_data import ATTRIBUTE_NAMES

ATTRIBUTES: tuple[str, ...] = (*ATTRIBUTE_NAMES, "all")
# Rewards that do not depend on the TextNorm options: reported once, not per setting.
SETTING_FREE = ("raw", "head")


@dataclass(frozen=True)
class Setting:
    """One way of asking the service: a label and the request's `textnorm` options."""

    label: str
    textnorm: dict[str, Any] | None


def parse_settings(text: str) -> list[Setting]:
    """ "default,counting,counting@5" → settings: "default" is the service's defaults (its
    `auto` rule and calibrated c); any other word is a TextNorm rule, with "@c" a scale."""
    settings = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        rule, _, scale = word.partition("@")
        options: dict[str, Any] = {} if rule == "default" else {"rule": rule}
        if scale:
            try:
                c = float(scale)
            except ValueError:
                raise ValueError(f"setting {word!r}: {scale!r} is not a number") from None
            if not (math.isfinite(c) and c > 0):
                raise ValueError(f"setting {word!r}: c must be > 0")
            options["scale"] = c
        settings.append(Setting(word, options or None))
    if not settings:
        raise ValueError("no settings given")
    if len({s.label for s in settings}) < len(settings):
        raise ValueError(f"a setting is repeated in {text!r}")
    return settings


def per_prompt_auroc(
    rewards: np.ndarray, correct: np.ndarray, prompt_ids: np.ndarray
) -> tuple[float, int]:
    """Mean over prompts (those with right and wrong samples) of the AUROC of `rewards` for
    `correct`: Mann–Whitney U ÷ (n_right · n_wrong). Returns (mean or NaN, prompts used)."""
    values = []
    for prompt in np.unique(prompt_ids):
        mine = prompt_ids == prompt
        right, wrong = rewards[mine & correct], rewards[mine & ~correct]
        if len(right) and len(wrong):
            u = mannwhitneyu(right, wrong, alternative="two-sided").statistic
            values.append(float(u) / (len(right) * len(wrong)))
    return (float(np.mean(values)) if values else math.nan), len(values)


def judged_correct(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool [N, 5]: the judge's verdict per attribute (ATTRIBUTE_NAMES), then all four."""
    hits = predicted == labels
    return np.concatenate([hits, hits.all(axis=1, keepdims=True)], axis=1)


def signal_rows(
    scored: dict[str, dict[str, np.ndarray]],
    correct: np.ndarray,
    prompt_ids: np.ndarray,
) -> list[dict[str, Any]]:
    """One row per (reward field, setting): {reward, setting, auroc: {attr: v or None when no
    prompt qualifies}, prompts: {attr: n}}. `scored`: setting label → reward field → [N]
    rewards (NaN: not served). Setting-free rewards (raw, head) get one row, from the first
    setting."""
    rows = []
    first = next(iter(scored))
    for label, fields in scored.items():
        for name, values in fields.items():
            if np.isnan(values).any() or (name in SETTING_FREE and label != first):
                continue
            row: dict[str, Any] = {
                "reward": name,
                "setting": "any" if name in SETTING_FREE else label,
                "auroc": {},
                "prompts": {},
            }
            for i, attribute in enumerate(ATTRIBUTES):
                value, used = per_prompt_auroc(values, correct[:, i], prompt_ids)
                row["auroc"][attribute] = None if math.isnan(value) else value  # JSON null
                row["prompts"][attribute] = used
            rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], alignment: dict[str, float]) -> str:
    """The rows as a markdown table, with the samples' judged alignment as its first line."""
    head = "| reward | TextNorm setting | " + " | ".join(ATTRIBUTES) + " |"
    lines = [head, "| --- | --- |" + " ---: |" * len(ATTRIBUTES)]
    lines.append(
        "| *right (share of samples)* | | "
        + " | ".join(f"{alignment[a]:.3f}" for a in ATTRIBUTES)
        + " |"
    )
    for row in rows:
        cells = [
            f"{'–' if row['auroc'][a] is None else format(row['auroc'][a], '.3f')} "
            f"({row['prompts'][a]})"
            for a in ATTRIBUTES
        ]
        lines.append(f"| `{row['reward']}` | {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measure(
    url: str,
    settings: Sequence[Setting],
    *,
    api_key: str | None = None,
    generator: str | None = None,
    judge: str | None = None,
    prompts: int = 48,
    per_prompt: int = 16,
    prompt_seed: int = 0,
    seed: int = 0,
    ddim_steps: int = 10,
    device: str = "cpu",
    batch_size: int = 32,
    images_from: str = "generator",
    size: int | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sample, judge and score (see the module docstring). Returns the JSON report (the
    settings, the samples' judged alignment, one row per (reward, setting), the service's
    export and calibration) and the samples behind it: images, prompts, prompt ids, the judge's
    verdicts and every reward, as "rewards/<setting>/<field>" (an npz, no pickle).

    images_from "rendered": instead of the generator's samples, renders of each prompt's scene
    (half of them) or of that scene with one random attribute changed, at `size` px (default:
    the generator's), with their exact truth in place of the judge's verdict — the reward's
    signal where the images are clean, at the generator's resolution or the reward model's."""
    from rich.progress import Progress
    from textnorm_reward_client import RewardClient

    from finetune.evaluate import generate
    from finetune.generator import load_generator
    from finetune.judge import check_reads, load_judge, predict
    from finetune.reward_client import every_reward
    from finetune.text_encoder import TextConditioner
    from finetune.world_data import (
        IMAGE_SIZE,
        SHIPPED_GENERATOR_DIR,
        SHIPPED_JUDGE_DIR,
        labels_of,
        prompt_of,
        prompt_set,
    )

    scenes = [s for s in prompt_set(prompts, prompt_seed) for _ in range(per_prompt)]
    texts = [prompt_of(s) for s in scenes]
    prompt_ids = np.repeat(np.arange(prompts), per_prompt)
    labels = np.stack([labels_of(s) for s in scenes])
    if images_from == "rendered":
        images, shown = rendered_samples(scenes, seed, size or IMAGE_SIZE)
        correct = judged_correct(np.stack([labels_of(s) for s in shown]), labels)
    elif images_from == "generator":
        unet, _ = load_generator(generator or SHIPPED_GENERATOR_DIR, device)
        reader = load_judge(judge or SHIPPED_JUDGE_DIR, device)
        check_reads(reader, unet.config.sample_size)  # before minutes of sampling
        with Progress() as progress:
            progress.add_task(f"sampling {len(texts)} images", total=None)
            images = generate(
                unet, TextConditioner(device=device), texts, ddim_steps, seed=seed,
                batch_size=batch_size,
            )  # fmt: skip
        correct = judged_correct(predict(reader, images), labels)
    else:
        raise ValueError(f"images_from must be generator or rendered, got {images_from!r}")
    scored: dict[str, dict[str, np.ndarray]] = {}
    provenance: dict[str, Any] = {}
    with RewardClient(url, api_key=api_key) as client, Progress() as progress:
        for setting in settings:
            task = progress.add_task(f"scoring: {setting.label}", total=len(images))
            scored[setting.label], provenance = every_reward(
                client, images, texts, setting.textnorm,
                advance=lambda n, task=task: progress.advance(task, n),
            )  # fmt: skip
    samples = {
        "images": images, "prompts": np.array(texts), "prompt_ids": prompt_ids,
        "correct": correct,
        **{f"rewards/{label}/{name}": values for label, fields in scored.items()
           for name, values in fields.items() if not np.isnan(values).any()},
    }  # fmt: skip
    report = {
        "settings": {s.label: s.textnorm for s in settings},
        "samples": {"prompts": prompts, "per_prompt": per_prompt, "prompt_seed": prompt_seed,
                    "seed": seed, "images_from": images_from, "size": int(images.shape[1]),
                    **({"ddim_steps": ddim_steps,
                        "generator": str(generator or SHIPPED_GENERATOR_DIR),
                        "judge": str(judge or SHIPPED_JUDGE_DIR)}
                       if images_from == "generator" else {})},
        "alignment": {a: float(correct[:, i].mean()) for i, a in enumerate(ATTRIBUTES)},
        "rows": signal_rows(scored, correct, prompt_ids),
        "service": {
            "export_sha256": provenance.get("export_sha256"),
            "calibration_sha256": (provenance.get("textnorm") or {}).get("calibration_sha256"),
        },
    }  # fmt: skip
    return report, samples


def rendered_samples(scenes: Sequence[Any], seed: int, size: int) -> tuple[np.ndarray, list[Any]]:
    """For each prompt scene, a render of it (probability 1/2) or of it with one random
    attribute changed (`shapes_world.perturb`): uint8 [N, size, size, 3] and the scenes shown."""
    from finetune.world_data import render_uint8
    from shapes_world.perturb import perturb

    rng = np.random.default_rng([seed, 29])
    shown = [
        s if rng.random() < 0.5 else perturb(s, str(rng.choice(ATTRIBUTE_NAMES)), rng)
        for s in scenes
    ]
    images = np.stack(
        [render_uint8(s, 2**41 + seed * 10**6 + i, size) for i, s in enumerate(shown)]
    )
    return images, shown
