"""The evaluation commands (torch side), mounted by the one CLI (`service/cli.py`).

`eval` (mean per-prompt AUROC of every reward on the held-out benchmark), `calibrate` (c and λ
on the validation seed), `eval-ensemble` (a two-model TextNorm ensemble over several benchmark
seeds) and `train-head` (trains the learned head, then reports its AUROC). Torch is imported
inside the commands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from export.sources import check_local_source
from models import resolve_shipped
from service.cli_support import integer_list, print_auroc_report, user_errors
from service.settings import Settings, get_settings

app = typer.Typer()


@app.command("train-head")
@user_errors
def train_head_cmd(
    out: Annotated[Path, typer.Option(help="directory for head.safetensors + head_config.json")],
    model: Annotated[str | None, typer.Option(help="frozen CLIP [default: shipped]")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    lam: Annotated[float, typer.Option(min=0.0, help="λ of the prompt-classification loss")] = 0.5,
    n_prompts: Annotated[int, typer.Option(min=2, help="N: true + perturbed prompts")] = 10,
    temperature: Annotated[float, typer.Option(min=1e-4, help="T of that softmax")] = 0.1,
    steps: Annotated[int, typer.Option(min=1)] = 3_000,
    prompts: Annotated[int, typer.Option(min=2, help="feedback prompts")] = 1_500,
) -> None:
    """Train the learned reward head (Lee et al.) on simulated feedback; report its AUROC."""
    check_local_source(model)  # before torch loads
    from evaluation.evaluate import EvalSettings, evaluate, score_benchmark
    from export.clip_model import checkpoint_hash, load_clip
    from export.reward_head import save_head
    from export.train_head import HeadConfig, train_head
    from shapes_world.benchmark import build_benchmark

    settings = get_settings()
    source = model or settings.model
    bundle = load_clip(source)
    cfg = HeadConfig(
        seed=seed,
        lam=lam,
        n_prompts=n_prompts,
        temperature=temperature,
        steps=steps,
        prompts=prompts,
    )
    head, stats = train_head(bundle, cfg)
    scored = score_benchmark(bundle, build_benchmark(seed=settings.benchmark_seed), head)
    report = evaluate(scored, EvalSettings(settings.textnorm_scale, settings.ensemble_lambda))
    meta = {
        "clip_sha256": checkpoint_hash(source),
        "training": stats,
        "reported_auroc": {"benchmark_seed": settings.benchmark_seed, **report},
    }
    save_head(head, out, meta)
    loss0, loss1 = stats["loss_before"]["total"], stats["loss_after"]["total"]
    print(f"saved to {out}: loss {loss0:.3f} -> {loss1:.3f}")
    print_auroc_report(report)


def _load_models(model: str | None, head: str | None, no_head: bool):
    """(source, CLIP bundle, head or None): the shipped head goes with the shipped model only."""
    from export.clip_model import checkpoint_hash, load_clip
    from export.reward_head import load_head

    settings = get_settings()
    source = model or settings.model
    bundle = load_clip(source)
    head_dir = None if no_head else head or (settings.head if model is None else None)
    reward_head = None
    if head_dir:
        reward_head, head_config = load_head(Path(head_dir))
        if head_config.get("clip_sha256") not in (None, checkpoint_hash(source)):
            raise ValueError(f"head {head_dir} was trained on a different CLIP than {source}")
    return source, bundle, reward_head


def _served_tokenizer(source: str):
    """The tokenizer the gateway uses for `source` (its tokenizer.json), if it is local."""
    from textnorm_reward_client.clip_tokenizer import ClipTokenizer

    path = Path(source) / "tokenizer.json"
    return ClipTokenizer(path) if path.is_file() else None  # None: compare prompts as text


def _served_max_contrastive() -> int:
    """Contrastive prompts per prompt the gateway keeps (Scorer.max_contrastive)."""
    from service import model_contract

    return min(get_settings().max_contrastive_prompts, model_contract.MAX_PROMPTS - 1)


def _served_vocabulary():
    from service.contrastive import load_vocabulary

    file = get_settings().contrastive_vocabulary_file
    return load_vocabulary(file) if file else None


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[
        str | None, typer.Option(help="checkpoint dir or hub id [default: shipped]")
    ] = None,
    head: Annotated[
        str | None, typer.Option(help="reward-head dir [default: shipped, with the shipped model]")
    ] = None,
    no_head: Annotated[bool, typer.Option("--no-head", help="evaluate CLIP rewards only")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print a markdown table")] = False,
    prompts_per_category: Annotated[int, typer.Option(min=1)] = 10,
    images_per_prompt: Annotated[int, typer.Option(min=2)] = 50,
    seed: Annotated[int | None, typer.Option(help="benchmark seed [default: settings]")] = None,
    textnorm_scale: Annotated[
        float | None, typer.Option(help="TextNorm c [default: settings]")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="calibration JSON (`calibrate`): per-category c/λ for the category rows, and "
            "the c/λ the gateway would pick for the served rows [default: settings' "
            "textnorm_calibration_file, else the one the export bundles: the shipped one with "
            "the shipped model]"
        ),
    ] = None,
    no_calibration: Annotated[
        bool, typer.Option("--no-calibration", help="the model's c everywhere (no calibration)")
    ] = False,
    via: Annotated[
        str | None,
        typer.Option(help="also score the benchmark through a running service at this URL"),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="REWARD_EVAL_API_KEY", help="Bearer key for --via")
    ] = None,
    via_batch: Annotated[int, typer.Option(min=1, help="images per /v1/score call")] = 32,
) -> None:
    """Mean per-prompt AUROC by category: per-category-rule rows and the served default's rows
    (exactly what /v1/score returns with default settings); --via proves the two paths equal."""
    if calibration is not None and (no_calibration or textnorm_scale is not None):
        raise ValueError("--calibration does not combine with --no-calibration or --textnorm-scale")
    check_local_source(model)  # before torch loads
    from evaluation.evaluate import encode_benchmark_images, score_benchmark
    from evaluation.report import category_rows, served_rows
    from export.clip_model import checkpoint_hash
    from shapes_world.benchmark import build_benchmark

    settings = get_settings()
    source, bundle, reward_head = _load_models(model, head, no_head)
    seed = settings.benchmark_seed if seed is None else seed
    scale = settings.textnorm_scale if textnorm_scale is None else textnorm_scale
    # What a served export uses: the gateway's setting, else the calibration `export` bundles
    # (the shipped one fits the shipped model only). --textnorm-scale asks for one c everywhere.
    calib = None
    if not no_calibration and textnorm_scale is None:
        calib = _bundled_or_given(
            calibration or settings.textnorm_calibration_file or settings.calibration,
            checkpoint_hash(source),
            explicit=bool(calibration or settings.textnorm_calibration_file),
        )
    if calib is not None:
        _check_out_of_sample(calib, (seed,))
    bench = build_benchmark(
        seed=seed, prompts_per_category=prompts_per_category, images_per_prompt=images_per_prompt
    )
    images = encode_benchmark_images(bundle, bench)
    scored = score_benchmark(bundle, bench, reward_head, images=images)
    report = category_rows(scored, scale, settings.ensemble_lambda, calib)
    served_table, rows = served_rows(
        bundle,
        bench,
        reward_head,
        images,
        tokenizer=_served_tokenizer(source),
        max_contrastive=_served_max_contrastive(),
        vocabulary=_served_vocabulary(),
        scale=scale,
        lam=settings.ensemble_lambda,
        calibration=calib,
    )
    report |= rows
    differences = None
    if via is not None:
        from evaluation.served import auroc_rows, max_differences, score_via

        via_table, served_checkpoint = score_via(via, bench, api_key, via_batch)
        if served_checkpoint not in (None, checkpoint_hash(source)):
            raise ValueError(f"{via} serves checkpoint {served_checkpoint[:12]}, not {source}")
        report |= auroc_rows(bench, via_table, "via_")
        differences = max_differences(served_table, via_table)
        auroc_gap = max(
            abs(report[f"served_{f}"][c] - report[f"via_{f}"][c])
            for f in differences
            if f"served_{f}" in report
            for c in report[f"served_{f}"]
        )
        differences["auroc"] = auroc_gap
    if as_json:
        out = dict(report)
        if differences is not None:
            out["via_max_abs_difference"] = differences
        print(_strict_json(out))
        return
    if markdown:
        from evaluation.report import markdown_table

        print(markdown_table(report))
    else:
        print_auroc_report(report)
    if differences is not None:
        print(
            "served default vs --via, max |difference| over every image: "
            + ", ".join(f"{k} {v:.2e}" for k, v in differences.items())
        )


def _strict_json(document: object, indent: int | None = None) -> str:
    """JSON every parser reads: NaN (a category without a two-class prompt) becomes null."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(document), indent=indent, allow_nan=False)


