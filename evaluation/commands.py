"""The evaluation commands (torch side), mounted by the one CLI (`service/cli.py`).

`eval` (mean per-prompt AUROC of every reward on the held-out benchmark) and `train-head` (trains
the learned head, then reports its AUROC). Torch is imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from service.cli_support import print_auroc_report, user_errors
from service.settings import get_settings

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
    prompts_per_category: Annotated[int, typer.Option(min=1)] = 10,
    images_per_prompt: Annotated[int, typer.Option(min=2)] = 50,
    seed: Annotated[int | None, typer.Option(help="benchmark seed [default: settings]")] = None,
    textnorm_scale: Annotated[
        float | None, typer.Option(help="TextNorm c [default: settings]")
    ] = None,
) -> None:
    """Mean per-prompt AUROC by category and reward on the held-out benchmark."""
    from evaluation.evaluate import EvalSettings, evaluate, score_benchmark
    from export.clip_model import checkpoint_hash, load_clip
    from export.reward_head import load_head
    from shapes_world.benchmark import build_benchmark

    settings = get_settings()
    source = model or settings.model
    bundle = load_clip(source)
    head_dir = None if no_head else head or (settings.head if model is None else None)
    reward_head = None
    if head_dir:
        reward_head, head_config = load_head(Path(head_dir))
        if head_config.get("clip_sha256") not in (None, checkpoint_hash(source)):
            raise ValueError(f"head {head_dir} was trained on a different CLIP than {source}")
    bench = build_benchmark(
        seed=settings.benchmark_seed if seed is None else seed,
        prompts_per_category=prompts_per_category,
        images_per_prompt=images_per_prompt,
    )
    scale = settings.textnorm_scale if textnorm_scale is None else textnorm_scale
    report = evaluate(
        score_benchmark(bundle, bench, reward_head), EvalSettings(scale, settings.ensemble_lambda)
    )
    if as_json:
        print(json.dumps(report))
        return
    print_auroc_report(report)
