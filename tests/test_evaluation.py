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


def test_served_rows_score_the_auto_rule_at_each_kinds_calibrated_scale(shipped_model):
    """The served rows use the gateway's auto rule (binding sets for compositions) and the c a
    calibration gives each prompt kind; the category rows keep their own rules."""
    from textnorm_reward_client.clip_tokenizer import ClipTokenizer

    from evaluation.evaluate import encode_benchmark_images
    from evaluation.report import category_rows, markdown_table, served_rows
    from service.contrastive import contrastive_prompts
    from service.gateway.calibration import calibration_document, parse_calibration

    bundle = load_clip(shipped_model)
    bench = build_benchmark(
        seed=9, prompts_per_category=2, images_per_prompt=10, categories=("counting", "composition")
    )
    calibration = parse_calibration(
        calibration_document(
            checkpoint_sha256="x",
            validation_seed=0,
            grid={},
            categories={},
            prompt_kinds={
                "composition": {"scale": 20.0, "ensemble_lambda": 1.0},
                "single_object": {"scale": 3.0, "ensemble_lambda": 1.0},
            },
        )
    )
    images = encode_benchmark_images(bundle, bench)
    tokenizer = ClipTokenizer(f"{shipped_model}/tokenizer.json")
    table, rows = served_rows(
        bundle,
        bench,
        None,
        images,
        tokenizer=tokenizer,
        max_contrastive=31,
        scale=5.0,
        lam=1.0,
        calibration=calibration,
    )
    assert list(rows) == ["served_raw", "served_textnorm"]  # no head: CLIP fields only
    for p, scores in zip(bench, table, strict=True):
        assert set(scores["textnorm_scale"]) == {20.0 if p.category == "composition" else 3.0}
    scored = score_benchmark(bundle, bench, images=images)
    for p in scored:
        auto = contrastive_prompts(p.prompt.prompt, "auto")
        rule = "binding" if p.prompt.category == "composition" else "counting"
        assert p.contrastive == contrastive_prompts(p.prompt.prompt, rule)
        assert (p.contrastive == auto) == (p.prompt.category == "composition")
    report = category_rows(scored, 5.0, 1.0) | rows
    assert report["served_raw"] == report["clip"]  # the raw reward needs no contrastive set
    table_md = markdown_table(report)
    assert "| `served_textnorm` |" in table_md and "| `paper: TextNorm` | 0.807 |" in table_md


def test_eval_json_is_strict_json_with_nan_as_null():
    # `eval --json` printed bare NaN for a category without a two-class prompt: strict parsers
    # (jq, JavaScript, Go) refuse the whole document.
    import json

    from evaluation.commands import _strict_json

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    document = {"raw_clip": {"counting": float("nan"), "color": 0.75}, "seeds": (1, float("inf"))}
    parsed = json.loads(_strict_json(document), parse_constant=refuse)
    assert parsed == {"raw_clip": {"counting": None, "color": 0.75}, "seeds": [1, None]}
