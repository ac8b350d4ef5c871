"""The two-model TextNorm ensemble evaluation (`reward-service eval-ensemble`,
evaluation/ensemble.py), on a small benchmark (2 prompts × 8 images per category).

The tests that score images need the shipped second member models/shapes-clip-b (`reward-service
train-clip --member shapes-clip-b`) and are skipped while it is not trained (its training.json
is written last). ENSEMBLE_TEST_MEMBER points them at another checkpoint with the shipped
tokenizer (for development only; the numbers of an untrained checkpoint mean nothing).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.auroc import mean_per_prompt_auroc
from evaluation.commands import (
    _served_max_contrastive,
    _served_tokenizer,
    _served_vocabulary,
    app,
)
from evaluation.ensemble import (
    ENSEMBLE_ROWS,
    ROWS,
    EnsembleSettings,
    calibrated_choice,
    choose_lambda,
    evaluate_ensemble,
    row_scores,
    score_pairs,
    summarise,
)
from evaluation.evaluate import category_contrastive, score_benchmark
from evaluation.served import served_contrastive
from export.clip_model import check_member, checkpoint_hash, load_clip
from export.tokenizer_build import save_clip_tokenizer, train_bpe
from models import SHIPPED_CALIBRATION_FILE, SHIPPED_MEMBER_DIR, SHIPPED_MODEL_DIR
from service.gateway.calibration import load_calibration, prompt_kind
from service.settings import get_settings
from service.textnorm import ensemble_mean, ensemble_uncertainty, textnorm
from shapes_world.benchmark import CATEGORIES, build_benchmark

MEMBER = Path(os.environ.get("ENSEMBLE_TEST_MEMBER", SHIPPED_MEMBER_DIR))
needs_member = pytest.mark.skipif(
    not (MEMBER / "training.json").is_file(),
    reason=f"{MEMBER} is not trained yet (reward-service train-clip --member shapes-clip-b)",
)
SIZES = {"prompts_per_category": 2, "images_per_prompt": 8}
HELD_OUT = get_settings().benchmark_seed
VALIDATION = get_settings().calibration_seed
SEEDS = (HELD_OUT, 1)
C = 5.0


@pytest.fixture(scope="module")
def bundles():
    return load_clip(SHIPPED_MODEL_DIR), load_clip(MEMBER)


@pytest.fixture(scope="module")
def rules():
    served = served_contrastive(
        _served_tokenizer(str(SHIPPED_MODEL_DIR)),
        _served_max_contrastive(),
        vocabulary=_served_vocabulary(),
    )
    return {"category": category_contrastive, "served": served}


@pytest.fixture(scope="module")
def result(bundles, rules):
    return evaluate_ensemble(
        bundles, rules, EnsembleSettings(SEEDS, VALIDATION, textnorm_scale=C, **SIZES)
    )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@needs_member
def test_rows_are_the_members_textnorms_ensembled(bundles, rules, result):
    """Recomputed here from each member's own score matrices: TextNorm per member, then
    service.textnorm's mean and uncertainty ensembles at the chosen λ, then AUROC."""
    for rule, contrastive in rules.items():
        lam = result[rule]["ensemble_lambda"]
        for seed in SEEDS:
            bench = build_benchmark(seed=seed, **SIZES)
            a, b = (score_benchmark(m, bench, None, contrastive) for m in bundles)
            per_prompt: dict[str, list[np.ndarray]] = {row: [] for row in ROWS}
            for sa, sb in zip(a, b, strict=True):
                assert sa.contrastive == sb.contrastive  # the same prompt set for both models
                pa, pb = textnorm(sa.clip, C), textnorm(sb.clip, C)
                probs = np.stack([pa, pb])
                per_prompt["raw_a"].append(sa.clip[:, 0])
                per_prompt["raw_b"].append(sb.clip[:, 0])
                per_prompt["textnorm_a"].append(pa)
                per_prompt["textnorm_b"].append(pb)
                per_prompt["models_mean"].append(ensemble_mean(probs))
                per_prompt["models_uw"].append(ensemble_uncertainty(probs, lam=lam))
                # a genuinely different second model: its TextNorm is not the first's
                assert not np.allclose(pa, pb)
                # the per-image rows, at a λ that makes the two ensembles differ
                rows = row_scores((sa, sb), C, C, 2.0)
                np.testing.assert_allclose(rows["models_mean"], (pa + pb) / 2, atol=1e-12)
                np.testing.assert_allclose(
                    rows["models_uw"], (pa + pb) / 2 - 2.0 * ((pa - pb) / 2) ** 2, atol=1e-12
                )
            got = result[rule]["per_seed"][seed]
            for row in ROWS:
                for cat in CATEGORIES:
                    want = mean_per_prompt_auroc(
                        [
                            (s, p.labels)
                            for s, p in zip(per_prompt[row], bench, strict=True)
                            if p.category == cat
                        ]
                    )[0]
                    assert _same(got[row][cat], want), (rule, seed, row, cat)


