"""The export role's commands (torch side), mounted by the one CLI (`service/cli.py`).

`export`, `verify`, `build-engines`, `build-vit-b32`, `train-clip` and `bench encoders`. Torch and
TensorRT are imported inside the commands, so `reward-service --help` works without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from export.sources import check_local_source
from models import resolve_shipped
from service.cli_support import user_errors
from service.settings import get_settings

app = typer.Typer()
bench_app = typer.Typer()


@app.command("train-clip")
@user_errors
def train_clip_cmd(
    out: Annotated[Path, typer.Option(help="directory to save_pretrained the model into")],
    member: Annotated[
        str,
        typer.Option(help="which shipped model's recipe: shapes-clip | shapes-clip-b"),
    ] = "shapes-clip",
    seed: Annotated[int | None, typer.Option(help="[default: the member's]")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="[default: 2000]")] = None,
    images: Annotated[int | None, typer.Option(min=256, help="[default: 24000]")] = None,
    batch_size: Annotated[int | None, typer.Option(min=8, help="[default: 192]")] = None,
) -> None:
    """Train a shapes-world CLIP from its recipe (`--member`): the shipped models are the
    recipes' defaults (shapes-clip: seed 0; shapes-clip-b, the second ensemble member: seed 1)."""
    import dataclasses

    from export.train_clip import MEMBERS, train_clip

    if member not in MEMBERS:
        raise ValueError(f"unknown member {member!r}; expected one of: {', '.join(MEMBERS)}")
    given = {"seed": seed, "steps": steps, "images": images, "batch_size": batch_size}
    cfg = dataclasses.replace(MEMBERS[member], **{k: v for k, v in given.items() if v is not None})
    stats = train_clip(cfg, out)
    print(f"saved to {out}: loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}")


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
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="TextNorm calibration JSON (`calibrate`) bundled as the served default c/λ "
            "[default: the shipped one with the shipped model]"
        ),
    ] = None,
    no_calibration: Annotated[
        bool, typer.Option("--no-calibration", help="serve the model's c (no calibration)")
    ] = False,
    member: Annotated[
        list[str] | None,
        typer.Option(
            help="a further CLIP checkpoint served beside the model as a multi-model ensemble: "
            "a directory, a hub id or a shipped model's name, e.g. shapes-clip-b (repeatable; "
            "same tokenizer) [default: settings' members]"
        ),
    ] = None,
    target: Annotated[str, typer.Option(help="cpu | gpu")] = "cpu",
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 | fp16 (gpu) | int8 or bf16 (cpu towers) [default: settings' on cpu]"
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="max batch (TensorRT profile max)")] = 64,
    queue_delay_us: Annotated[
        int | None, typer.Option(help="dynamic batching max queue delay [default: settings]")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="ONNX Runtime (or OpenVINO) threads per CPU model instance, 0 = all "
            "[default: settings]"
        ),
    ] = None,
    instances: Annotated[
        int | None, typer.Option(help="Triton instances per model [default: settings]")
    ] = None,
) -> None:
    """Export a CLIP checkpoint (+ head) to ONNX/TensorRT as a Triton model repository."""
    from export.options import ExportOptions

    settings = get_settings()
    if calibration is not None and no_calibration:
        raise ValueError("give --calibration FILE or --no-calibration, not both")
    options = ExportOptions(
        target=target,
        precision=precision or (settings.precision if target == "cpu" else "fp32"),
        max_batch=max_batch,
        queue_delay_us=settings.triton_queue_delay_us if queue_delay_us is None else queue_delay_us,
        threads=settings.triton_onnx_threads if threads is None else threads,
        instances=settings.triton_instances if instances is None else instances,
        textnorm_scale=settings.textnorm_scale,
        ensemble_lambda=settings.ensemble_lambda,
    )  # a bad option is refused here, before torch and the checkpoint load
    members = [resolve_shipped(m) for m in (settings.members if member is None else member)]
    for source in (model, *members):
        check_local_source(source)  # a mistyped path too
    from export.repository import export_repository, is_shipped_calibration

    head_dir = None if no_head else head or (settings.head if model is None else None)
    # An explicit file must fit the checkpoint; the shipped default applies only to the
    # checkpoint it was calibrated for, and with members only when it has each member's c.
    only_if_fitting = calibration is None and is_shipped_calibration(settings.calibration)
    if calibration is None and not no_calibration and settings.calibration:
        calibration = Path(settings.calibration)
    prov, changed = export_repository(
        model or settings.model,
        out,
        Path(head_dir) if head_dir else None,
        options,
        members=members,
        calibration=None if no_calibration else calibration,
        calibration_only_if_fitting=only_if_fitting,
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


@app.command("build-engines")
@user_errors
def build_engines_cmd(
    repo: Annotated[Path, typer.Argument(help="a GPU-flavour repository (export --target gpu)")],
    cache: Annotated[Path, typer.Option(help="engine cache: GPU name + TensorRT + ONNX hash")],
) -> None:
    """Build the TensorRT engines of a GPU repository in place, on the GPU that will run them."""
    from export.tensorrt import build_engines

    for report in build_engines(repo, cache):
        state = "reused from cache" if report["reused"] else "built"
        print(f"{report['model']}: {state} (key {report['key'][:16]})")


@app.command("build-vit-b32")
@user_errors
def build_vit_b32_cmd(
    out: Annotated[Path, typer.Option(help="directory to save_pretrained the checkpoint into")],
) -> None:
    """A ViT-B/32-sized random CLIP (seeded; the shipped tokenizer), for benchmarks.

    The shapes of openai/clip-vit-base-patch32: a realistic model size, without the hub."""
    from export.bench import vit_b32_checkpoint
    from export.clip_model import load_clip

    print(vit_b32_checkpoint(out, load_clip(get_settings().model)))


@bench_app.command("encoders")
@user_errors
def bench_encoders_cmd(
    repo: Annotated[Path, typer.Option(help="exported repository of the model to benchmark")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    runs: Annotated[int, typer.Option(min=1)] = 5,
    vit_b32: Annotated[bool, typer.Option(help="also a ViT-B/32-sized random-init CLIP")] = True,
    bf16: Annotated[
        bool, typer.Option(help="also torch under bf16 autocast (AMX on recent Xeons)")
    ] = False,
) -> None:
    """Image-encoder images/s: PyTorch eager vs ONNX Runtime at batch 1, 8, 32 (and the
    embeddings' max |Δ| to torch fp32)."""
    from export.bench import bench_image_encoder, vit_b32_checkpoint
    from export.clip_model import load_clip
    from export.repository import ExportOptions, export_repository, read_provenance
    from service.model_contract import version_dir
    from service.settings import CACHE_DIR

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
        cache = CACHE_DIR
        ckpt = vit_b32_checkpoint(cache / "vit-b32-random", bundle)
        vit_repo = cache / "repositories" / "vit-b32-random"
        vit_repo.parent.mkdir(parents=True, exist_ok=True)
        export_repository(str(ckpt), vit_repo, None, ExportOptions())
        models["vit-b32 (random init)"] = (load_clip(ckpt), vit_repo)
    results = {
        name: bench_image_encoder(
            b, version_dir(r, "image_encoder") / "model.onnx", runs=runs, bf16=bf16
        )
        for name, (b, r) in models.items()
    }
    if as_json:
        print(json.dumps(results))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="image encoder, images/s (median of runs; preprocessing included)")
    columns = ["model", "batch", "torch eager", "onnxruntime", "ratio", "ORT max |Δ|"]
    if bf16:
        columns += ["torch bf16", "bf16 ÷ eager", "bf16 max |Δ|"]
    for col in columns:
        table.add_column(col, justify="right")
    for name, res in results.items():
        for b, rate in res["torch"].items():
            ort_rate = res["onnxruntime"][b]
            row = [name, str(b), f"{rate:.1f}", f"{ort_rate:.1f}", f"{ort_rate / rate:.2f}x"]
            row.append(f"{res['max_abs_diff_onnxruntime'][b]:.1e}")
            if bf16:
                low = res["torch_bf16"][b]
                row += [
                    f"{low:.1f}",
                    f"{low / rate:.2f}x",
                    f"{res['max_abs_diff_torch_bf16'][b]:.1e}",
                ]
            table.add_row(*row)
    Console(file=sys.stdout).print(table)