def _bundled_or_given(path: Path | str | None, checkpoint_sha256: str, explicit: bool):
    """An explicitly given calibration (refused if it does not fit the checkpoint), or the
    configured default, which the export bundles only where it fits (export/repository.py)."""
    from export.repository import is_shipped_calibration

    if not path:
        return None
    try:
        return _read_calibration(path, checkpoint_sha256)
    except ValueError:
        if explicit or not is_shipped_calibration(path):
            raise
        return None


def _read_calibration(path: Path | str | None, checkpoint_sha256: str):
    if path is None:
        return None
    from service.gateway.calibration import load_calibration

    return load_calibration(path, checkpoint_sha256)


@app.command("calibrate")
@user_errors
def calibrate_cmd(
    out: Annotated[Path, typer.Option(help="calibration JSON to write")],
    model: Annotated[str | None, typer.Option(help="checkpoint [default: shipped]")] = None,
    head: Annotated[str | None, typer.Option(help="reward-head dir [default: shipped]")] = None,
    no_head: Annotated[bool, typer.Option("--no-head", help="CLIP only (λ not chosen)")] = False,
    seed: Annotated[
        int | None, typer.Option(help="validation seed [default: settings' calibration_seed]")
    ] = None,
    prompt_sets: Annotated[
        Path | None,
        typer.Option(
            help="prompt-set JSON ({prompt: [contrastive, ...]}): also choose c for its sets, "
            "on the validation prompts it covers"
        ),
    ] = None,
    prompts_per_category: Annotated[int, typer.Option(min=1)] = 10,
    images_per_prompt: Annotated[int, typer.Option(min=2)] = 50,
    scales: Annotated[
        str, typer.Option(help="grid of c, comma-separated (the authors' values, then 20 and 50)")
    ] = "0.1,1,3,5,10,20,50",
    lambdas: Annotated[str, typer.Option(help="grid of λ, comma-separated")] = "0,0.5,1,2",
    member: Annotated[
        list[str] | None,
        typer.Option(
            help="a member model of a multi-model export (repeatable): also choose its own c "
            "and the models' λ (`export --member` bundles the file then)"
        ),
    ] = None,
) -> None:
    """Choose TextNorm's c (and the ensemble's λ) per category, per kind of served prompt and
    per prompt set on a validation seed; write the calibration JSON the gateway reads
    (`REWARD_TEXTNORM_CALIBRATION_FILE`). With --member, each member model gets its own c for
    the same groups, and each group the λ of the models' ensemble at those c."""
    settings = get_settings()
    seed = settings.calibration_seed if seed is None else seed
    held_out = Settings.model_fields["benchmark_seed"].default  # the README's tables' seed
    if seed in (settings.benchmark_seed, held_out):
        raise ValueError(
            f"seed {seed} is a held-out benchmark seed: calibrate on a validation seed"
        )
    grids = {"scale_grid": _grid(scales, "scales", 0.0), "lambda_grid": _grid(lambdas, "lambdas")}
    members = [resolve_shipped(m) for m in member or []]
    for source in (model, *members):
        check_local_source(source)  # all of the above before torch loads
    from evaluation import calibrate as cal
    from evaluation.evaluate import category_contrastive, encode_benchmark_images, score_benchmark
    from evaluation.served import served_contrastive
    from export.clip_model import check_member, checkpoint_hash, load_clip
    from service.contrastive import load_prompt_sets
    from service.contrastive.dedupe import normalise
    from service.gateway.calibration import calibration_document, parse_calibration
    from shapes_world.benchmark import build_benchmark

    source, bundle, reward_head = _load_models(model, head, no_head)
    member_shas = [checkpoint_hash(m) for m in members]
    if len({checkpoint_hash(source), *member_shas}) != 1 + len(members):
        raise ValueError("a member is the model itself or another member: members must differ")
    member_bundles = [load_clip(m) for m in members]
    for other in member_bundles:
        check_member(bundle, other)
    bench = build_benchmark(
        seed=seed, prompts_per_category=prompts_per_category, images_per_prompt=images_per_prompt
    )
    served = served_contrastive(
        _served_tokenizer(source),
        _served_max_contrastive(),
        vocabulary=_served_vocabulary(),
    )
    rules = {"category": category_contrastive, "served": served}
    if prompt_sets is not None:
        sets = {normalise(k): v for k, v in load_prompt_sets(prompt_sets).items()}
        covered = [i for i, p in enumerate(bench) if normalise(p.prompt) in sets]
        if not covered:
            raise ValueError(
                f"{prompt_sets}: none of its prompts is a validation prompt of seed {seed}; "
                "calibrating a set needs labelled images of its prompt"
            )
        rules["sets"] = lambda p: sets[normalise(p.prompt)][: _served_max_contrastive()]
    # every model scores the benchmark with every rule: [model][rule] → scored prompts
    scored: list[dict] = []
    for k, model_bundle in enumerate((bundle, *member_bundles)):
        images = encode_benchmark_images(model_bundle, bench)
        model_head = reward_head if k == 0 else None
        by_rule = {}
        for rule, contrastive in rules.items():
            prompts, imgs = bench, images
            if rule == "sets":
                prompts, imgs = [bench[i] for i in covered], [images[i] for i in covered]
            by_rule[rule] = score_benchmark(model_bundle, prompts, model_head, contrastive, imgs)
        scored.append(by_rule)
    by_category = cal.by_category(scored[0]["category"], **grids)
    by_kind = cal.by_prompt_kind(scored[0]["served"], **grids)
    set_categories = cal.by_category(scored[0]["sets"], **grids) if "sets" in rules else {}
    member_sections: dict = {
        sha: {"name": Path(m).name} for m, sha in zip(members, member_shas, strict=True)
    }
    for part, rule, first, grouping in (
        ("categories", "category", by_category, cal.groups_by_category),
        ("prompt_kinds", "served", by_kind, cal.groups_by_prompt_kind),
        ("prompt_sets", "sets", set_categories, cal.groups_by_category),
    ):
        if rule not in rules or not members:
            continue
        models = [s[rule] for s in scored]
        chosen = cal.with_members(first, grouping(models[0]), models, **grids)
        for sha, choices in zip(member_shas, chosen, strict=True):
            member_sections[sha][part] = (
                cal.per_set(choices, models[0]) if part == "prompt_sets" else choices
            )
    by_set = cal.per_set(set_categories, scored[0]["sets"]) if "sets" in rules else {}
    document = calibration_document(
        checkpoint_sha256=checkpoint_hash(source),
        validation_seed=seed,
        grid={"scale": list(grids["scale_grid"]), "ensemble_lambda": list(grids["lambda_grid"])},
        categories=by_category,
        prompt_kinds=by_kind,
        prompt_sets=by_set,
        members=member_sections,
        extra={
            "benchmark": {
                "prompts_per_category": prompts_per_category,
                "images_per_prompt": images_per_prompt,
            },
            "criterion": "max mean per-prompt AUROC of textnorm (c), then of ensemble_uw (λ); "
            "members: their own textnorm (c), then the models' ensemble_uw (models_lambda)",
        },
    )
    parse_calibration(document)  # what the gateway will read back
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_strict_json(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} (validation seed {seed})")
    for group, part, choices in (
        ("category", "categories", by_category),
        ("served kind", "prompt_kinds", by_kind),
    ):
        for name, choice in choices.items():
            line = f"  {group} {name}: c = {choice['scale']:g}, λ = {choice['ensemble_lambda']:g}"
            if members:
                line += "".join(
                    f"; {section['name']} c = {section[part][name]['scale']:g}"
                    for section in member_sections.values()
                )
                line += f"; models λ = {choice['models_lambda']:g}"
            print(line)
    if by_set:
        print(f"  {len(by_set)} prompt sets of {prompt_sets} calibrated")