@needs_member
def test_lambda_is_chosen_on_the_validation_seed_only(bundles, rules, result):
    other = evaluate_ensemble(
        bundles, rules, EnsembleSettings((2,), VALIDATION, textnorm_scale=C, **SIZES)
    )
    validation = score_pairs(bundles, build_benchmark(seed=VALIDATION, **SIZES), rules)
    for rule in rules:
        # other evaluation seeds (no held-out seed at all): the same λ and validation AUROCs
        assert other[rule]["ensemble_lambda"] == result[rule]["ensemble_lambda"]
        assert (
            other[rule]["validation_auroc_by_lambda"]
            == (result[rule]["validation_auroc_by_lambda"])
        )
        lam, by_lambda = choose_lambda(validation[rule], C)
        assert lam == result[rule]["ensemble_lambda"]
        assert set(by_lambda) == {0.0, 0.5, 1.0, 2.0}
        assert by_lambda[lam] == max(by_lambda.values())
        assert lam == min(x for x, v in by_lambda.items() if v == by_lambda[lam])  # ties: first
        for x, v in by_lambda.items():
            assert result[rule]["validation_auroc_by_lambda"][str(x)] == pytest.approx(v)
    with pytest.raises(ValueError, match="validation seed"):
        EnsembleSettings((HELD_OUT, VALIDATION), VALIDATION)


@needs_member
def test_spread_fields_are_the_per_seed_values_summarised(result):
    for rule, res in result.items():
        per_seed, summary = res["per_seed"], res["summary"]
        assert list(per_seed) == list(SEEDS)
        for row in ROWS:
            for cat in CATEGORIES:
                values = np.array([per_seed[s][row][cat] for s in SEEDS])
                got = summary["rows"][row][cat]
                assert _same(got["mean"], values.mean()), (rule, row, cat)
                assert _same(got["std"], values.std(ddof=1))
                assert _same(got["min"], values.min()) and _same(got["max"], values.max())
        for row in ENSEMBLE_ROWS:
            for cat in CATEGORIES:
                ens = [per_seed[s][row][cat] for s in SEEDS]
                a = [per_seed[s]["textnorm_a"][cat] for s in SEEDS]
                b = [per_seed[s]["textnorm_b"][cat] for s in SEEDS]
                got = summary["ensembles"][row][cat]
                assert got["seeds"] == len(SEEDS)
                assert got["beats_a"] == sum(e > x for e, x in zip(ens, a, strict=True))
                assert got["beats_b"] == sum(e > x for e, x in zip(ens, b, strict=True))
                assert got["beats_both"] == sum(
                    e > x and e > y for e, x, y in zip(ens, a, b, strict=True)
                )
                diffs = [e - max(x, y) for e, x, y in zip(ens, a, b, strict=True)]
                assert _same(got["diff_to_better_mean"], float(np.mean(diffs)))


