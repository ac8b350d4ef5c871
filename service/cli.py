"""`reward-service`: the one command-line entry point, for all three roles.

- runtime (here, torch-free): `serve` (one host: export if needed, bundled Triton, gateway),
  `gateway` (REST against a Triton it did not start), `score`, `prompts`, `world`,
  `bench serving`;
- export (torch side, `export/commands.py`): `export`, `verify`, `build-engines`,
  `build-vit-b32`, `train-clip`, `bench encoders`;
- evaluation (torch side, `evaluation/commands.py`): `eval`, `train-head`;
- fine-tuning (torch side, `finetune/commands.py`): `train-judge`, `train-generator`,
  `finetune run | evaluate | compare`.
The torch side's modules import torch inside their commands, so every command is listed (and
the runtime ones run) where torch is not installed. User errors print one line (`error: ...`)
and exit with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from evaluation import commands as evaluation_commands
from export import commands as export_commands
from finetune import commands as finetune_commands
from service.cli_support import user_errors
from service.settings import get_settings

app = typer.Typer(
    help="TextNorm-calibrated CLIP reward service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 127.0.0.1]" is not a markup tag
)
world_app = typer.Typer(help="The shapes world: prompts and rendered images.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(export_commands.app)
app.add_typer(evaluation_commands.app)
app.add_typer(finetune_commands.app)
app.add_typer(finetune_commands.finetune_app, name="finetune")


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


@app.command("prompts")
@user_errors
def prompts_cmd(
    prompt: Annotated[str, typer.Argument(help="the prompt to contrast")],
    rule: Annotated[
        str, typer.Option(help="counting|binding|composition|attributes|auto")
    ] = "auto",
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


def _settings(**overrides: object):
    """The settings with the options the user gave (None: not given) on top, validated
    together (another --model drops the shipped head, as REWARD_MODEL does)."""
    from service.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given) if given else get_settings()


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


@app.command("serve")
@user_errors
def serve_cmd(
    model: Annotated[
        str | None, typer.Option(help="checkpoint dir or hub id [default: shipped]")
    ] = None,
    repository: Annotated[
        Path | None,
        typer.Option(help="serve this exported repository as is (never runs the exporter)"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="gateway bind address [default: 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="gateway port [default: 8000]")] = None,
) -> None:
    """One host: export if needed, start the bundled Triton and the gateway; Ctrl-C stops both."""
    from export.sources import check_local_source
    from service.launcher import serve

    if model and repository:
        raise ValueError("give --model (export it) or --repository (already exported), not both")
    check_local_source(model)  # at once, not after the export subprocess has loaded torch
    settings = _settings(
        model=model, repository=str(repository) if repository else None, host=host, port=port
    )
    _logging()
    serve(settings)


@app.command("gateway")
@user_errors
def gateway_cmd(
    triton_url: Annotated[
        str | None,
        typer.Option(
            help="Triton gRPC HOST:PORT, or dns:///NAME:PORT to balance over every address "
            "[default: REWARD_TRITON_URL]"
        ),
    ] = None,
    repository: Annotated[
        Path | None,
        typer.Option(
            help="the export Triton serves (its provenance.json and tokenizer.json suffice) "
            "[default: REWARD_REPOSITORY]"
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="gateway bind address [default: 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="gateway port [default: 8000]")] = None,
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx",
            help="no Triton: run the repository's ONNX files under ONNX Runtime in this process "
            "(development, or a node without tritonserver; no dynamic batching)",
        ),
    ] = False,
) -> None:
    """Serve the REST API against a running Triton (torch-free; Triton is not started here), or
    with --onnx over the export's ONNX files in this process."""
    from service.launcher import run_gateway

    settings = _settings(
        triton_url=triton_url,
        repository=str(repository) if repository else None,
        host=host,
        port=port,
    )
    _logging()
    run_gateway(settings, onnx=onnx)


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
    from textnorm_reward_client import RewardClient

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {missing[0]}")
    textnorm = {"contrastive": contrastive} if contrastive else None
    with RewardClient(url, api_key=api_key, attempts=2) as client:  # errors: user_errors
        response = client.score(list(images), prompt, textnorm=textnorm)
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


bench_app = typer.Typer(help="Benchmarks (medians of several runs).", no_args_is_help=True)
bench_app.add_typer(export_commands.bench_app)
app.add_typer(bench_app, name="bench")


