"""The served reward on the benchmark: what `/v1/score` returns with default settings.

The per-category rows of `evaluate` give each benchmark category its own contrastive rule; the
gateway serves one rule, ``auto`` (binding sets for "<NP1> and <NP2>" prompts, counting plus
attribute swaps otherwise), cut to the gateway's `max_contrastive_prompts`, with prompts the
tokenizer cannot tell apart dropped, at the calibrated c the gateway uses — the calibration the
export bundles (the shipped one with the shipped model) or `textnorm_calibration_file` — or at
the model's c without one (`service.gateway.calibration`). :func:`served_scores` computes
exactly those fields offline; :func:`score_via` asks a running service over REST
(`textnorm_reward_client.RewardClient`) for the same images and prompts, so the two paths can be
compared value by value.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rich.progress import Progress
from textnorm_reward_client.clip_tokenizer import ClipTokenizer
from textnorm_reward_client.results import REWARD_FIELDS

from evaluation.auroc import mean_per_prompt_auroc
from evaluation.evaluate import ContrastiveFn, ScoredPrompt
from service.contrastive import Vocabulary, contrastive_prompts
from service.contrastive.dedupe import normalise
from service.gateway.calibration import Calibration, ScaleChoice
from service.gateway.prompt_set_registry import contrastive_set_sha256
from service.gateway.provenance import MODEL_ENSEMBLE_REWARDS
from service.textnorm import ensemble_mean, ensemble_uncertainty, textnorm
from shapes_world.benchmark import BenchmarkPrompt

# The reward fields of a single-model /v1/score result, in response order.
SERVED_FIELDS: tuple[str, ...] = tuple(f for f in REWARD_FIELDS if f not in MODEL_ENSEMBLE_REWARDS)
ScoreTable = list[dict[str, np.ndarray]]  # per benchmark prompt: field → [N images]


def served_contrastive(
    tokenizer: ClipTokenizer | None,
    max_contrastive: int,
    rule: str = "auto",
    vocabulary: Vocabulary | None = None,
) -> ContrastiveFn:
    """The contrastive set the gateway builds for a prompt by `rule` (service/gateway/scoring.py:
    the rule's output cut to `max_contrastive`, then prompts that tokenise like the prompt or an
    earlier one dropped; `tokenizer` None: compared as text, for a model without a local
    tokenizer.json)."""
    key_of = tokenizer.normalise if tokenizer is not None else normalise

    def build(prompt: BenchmarkPrompt) -> list[str]:
        generated = contrastive_prompts(prompt.prompt, rule, vocabulary=vocabulary)
        keys = [key_of(prompt.prompt)]
        kept = []
        for text in generated[:max_contrastive]:
            key = key_of(text)
            if key not in keys:
                keys.append(key)
                kept.append(text)
        return kept

    return build


ChoiceFn = Callable[[ScoredPrompt], ScaleChoice]


def fixed_choice(scale: float, lam: float) -> ChoiceFn:
    """Every prompt at the same (c, λ): the model's defaults, or a request's override."""
    return lambda _p: ScaleChoice(scale, lam, "default")


def calibrated_choice(calibration: Calibration, default_scale: float, lam: float) -> ChoiceFn:
    """The (c, λ) the gateway picks from a calibration file for a rule-built set."""

    def choose(p: ScoredPrompt) -> ScaleChoice:
        sha = contrastive_set_sha256(p.prompt.prompt, p.contrastive)
        return calibration.choose(p.prompt.prompt, sha, None, None, default_scale, lam)

    return choose


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def served_scores(scored: Sequence[ScoredPrompt], choose: ChoiceFn) -> ScoreTable:
    """Per prompt, the /v1/score fields of every image (head fields only with a head)."""
    table: ScoreTable = []
    for p in scored:
        choice = choose(p)
        clip = p.clip.astype(np.float64)
        row = {"raw": clip[:, 0], "textnorm": textnorm(clip, choice.scale)}
        if p.head is not None:
            logits = p.head.astype(np.float64)
            tn_head = textnorm(logits, choice.scale)
            probs = np.stack([row["textnorm"], tn_head])
            row |= {
                "head": _sigmoid(logits[:, 0]),
                "textnorm_head": tn_head,
                "ensemble_mean": ensemble_mean(probs),
                "ensemble_uw": ensemble_uncertainty(probs, lam=choice.ensemble_lambda),
            }
        row["textnorm_scale"] = np.full(len(clip), choice.scale)
        table.append(row)
    return table


def auroc_rows(
    prompts: Sequence[BenchmarkPrompt], table: ScoreTable, prefix: str
) -> dict[str, dict[str, float]]:
    """{prefix + field: {category: mean per-prompt AUROC}} for every reward field present."""
    categories = list(dict.fromkeys(p.category for p in prompts))
    rows: dict[str, dict[str, float]] = {}
    for name in SERVED_FIELDS:
        if not all(name in scores for scores in table):
            continue
        rows[prefix + name] = {
            cat: mean_per_prompt_auroc(
                [
                    (scores[name], p.labels)
                    for p, scores in zip(prompts, table, strict=True)
                    if p.category == cat
                ]
            )[0]
            for cat in categories
        }
    return rows


def _png(prompt_item: Any) -> bytes:
    buffer = io.BytesIO()
    prompt_item.image().save(buffer, "PNG")
    return buffer.getvalue()


def _results(response: Any) -> list[Any]:
    """`results` of a RewardClient.score answer (a dict today, maybe a typed object later)."""
    return response["results"] if isinstance(response, dict) else list(response.results)


def _provenance(response: Any) -> Any:
    return response["provenance"] if isinstance(response, dict) else response.provenance


def _get(obj: Any, name: str) -> Any:
    """A field of a JSON object or of a typed result (fields it does not know in `extra`)."""
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    extra = getattr(obj, "extra", None)
    return extra.get(name) if value is None and isinstance(extra, dict) else value


def score_via(
    url: str,
    prompts: Sequence[BenchmarkPrompt],
    api_key: str | None = None,
    batch: int = 32,
) -> tuple[ScoreTable, str | None]:
    """Score every benchmark image through a running service's /v1/score (default settings).

    Returns the per-prompt fields (as :func:`served_scores`) and the served checkpoint sha256."""
    from textnorm_reward_client import RewardClient

    table: ScoreTable = []
    checkpoint = None
    total = sum(len(p.items) for p in prompts)
    with RewardClient(url, api_key=api_key) as client, Progress(transient=True) as progress:
        task = progress.add_task(f"scoring through {url}", total=total)
        for p in prompts:
            results: list[Any] = []
            for start in range(0, len(p.items), batch):
                chunk = p.items[start : start + batch]
                response = client.score([_png(item) for item in chunk], p.prompt)
                results += _results(response)
                model = _get(_provenance(response), "model")
                checkpoint = _get(model, "checkpoint_sha256") if model is not None else checkpoint
                progress.advance(task, len(chunk))
            row = {}
            for name in (*SERVED_FIELDS, "textnorm_scale"):
                values = [_get(r, name) for r in results]
                if all(v is not None for v in values):
                    row[name] = np.array(values, np.float64)
            table.append(row)
    return table, checkpoint


def max_differences(offline: ScoreTable, via: ScoreTable) -> dict[str, float]:
    """max |offline − via| per field both paths have, over every benchmark image."""
    out: dict[str, float] = {}
    for name in (*SERVED_FIELDS, "textnorm_scale"):
        if all(name in a and name in b for a, b in zip(offline, via, strict=True)):
            out[name] = max(
                float(np.max(np.abs(a[name] - b[name]))) for a, b in zip(offline, via, strict=True)
            )
    return out