def _rows(tn_a: float, tn_b: float, mean: float, uw: float) -> dict[str, dict[str, float]]:
    values = {"raw_a": 0.5, "raw_b": 0.5, "textnorm_a": tn_a, "textnorm_b": tn_b}
    values |= {"models_mean": mean, "models_uw": uw}
    return {row: {"counting": v} for row, v in values.items()}


def test_summarise_counts_strict_wins_over_each_member():
    summary = summarise(
        {
            1: _rows(0.80, 0.70, 0.85, 0.80),  # mean beats both; uw ties A: no win over A
            2: _rows(0.70, 0.90, 0.80, 0.95),  # mean beats A only; uw beats both
            3: _rows(0.60, 0.60, 0.60, 0.61),  # mean ties both; uw beats both
        }
    )
    mean, uw = (
        summary["ensembles"]["models_mean"]["counting"],
        (summary["ensembles"]["models_uw"]["counting"]),
    )
    assert (mean["beats_a"], mean["beats_b"], mean["beats_both"]) == (2, 1, 1)
    assert (uw["beats_a"], uw["beats_b"], uw["beats_both"]) == (2, 3, 2)
    assert mean["diff_to_better_mean"] == pytest.approx((0.05 - 0.10 + 0.0) / 3)
    assert (mean["diff_to_better_min"], mean["diff_to_better_max"]) == pytest.approx((-0.1, 0.05))
    tn_a = summary["rows"]["textnorm_a"]["counting"]
    assert tn_a["mean"] == pytest.approx(0.7)
    assert tn_a["std"] == pytest.approx(0.1)  # sample std (ddof 1) of 0.8, 0.7, 0.6
    assert (tn_a["min"], tn_a["max"]) == pytest.approx((0.6, 0.8))


def _copy_checkpoint(tmp_path: Path) -> Path:
    member = tmp_path / "member"
    shutil.copytree(SHIPPED_MODEL_DIR, member)
    return member


def test_a_member_with_another_tokenizer_is_refused(tmp_path):
    member = _copy_checkpoint(tmp_path)
    (member / "tokenizer.json").unlink()
    save_clip_tokenizer(*train_bpe(["a red circle", "two blue squares"] * 50, 300), member)
    with pytest.raises(ValueError, match=r"another tokenizer"):
        check_member(load_clip(SHIPPED_MODEL_DIR), load_clip(member))
    res = CliRunner().invoke(
        app, ["eval-ensemble", "--member", str(member), "--out", str(tmp_path / "out")]
    )
    assert res.exit_code == 2
    assert "another tokenizer" in res.output and "share the first model's tokenizer" in res.output
    assert not (tmp_path / "out").exists()


@needs_member
def test_calibrated_rows_score_each_model_at_its_own_c_and_the_models_lambda(bundles, rules):
    """The served rows at the calibration: per prompt, A's TextNorm at A's calibrated c, B's at
    B's own (the file's `members` entry), the ensemble at `models_lambda`: recomputed here from
    the file itself; and B's c really differs from A's somewhere, so the test can tell."""
    calibration = load_calibration(SHIPPED_CALIBRATION_FILE)
    member_sha = checkpoint_hash(MEMBER)
    assert member_sha in calibration.members
    choice = calibrated_choice(calibration, member_sha, 5.0, 1.0)
    got = evaluate_ensemble(
        bundles,
        {"served": rules["served"]},
        EnsembleSettings((1,), VALIDATION, **SIZES),
        {"served": choice},
    )["served"]
    assert got["ensemble_lambda"] == "calibrated"
    bench = build_benchmark(seed=1, **SIZES)
    a, b = (score_benchmark(m, bench, None, rules["served"]) for m in bundles)
    uw: list[np.ndarray] = []
    scales_differ = False
    for sa, sb in zip(a, b, strict=True):
        kind = calibration.prompt_kinds[prompt_kind(sa.prompt.prompt)]
        c_b = calibration.members[member_sha].prompt_kinds[prompt_kind(sa.prompt.prompt)]
        scales_differ |= c_b != kind.scale
        assert choice((sa, sb)) == (kind.scale, c_b, kind.models_lambda)  # the gateway's lookup
        probs = np.stack([textnorm(sa.clip, kind.scale), textnorm(sb.clip, c_b)])
        uw.append(ensemble_uncertainty(probs, lam=kind.models_lambda))
    assert scales_differ
    for cat in CATEGORIES:
        rows = [(s, p.labels) for s, p in zip(uw, bench, strict=True) if p.category == cat]
        assert _same(got["per_seed"][1]["models_uw"][cat], mean_per_prompt_auroc(rows)[0]), cat


