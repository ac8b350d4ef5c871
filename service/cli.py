"""`reward-service`: the one command-line entry point.

Heavy subcommands (training, evaluation) import torch lazily, so the runtime commands stay
torch-free. User errors print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from service.settings import get_settings

app = typer.Typer(
    help="TextNorm-calibrated CLIP reward service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
world_app = typer.Typer(help="The shapes world: prompts and rendered images.", no_args_is_help=True)
app.add_typer(world_app, name="world")

F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """Turn domain errors (ValueError and subclasses, missing files) into one-line exits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@world_app.command("render")
@user_errors
def world_render(
    out: Annotated[Path, typer.Option(help="PNG file to write")],
    count: Annotated[int, typer.Option(help="number of objects, 1-6")] = 1,
    colour: Annotated[str, typer.Option("--colour", "--color")] = "red",
    shape: Annotated[str, typer.Option()] = "circle",
    background: Annotated[str, typer.Option()] = "white",
    seed: Annotated[int, typer.Option()] = 0,
    mismatch: Annotated[
        str | None,
        typer.Option(help="render a scene off in this attribute: count|colour|shape|background"),
    ] = None,
    size: Annotated[int, typer.Option(min=32, max=2048)] = 128,
) -> None:
    """Render one image; print its prompt and ground truth as JSON."""
    import numpy as np

    from shapes_world.grammar import describe
    from shapes_world.perturb import perturb
    from shapes_world.render import render
    from shapes_world.scene import Caption, Group, Scene

    scene = Scene(groups=(Group(count, colour, shape),), background=background)
    shown = perturb(scene, mismatch, np.random.default_rng(seed)) if mismatch else scene
    rendered = render(shown, seed, size)
    rendered.image.save(out)
    print(
        json.dumps(
            {
                "file": str(out),
                "prompt": describe(Caption.of(scene)),
                "matches_prompt": shown == scene,
                "scene": shown.to_json(),
            }
        )
    )


@world_app.command("sample")
@user_errors
def world_sample(
    out: Annotated[Path, typer.Option(help="directory for PNGs and ground_truth.jsonl")],
    n: Annotated[int, typer.Option(min=1, max=100_000)] = 16,
    seed: Annotated[int, typer.Option()] = 0,
    kinds: Annotated[int, typer.Option(min=1, max=2, help="object kinds per image")] = 1,
    mismatched: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="fraction rendered one attribute off")
    ] = 0.0,
) -> None:
    """Sample random prompt/image pairs (optionally mismatched) with their ground truth."""
    import numpy as np
    from rich.progress import track

    from shapes_world.grammar import describe
    from shapes_world.perturb import perturb, perturb_composition
    from shapes_world.render import render
    from shapes_world.sampling import random_scene
    from shapes_world.scene import Caption
    from shapes_world.vocab import ATTRIBUTES

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in track(range(n), description="rendering", transient=True, disable=n < 200):
        scene = random_scene(rng, kinds)
        shown, attr = scene, None
        if rng.random() < mismatched:
            attr = "composition" if kinds == 2 else ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
            shown = perturb_composition(scene, rng) if kinds == 2 else perturb(scene, attr, rng)
        name = f"{i:06d}.png"
        render(shown, seed * 1_000_003 + i).image.save(out / name)
        lines.append(
            {
                "file": name,
                "prompt": describe(Caption.of(scene)),
                "matches_prompt": attr is None,
                "mismatch": attr,
                "scene": shown.to_json(),
            }
        )
    (out / "ground_truth.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"wrote {n} images and ground_truth.jsonl to {out}")


@app.command("train-clip")
@user_errors
def train_clip_cmd(
    out: Annotated[Path, typer.Option(help="directory to save_pretrained the model into")],
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="[default: 2000]")] = None,
    images: Annotated[int | None, typer.Option(min=256, help="[default: 24000]")] = None,
    batch_size: Annotated[int | None, typer.Option(min=8, help="[default: 192]")] = None,
) -> None:
    """Train the shapes-world CLIP from a seed (the shipped model: seed 0, the defaults)."""
    from export.train_clip import TrainConfig, train_clip

    given = {"steps": steps, "images": images, "batch_size": batch_size}
    cfg = TrainConfig(seed=seed, **{k: v for k, v in given.items() if v is not None})
    stats = train_clip(cfg, out)
    print(f"saved to {out}: loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}")


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
    _print_report(report)


