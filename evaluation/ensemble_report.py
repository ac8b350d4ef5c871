"""The markdown report of `reward-service eval-ensemble` (see :mod:`evaluation.ensemble`).

One table per contrastive rule: every row × category as "mean ± std" over the benchmark seeds,
then per ensemble row how many seeds it beats both members' TextNorm and the mean difference to
the better member (with its range over seeds, so a difference can be told from noise).
"""

from __future__ import annotations

from typing import Any

from evaluation.ensemble import ENSEMBLE_ROWS, ROWS

RULE_TITLES = {
    "category": "each category's own contrastive rule",
    "served": "the served `auto` rule (cut and de-duplicated as the gateway does) at one c for "
    "both models",
    "served_calibrated": "the served `auto` rule at the calibrated c of each model and the "
    "models' λ (what a two-model export bundling that calibration serves)",
}
ROW_LABELS = {
    "raw_a": "`raw_a` (A: raw cosine)",
    "raw_b": "`raw_b` (B: raw cosine)",
    "textnorm_a": "`textnorm_a`",
    "textnorm_b": "`textnorm_b`",
    "models_mean": "`models_mean` (mean of the two TextNorms)",
    "models_uw": "`models_uw` (uncertainty-regularised, λ)",
}


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def rule_table(result: dict[str, Any]) -> list[str]:
    """Markdown lines of one contrastive rule's result (`evaluate_ensemble(...)[rule]`)."""
    rows, ensembles = result["summary"]["rows"], result["summary"]["ensembles"]
    categories = list(rows[ROWS[0]])
    lines = [
        "| reward | " + " | ".join(categories) + " |",
        "| --- |" + " --- |" * len(categories),
    ]
    for row in ROWS:
        cells = [f"{rows[row][c]['mean']:.3f} ± {rows[row][c]['std']:.3f}" for c in categories]
        lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |")
    for row in ENSEMBLE_ROWS:
        cells = []
        for c in categories:
            e = ensembles[row][c]
            cells.append(
                f"{e['beats_both']}/{e['seeds']} (A {e['beats_a']}, B {e['beats_b']}; "
                f"Δ {_signed(e['diff_to_better_mean'])} "
                f"[{_signed(e['diff_to_better_min'])}, {_signed(e['diff_to_better_max'])}])"
            )
        lines.append(
            f"| `{row}` beats both members on k/N seeds (each member's count; Δ to the better "
            "member: mean [range]) | " + " | ".join(cells) + " |"
        )
    return lines


def markdown_report(document: dict[str, Any]) -> str:
    """The whole report: a header naming the models, c, seeds and λ, then one table per rule."""
    a, b = document["models"]["a"], document["models"]["b"]
    bench = document["benchmark"]
    lines = [
        "# Two-model TextNorm ensemble: mean per-prompt AUROC over benchmark seeds",
        "",
        f"- member A: `{a['name']}` (checkpoint {a['checkpoint_sha256'][:12]}, "
        f"{a['image_size']} px); member B: `{b['name']}` (checkpoint "
        f"{b['checkpoint_sha256'][:12]}, {b['image_size']} px); same tokenizer",
        f"- TextNorm c = {document['textnorm_scale']:g}; benchmark seeds "
        f"{', '.join(str(s) for s in bench['seeds'])} (held-out {bench['held_out_seed']}), "
        f"{bench['prompts_per_category']} prompts × {bench['images_per_prompt']} images per "
        "category; cells: mean ± std (ddof 1) over the seeds",
        f"- λ of `models_uw` chosen on the validation seed {bench['validation_seed']} only, from "
        f"{{{', '.join(f'{x:g}' for x in document['lambda_grid'])}}}, by mean AUROC over "
        "categories",
        "- an ensemble beats a member on a seed when its AUROC is strictly greater than that "
        "member's TextNorm; Δ = ensemble − the better member's TextNorm, seed by seed",
    ]
    for rule, result in document["contrastive"].items():
        if result["ensemble_lambda"] == "calibrated":
            cal = document["calibration"]
            chosen = (
                f"Each model's c and the models' λ per prompt kind from the calibration "
                f"{cal['sha256'][:12]} (`calibrate --member`, validation seed "
                f"{cal['validation_seed']}), as the gateway serving a two-model export uses them."
            )
        else:
            by_lambda = ", ".join(
                f"{k}: {v:.4f}" for k, v in result["validation_auroc_by_lambda"].items()
            )
            chosen = (
                f"Chosen λ = {result['ensemble_lambda']:g}, c = {document['textnorm_scale']:g} "
                f"(validation mean AUROC by λ: {by_lambda})."
            )
        lines += ["", f"## {RULE_TITLES.get(rule, rule)}", "", chosen, "", *rule_table(result)]
    return "\n".join(lines) + "\n"
