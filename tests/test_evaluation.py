"""The shipped CLIP is genuinely trained, and TextNorm does what the paper says it does."""

import numpy as np
import pytest

from evaluation.evaluate import EvalSettings, evaluate, score_benchmark
from export.clip_model import load_clip
from export.reward_head import load_head
from service.contrastive import CONTRASTIVE_RULES
from service.settings import SHIPPED_HEAD_DIR
from shapes_world.benchmark import CATEGORIES, build_benchmark


@pytest.fixture(scope="module")
def report(shipped_model):
    bundle = load_clip(shipped_model)
    head, _ = load_head(SHIPPED_HEAD_DIR)
    bench = build_benchmark(seed=777, prompts_per_category=8, images_per_prompt=40)
    return evaluate(score_benchmark(bundle, bench, head), EvalSettings())


def test_report_shape(report):
    assert list(report) == [
        "clip",
        "head",
        "textnorm_clip",
        "textnorm_head",
        "ensemble_mean",
        "ensemble_uw",
    ]
    for row in report.values():
        assert list(row) == ["counting", "color", "background", "object", "composition"]
        assert all(0 <= v <= 1 for v in row.values())


def test_shipped_clip_is_trained(report):
    clip = report["clip"]
    for category in ("color", "object", "background"):
        assert clip[category] >= 0.85, (category, clip[category])
    assert clip["counting"] > 0.55
    assert clip["composition"] > 0.55


def test_textnorm_raises_counting_auroc(report):
    assert report["textnorm_clip"]["counting"] > report["clip"]["counting"]


def test_contrastive_rules_cover_exactly_the_benchmark_categories():
    assert list(CONTRASTIVE_RULES) == list(CATEGORIES)


def test_contrastive_rules_never_return_the_prompt():
    for p in build_benchmark(seed=3, prompts_per_category=3, images_per_prompt=2):
        contrastive = CONTRASTIVE_RULES[p.category](p.prompt)
        assert contrastive and p.prompt not in contrastive
        assert len(set(contrastive)) == len(contrastive)


def test_textnorm_of_a_perfect_reward_is_perfect():
    """A sanity check of the plumbing: scores that rank by label give AUROC 1 after TextNorm."""
    from evaluation.evaluate import REWARDS, ScoredPrompt
    from shapes_world.benchmark import build_benchmark as bb

    p = bb(seed=1, prompts_per_category=1, images_per_prompt=20, categories=("counting",))[0]
    labels = p.labels.astype(float)
    clip = np.stack([labels, np.full(20, 0.5), np.full(20, 0.4)], axis=1)
    scored = [ScoredPrompt(p, ["x", "y"], clip, clip)]
    out = evaluate(scored, EvalSettings())
    assert out["textnorm_clip"]["counting"] == 1.0
    assert set(REWARDS) == set(out)