@app.command("prompts")
@user_errors
def prompts_cmd(
    prompt: Annotated[str, typer.Argument(help="the prompt to contrast")],
    rule: Annotated[str, typer.Option(help="counting|composition|attributes|auto")] = "auto",
    file: Annotated[
        Path | None, typer.Option(help='JSON {"prompt": ["contrastive", ...]} to look up first')
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
) -> None:
    """Contrastive prompts for TextNorm (from a rule, or from an imported JSON file)."""
    from service.contrastive import contrastive_prompts, load_prompt_sets

    supplied = load_prompt_sets(file) if file else {}
    result = supplied[prompt] if prompt in supplied else contrastive_prompts(prompt, rule)
    print(json.dumps(result) if as_json else "\n".join(result))


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
    _print_report(report)


@app.command("serve")
@user_errors
def serve_cmd(
    model: Annotated[
        str | None, typer.Option(help="checkpoint dir or hub id [default: shipped]")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="gateway bind address [default: 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="gateway port [default: 8000]")] = None,
) -> None:
    """Export if needed, start Triton and the gateway; Ctrl-C stops both."""
    import logging

    from service.launcher import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"model": model, "host": host, "port": port}.items() if v}
    settings = get_settings().model_copy(update=overrides)
    if model:  # the shipped head belongs to the shipped model only
        settings = settings.model_copy(update={"head": None})
    serve(settings)