def _grid(text: str, name: str, above: float | None = None) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 or (above is not None and v <= above) for v in values):
        raise ValueError(f"--{name}: expected positive numbers, got {text!r}")
    return values


def _seeds(text: str | None, held_out: int) -> tuple[int, ...]:
    return (held_out, 1, 2, 3) if text is None else tuple(integer_list(text, "--seeds"))


def _model_identity(source: str, bundle) -> dict:
    from export.clip_model import checkpoint_hash, local_checkpoint_dir

    return {
        "name": Path(source).name,
        "source": source,
        "checkpoint_sha256": checkpoint_hash(local_checkpoint_dir(source)),
        "image_size": bundle.model.config.vision_config.image_size,
    }


def _ensemble_calibration(
    path: Path | None, checkpoint_sha256: str, member_sha256: str, seeds: tuple[int, ...]
):
    """The calibration eval-ensemble's calibrated rows use, as `eval` picks one: `path`, else
    the gateway's file, else the one the export bundles; None when one not given by --calibration
    has no c of the member's own (an explicitly given one must have). Refused when it chose c
    on an evaluation seed, or does not say which seed it chose c on."""
    settings = get_settings()
    calibration = _bundled_or_given(
        path or settings.textnorm_calibration_file or settings.calibration,
        checkpoint_sha256,
        bool(path or settings.textnorm_calibration_file),
    )
    if calibration is None:
        return None
    if not calibration.calibrates_member(member_sha256):
        if path is not None:
            raise ValueError(
                f"{path}: no c of member {member_sha256[:12]}'s own for every prompt kind: "
                "calibrate --member"
            )
        return None
    _check_out_of_sample(calibration, seeds)
    return calibration