def test_the_command_refuses_tuning_seeds_and_a_member_that_is_the_model(tmp_path):
    member = _copy_checkpoint(tmp_path)
    cases = {
        f"{HELD_OUT},{VALIDATION}": "validation seed",
        "1,1": "repeat",
        "1,x": "--seeds",
    }
    for seeds, message in cases.items():
        res = CliRunner().invoke(app, ["eval-ensemble", "--member", str(member), "--seeds", seeds])
        assert res.exit_code == 2 and message in res.output, (seeds, res.output)
    res = CliRunner().invoke(app, ["eval-ensemble", "--member", str(member), "--seeds", "1"])
    assert res.exit_code == 2 and "same checkpoint" in res.output, res.output


@needs_member
def test_the_command_writes_json_and_markdown_with_every_category(tmp_path, result):
    out = tmp_path / "results"
    args = ["eval-ensemble", "--member", str(MEMBER), "--out", str(out), "--json"]
    args += ["--seeds", ",".join(map(str, SEEDS)), "--textnorm-scale", str(C)]
    args += ["--prompts-per-category", "2", "--images-per-prompt", "8"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    document = json.loads((out / "ensemble-two-models.json").read_text())
    assert json.loads(res.stdout) == document
    assert document["benchmark"]["seeds"] == list(SEEDS)
    assert document["benchmark"]["validation_seed"] == VALIDATION
    assert document["models"]["b"]["image_size"] != document["models"]["a"]["image_size"]
    markdown = (out / "ensemble-two-models.md").read_text()
    # the shipped calibration has B's own c: the served rows at the calibrated c come too
    assert set(document["contrastive"]) == {"category", "served", "served_calibrated"}
    shipped = load_calibration(SHIPPED_CALIBRATION_FILE)
    assert document["calibration"]["sha256"] == shipped.sha256
    calibrated = document["contrastive"].pop("served_calibrated")
    assert calibrated["ensemble_lambda"] == "calibrated"
    assert f"from the calibration {shipped.sha256[:12]}" in markdown
    assert set(calibrated["per_seed"]) == {str(s) for s in SEEDS}
    for rule, res_rule in document["contrastive"].items():
        assert res_rule["ensemble_lambda"] == result[rule]["ensemble_lambda"]
        for seed in SEEDS:
            for row in ROWS:
                assert set(res_rule["per_seed"][str(seed)][row]) == set(CATEGORIES)
                for cat in CATEGORIES:
                    assert _same(
                        res_rule["per_seed"][str(seed)][row][cat],
                        result[rule]["per_seed"][seed][row][cat],
                    )
        assert f"Chosen λ = {res_rule['ensemble_lambda']:g}" in markdown
        stats = res_rule["summary"]["rows"]["textnorm_b"]["counting"]
        assert f"{stats['mean']:.3f} ± {stats['std']:.3f}" in markdown
    header = "| reward | " + " | ".join(CATEGORIES) + " |"
    assert markdown.count(header) == 3  # one table per contrastive rule, every category
    assert markdown.count("beats both members on k/N seeds") == 6  # 2 ensembles × 3 rules
    for row in ROWS:
        assert markdown.count(f"`{row}`") >= 2