@app.command("score")
@user_errors
def score_cmd(
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG/WebP files")],
    prompt: Annotated[str, typer.Option(help="the prompt every image is scored against")],
    url: Annotated[str, typer.Option(help="gateway URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="REWARD_API_KEY", help="Bearer key")] = None,
    contrastive: Annotated[
        list[str] | None, typer.Option(help="contrastive prompt (repeatable) [default: rule]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the full JSON response")] = False,
) -> None:
    """Score images against a prompt through a running service (a person at a terminal)."""
    import httpx

    from textnorm_reward_client import RewardClient, RewardServiceError

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {missing[0]}")
    textnorm = {"contrastive": contrastive} if contrastive else None
    with RewardClient(url, api_key=api_key, attempts=2) as client:
        try:
            response = client.score(list(images), prompt, textnorm=textnorm)
        except RewardServiceError as exc:
            raise ValueError(str(exc)) from None
        except httpx.TransportError as exc:
            raise ValueError(f"cannot reach {url}: {exc}") from None
    if as_json:
        print(json.dumps(response))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{prompt!r} — model {response['provenance']['model']['name']}")
    fields = [
        f
        for f in ("raw", "textnorm", "head", "textnorm_head", "ensemble_uw")
        if f in response["results"][0]
    ]
    table.add_column("image")
    for field in fields:
        table.add_column(field, justify="right")
    for path, result in zip(images, response["results"], strict=True):
        table.add_row(
            path.name, *(f"{result[f]:.4f}" if result[f] is not None else "-" for f in fields)
        )
    Console(file=sys.stdout).print(table)


@app.command("export")
@user_errors
def export_cmd(
    out: Annotated[Path, typer.Option(help="Triton model repository to write")],
    model: Annotated[
        str | None, typer.Option(help="checkpoint dir or hub id [default: shipped]")
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(help="learned head dir [default: shipped head with the shipped model]"),
    ] = None,
    no_head: Annotated[bool, typer.Option("--no-head", help="export CLIP rewards only")] = False,
    target: Annotated[str, typer.Option(help="cpu | gpu")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 | fp16 (gpu)")] = "fp32",
    max_batch: Annotated[int, typer.Option(help="max batch (TensorRT profile max)")] = 64,
    queue_delay_us: Annotated[
        int | None, typer.Option(help="dynamic batching max queue delay [default: settings]")
    ] = None,
) -> None:
    """Export a CLIP checkpoint (+ head) to ONNX/TensorRT as a Triton model repository."""
    from export.repository import ExportOptions, export_repository

    settings = get_settings()
    head_dir = None if no_head else head or (settings.head if model is None else None)
    options = ExportOptions(
        target=target,
        precision=precision,
        max_batch=max_batch,
        queue_delay_us=settings.triton_queue_delay_us if queue_delay_us is None else queue_delay_us,
        textnorm_scale=settings.textnorm_scale,
        ensemble_lambda=settings.ensemble_lambda,
    )
    prov, changed = export_repository(
        model or settings.model, out, Path(head_dir) if head_dir else None, options
    )
    state = "exported" if changed else "up to date (cache key unchanged)"
    print(f"{out}: {state}; {len(prov['artifacts'])} artifacts, cache key {prov['cache_key'][:16]}")


@app.command("verify")
@user_errors
def verify_cmd(
    repo: Annotated[Path, typer.Argument(help="exported repository")],
    prompts: Annotated[int, typer.Option(min=1, help="held-out prompts")] = 5,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Exported files (ONNX Runtime) vs the PyTorch reference; non-zero exit past tolerance."""
    from export.verify import verify_repository

    report = verify_repository(repo, n_prompts=prompts)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "cases": report.cases,
                    "max_diff": report.max_diff,
                    "tolerances": report.tolerances,
                }
            )
        )
    else:
        for name, diff in report.max_diff.items():
            tol = report.tolerances.get(name)
            verdict = "reported" if tol is None else ("ok" if diff <= tol else "FAIL")
            print(
                f"{name:22s} max |diff| {diff:.2e}  tolerance {tol if tol else '-':>8}  {verdict}"
            )
        print(f"{report.cases} held-out image/prompt cases: {'OK' if report.ok else 'FAILED'}")
    if not report.ok:
        raise typer.Exit(1)


bench_app = typer.Typer(help="Benchmarks (medians of several runs).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("encoders")
@user_errors
def bench_encoders_cmd(
    repo: Annotated[Path, typer.Option(help="exported repository of the model to benchmark")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    runs: Annotated[int, typer.Option(min=1)] = 5,
    vit_b32: Annotated[bool, typer.Option(help="also a ViT-B/32-sized random-init CLIP")] = True,
) -> None:
    """Image-encoder images/s: PyTorch eager vs ONNX Runtime at batch 1, 8, 32."""
    from export.bench import bench_image_encoder, vit_b32_checkpoint
    from export.clip_model import load_clip
    from export.repository import ExportOptions, export_repository, read_provenance
    from service.settings import REPO_ROOT

    prov = read_provenance(repo)
    if prov is None:
        raise ValueError(f"not an exported repository (no readable provenance.json): {repo}")
    bundle = load_clip(prov["model"]["source"])
    models = {
        "shipped" if prov["model"]["source"] == get_settings().model else prov["model"]["source"]: (
            bundle,
            repo,
        )
    }
    if vit_b32:
        cache = REPO_ROOT / ".cache"
        ckpt = vit_b32_checkpoint(cache / "vit-b32-random", bundle)
        vit_repo = cache / "repositories" / "vit-b32-random"
        vit_repo.parent.mkdir(parents=True, exist_ok=True)
        export_repository(str(ckpt), vit_repo, None, ExportOptions())
        models["vit-b32 (random init)"] = (load_clip(ckpt), vit_repo)
    results = {
        name: bench_image_encoder(b, r / "image_encoder" / "1" / "model.onnx", runs=runs)
        for name, (b, r) in models.items()
    }
    if as_json:
        print(json.dumps(results))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="image encoder, images/s (median of runs; preprocessing included)")
    for col in ("model", "batch", "torch eager", "onnxruntime", "ratio"):
        table.add_column(col, justify="right")
    for name, res in results.items():
        for b, rate in res["torch"].items():
            ort_rate = res["onnxruntime"][b]
            table.add_row(name, str(b), f"{rate:.1f}", f"{ort_rate:.1f}", f"{ort_rate / rate:.2f}x")
    Console(file=sys.stdout).print(table)


@bench_app.command("serving")
@user_errors
def bench_serving_cmd(
    seconds: Annotated[float, typer.Option(min=0.5, help="length of each timed window")] = 5.0,
    runs: Annotated[int, typer.Option(min=1, help="timed windows per point (median)")] = 3,
    concurrency: Annotated[str, typer.Option(help="comma-separated client counts")] = "1,8,32",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Images/s through the gateway and direct gRPC, next to the in-process ONNX Runtime ceiling."""
    import tempfile

    from loadtest.serving import bench_serving

    levels = tuple(int(c) for c in concurrency.split(","))
    with tempfile.TemporaryDirectory() as work:
        result = bench_serving(Path(work), levels, seconds, runs)
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    best = max(result["ceiling_onnxruntime"].values())
    table = Table(title=f"images/s (median of {runs} × {seconds:.0f} s; 1 image per request)")
    for col in ("path", "concurrency / batch", "images/s", "vs best in-process ceiling"):
        table.add_column(col, justify="right")
    for path in ("gateway", "grpc", "ceiling_onnxruntime"):
        for level, rate in result[path].items():
            table.add_row(path, str(level), f"{rate:.1f}", f"{rate / best:.2f}")
    Console(file=sys.stdout).print(table)


def _print_report(report: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    categories = list(next(iter(report.values())))
    table = Table(title="mean per-prompt AUROC (held-out shapes-world benchmark)")
    table.add_column("reward")
    for cat in categories:
        table.add_column(cat, justify="right")
    for name, row in report.items():
        table.add_row(name, *(f"{row[c]:.3f}" for c in categories))
    Console(file=sys.stdout).print(table)


if __name__ == "__main__":
    app()