def _check_out_of_sample(calibration, seeds) -> None:
    """A calibration's rows are a measurement only on seeds it did not choose c on."""
    if calibration.validation_seed is None:
        raise ValueError(
            "the calibration does not say which seed it chose c on (no validation_seed), so "
            "its rows may be in-sample: recalibrate, or pass --no-calibration"
        )
    if calibration.validation_seed in seeds:
        raise ValueError(
            f"seed {calibration.validation_seed} is the seed this calibration chose c on: its "
            "rows would be in-sample; evaluate another seed, or pass --no-calibration"
        )


@app.command("eval-ensemble")
@user_errors
def eval_ensemble_cmd(
    model: Annotated[str | None, typer.Option(help="member A [default: shipped]")] = None,
    member: Annotated[
        str | None,
        typer.Option(help="member B, same tokenizer [default: models/shapes-clip-b]"),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="benchmark seeds, comma-separated [default: the held-out seed, then 1,2,3]"
        ),
    ] = None,
    prompts_per_category: Annotated[int, typer.Option(min=1)] = 10,
    images_per_prompt: Annotated[int, typer.Option(min=2)] = 50,
    textnorm_scale: Annotated[
        float | None, typer.Option(help="TextNorm c [default: settings]")
    ] = None,
    out: Annotated[Path, typer.Option(help="directory for ensemble-two-models.{json,md}")] = Path(
        "evaluation/results"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON document")] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="calibration JSON with a c for member B (`calibrate --member`): adds the "
            "served rows at each model's calibrated c and the models' λ [default: the one "
            "the export bundles, when it calibrates B]"
        ),
    ] = None,
    no_calibration: Annotated[
        bool, typer.Option("--no-calibration", help="no calibrated rows")
    ] = False,
) -> None:
    """Mean per-prompt AUROC of two different CLIPs' TextNorm rewards and their mean and
    uncertainty-regularised ensembles (λ chosen on the validation seed), spread over seeds;
    with a calibration that has B's c, also the served rows at the calibrated c and λ."""
    check_local_source(model)  # before torch loads
    check_local_source(member)
    from evaluation.ensemble import EnsembleSettings, calibrated_choice, evaluate_ensemble
    from evaluation.ensemble_report import markdown_report
    from evaluation.evaluate import category_contrastive
    from evaluation.served import served_contrastive
    from export.clip_model import check_member, load_clip, local_checkpoint_dir
    from models import SHIPPED_MEMBER_DIR

    settings = get_settings()
    source = model or settings.model
    member_source = member or str(SHIPPED_MEMBER_DIR)
    config = EnsembleSettings(
        seeds=_seeds(seeds, settings.benchmark_seed),
        validation_seed=settings.calibration_seed,
        prompts_per_category=prompts_per_category,
        images_per_prompt=images_per_prompt,
        textnorm_scale=settings.textnorm_scale if textnorm_scale is None else textnorm_scale,
    )
    if config.validation_seed == settings.benchmark_seed:
        raise ValueError(
            f"validation seed {config.validation_seed} is the held-out benchmark seed: "
            "λ must be chosen on another seed"
        )
    member_dir = local_checkpoint_dir(member_source)
    if member is None and not (member_dir / "training.json").is_file():
        raise ValueError(
            f"{member_dir} is not trained (yet): reward-service train-clip --member "
            f"shapes-clip-b --out {member_dir}"
        )
    bundles = (load_clip(source), load_clip(member_source))
    check_member(*bundles)
    identities = [
        _model_identity(s, b) for s, b in zip((source, member_source), bundles, strict=True)
    ]
    if identities[0]["checkpoint_sha256"] == identities[1]["checkpoint_sha256"]:
        raise ValueError(f"{member_source} is the same checkpoint as {source}: nothing to ensemble")
    served = served_contrastive(
        _served_tokenizer(source), _served_max_contrastive(), vocabulary=_served_vocabulary()
    )
    rules = {"category": category_contrastive, "served": served}
    cal = None
    if not no_calibration:
        cal = _ensemble_calibration(
            calibration,
            identities[0]["checkpoint_sha256"],
            identities[1]["checkpoint_sha256"],
            config.seeds,
        )
    calibrated = {}
    if cal is not None:
        rules["served_calibrated"] = served
        calibrated["served_calibrated"] = calibrated_choice(
            cal,
            identities[1]["checkpoint_sha256"],
            settings.textnorm_scale,
            settings.ensemble_lambda,
        )
    document = {
        "models": dict(zip("ab", identities, strict=True)),
        "textnorm_scale": config.textnorm_scale,
        "lambda_grid": list(config.lambda_grid),
        "benchmark": {
            "seeds": list(config.seeds),
            "held_out_seed": settings.benchmark_seed,
            "validation_seed": config.validation_seed,
            "prompts_per_category": prompts_per_category,
            "images_per_prompt": images_per_prompt,
        },
        "criterion": "λ: max mean AUROC of models_uw over categories on the validation seed",
        "calibration": None
        if cal is None
        else {"sha256": cal.sha256, "validation_seed": cal.validation_seed},
        "contrastive": evaluate_ensemble(bundles, rules, config, calibrated),
    }
    out.mkdir(parents=True, exist_ok=True)
    text = _strict_json(document, indent=2) + "\n"
    (out / "ensemble-two-models.json").write_text(text, encoding="utf-8")
    (out / "ensemble-two-models.md").write_text(markdown_report(document), encoding="utf-8")
    if as_json:
        print(text, end="")
    else:
        print(markdown_report(document), end="")
        print(f"wrote {out / 'ensemble-two-models.json'} and {out / 'ensemble-two-models.md'}")