@bench_app.command("serving")
@user_errors
def bench_serving_cmd(
    model: Annotated[
        str | None, typer.Option(help="checkpoint dir or hub id [default: shipped]")
    ] = None,
    systems: Annotated[
        str, typer.Option(help="comma-separated: gateway,grpc,naive,litserve,ceiling")
    ] = "gateway,grpc,naive,litserve,ceiling",
    workloads: Annotated[
        str, typer.Option(help="rl (a pool of 16 prompts) and/or cold (every prompt new)")
    ] = "rl,cold",
    images: Annotated[str, typer.Option(help="comma-separated images per request")] = "1",
    concurrency: Annotated[
        str, typer.Option(help="comma-separated client counts (ceiling: batch sizes)")
    ] = "1,8,32",
    textnorm: Annotated[str, typer.Option(help="on and/or off")] = "on",
    seconds: Annotated[float, typer.Option(min=0.5, help="length of each timed window")] = 5.0,
    runs: Annotated[int, typer.Option(min=1, help="timed windows per point (median)")] = 3,
    warmup: Annotated[float, typer.Option(min=0.0, help="warm-up seconds per point")] = 2.0,
    warmup_answers: Annotated[
        int, typer.Option(min=1, help="answers every client gets before the windows start")
    ] = 3,
    image_px: Annotated[int, typer.Option(min=32, max=1024, help="PNG side")] = 224,
    baseline_threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads of the baselines [all cores]")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="fp32 | int8 | bf16: the export's towers [default: settings]"),
    ] = None,
    baseline_precision: Annotated[
        str,
        typer.Option(
            help="fp32 | int8 | bf16: the baselines' torch model (int8: dynamic, Linear; "
            "bf16: CPU autocast)"
        ),
    ] = "fp32",
    pause_idle: Annotated[
        bool,
        typer.Option(
            help="freeze the baselines not measured at a point (idle, LitServe's workers poll "
            "and take CPU from the system measured)"
        ),
    ] = True,
    out: Annotated[
        Path, typer.Option(help="results folder: results.json, results.md, throughput.png")
    ] = Path("loadtest-results/bench-serving"),
    as_json: Annotated[bool, typer.Option("--json", help="print results.json instead")] = False,
) -> None:
    """Gateway, direct gRPC, naive wrapper, LitServe and in-process ceiling, side by side.

    Starts every server once (all stopped at the end, also on Ctrl-C), measures img/s,
    p50/p95/p99 and errors at every point (medians of RUNS windows), writes the report
    into OUT and prints its tables. Exit status 1 when a request failed or a system's
    rewards differ from the gateway's by more than 1e-4 (with int8: 5e-3 between systems
    running the same model, batched differently; int8 or bf16: 3e-2 between the export and a
    PyTorch baseline). The towers' precision is the served export's (provenance.json): --precision
    chooses the one to export and is refused when REWARD_REPOSITORY serves another."""
    import shlex

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from loadtest.report import markdown, write_report
    from loadtest.serving import SYSTEMS, TEXTNORM, WORKLOADS, bench_serving, parse_csv

    options = dict(
        model=model,
        systems=parse_csv(systems, "systems", allowed=SYSTEMS),
        workloads=parse_csv(workloads, "workloads", allowed=WORKLOADS),
        images=parse_csv(images, "images", integers=True),
        concurrency=parse_csv(concurrency, "concurrency", integers=True),
        textnorm=parse_csv(textnorm, "textnorm", allowed=TEXTNORM),
        seconds=seconds,
        runs=runs,
        warmup_s=warmup,
        warmup_answers=warmup_answers,
        image_px=image_px,
        baseline_threads=baseline_threads,
        precision=precision,
        baseline_precision=baseline_precision,
        pause_idle=pause_idle,
    )
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with bar:
        task = bar.add_task("starting", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        try:
            result = bench_serving(out / "logs", progress=progress, **options)
        except RuntimeError as exc:  # a server failed to start: its log tail says why
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    result["meta"]["command"] = shlex.join(["reward-service", *sys.argv[1:]])
    paths = write_report(result, out)
    if as_json:
        print(json.dumps(result))
    else:
        print(markdown(result), end="")
    typer.echo(f"wrote {paths['markdown']}, {paths['json']} and {paths['plot']}", err=True)
    errors = sum(p["errors"] for p in result["points"] if p["measured_under"] == p["textnorm"])
    parity = result["parity"]
    off = {k: v for k, v in parity["max_abs_diff"].items() if v > parity["tolerance"][k]}
    if errors or off or parity["errors"]:
        typer.echo(
            f"error: {errors} failed requests; rewards past tolerance: {off or 'none'}; "
            f"parity failures: {parity['errors'] or 'none'}",
            err=True,
        )
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
