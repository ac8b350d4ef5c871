"""The fine-tuning side's commands (torch side), mounted by the one CLI (`service/cli.py`).

`train-judge`, `train-generator`, and `finetune run | evaluate | compare`. Torch and diffusers
are imported inside the commands, so `reward-service --help` works without them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from service.cli_support import integer_list, user_errors

app = typer.Typer()

# Torch intra-op threads of the training commands. Measured on the shared 2-core machine under
# load: a UNet step took 0.68 CPU-s with 1 thread and 6.3 CPU-s with 2 (OpenMP threads spin
# while other processes hold the cores), so 1 is the default; raise it on a machine of your own.
Threads = Annotated[int, typer.Option(min=1, help="torch threads")]
Device = Annotated[str, typer.Option(help="cpu | cuda")]
Size = Annotated[int, typer.Option(help="px of the renders and samples: 32, 64 or 128")]


def _out(out: Path | None, size: int, shipped: Path) -> Path:
    """Where a training command writes: by default the shipped folder, at the shipped size
    only (a 64 px model there would break every default fine-tune)."""
    if out is not None:
        return out
    if size != 32:
        raise ValueError(f"--size {size} needs --out DIR: the shipped {shipped.name} is 32 px")
    return shipped


def _check_device(device: str) -> None:
    """A bad name is refused before torch loads; cuda needs torch to say it sees a GPU."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device")


finetune_app = typer.Typer(
    help="Online RL fine-tuning of the shapes generator against the service."
)

_SHIPPED = Path(__file__).resolve().parents[1] / "models"


@app.command("train-judge")
@user_errors
def train_judge_cmd(
    out: Annotated[
        Path | None, typer.Option(help="directory for the judge [default: the shipped one, 32 px]")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    images: Annotated[int | None, typer.Option(min=256, help="[default: 24000]")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="[default: 5]")] = None,
    size: Size = 32,
    device: Device = "cpu",
    threads: Threads = 1,
) -> None:
    """Train the ground-truth attribute judge on rendered images (seed 0, 32 px: the shipped
    one; --size: the resolution of the generator it will judge)."""
    from finetune.world_data import check_size

    _check_device(device)  # the options first: refused before torch loads
    out = _out(out, check_size(size), _SHIPPED / "shapes-judge")
    import torch

    from finetune.judge import JudgeTrainConfig, train_judge

    torch.set_num_threads(threads)
    given = {"images": images, "epochs": epochs}
    cfg = JudgeTrainConfig(
        seed=seed, size=size, **{k: v for k, v in given.items() if v is not None}
    )
    stats = train_judge(cfg, out, device=device)
    acc = ", ".join(f"{k} {v:.3f}" for k, v in stats["held_out_accuracy"].items())
    print(f"saved to {out}: held-out accuracy {acc}")


@app.command("train-generator")
@user_errors
def train_generator_cmd(
    out: Annotated[
        Path | None,
        typer.Option(help="directory for the generator [default: the shipped one, 32 px]"),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="[default: 800]")] = None,
    images: Annotated[int | None, typer.Option(min=64, help="[default: 12000]")] = None,
    batch_size: Annotated[int | None, typer.Option(min=2, help="[default: 24]")] = None,
    size: Size = 32,
    device: Device = "cpu",
    threads: Threads = 1,
) -> None:
    """Train the text-to-image diffusion model (seed 0, 32 px, the defaults: the shipped one;
    --size 64: the shipped CLIP's input size; judge it with a judge of its size)."""
    from finetune.world_data import check_size

    _check_device(device)  # the options first: refused before torch loads
    out = _out(out, check_size(size), _SHIPPED / "shapes-generator")
    import torch

    from finetune.generator import GeneratorTrainConfig, train_generator

    torch.set_num_threads(threads)
    given = {"steps": steps, "images": images, "batch_size": batch_size}
    cfg = GeneratorTrainConfig(
        seed=seed, size=size, **{k: v for k, v in given.items() if v is not None}
    )
    stats = train_generator(cfg, out, log_every=25, device=device)
    print(f"saved to {out}: loss {stats['first_loss']:.4f} -> {stats['final_loss']:.4f}")


def _config(**given):
    """The run's FinetuneConfig, checked (torch-free: call it before torch loads)."""
    from finetune.config import FinetuneConfig

    return FinetuneConfig(**{k: v for k, v in given.items() if v is not None})


Algorithm = Annotated[str, typer.Option(help="ddpo | rwl")]
Reward = Annotated[
    str,
    typer.Option(
        help="raw | textnorm | head | textnorm_head | ensemble_uw | ensemble_models_uw (a "
        "service with a second model: REWARD_MEMBERS)"
    ),
]
Url = Annotated[str, typer.Option(help="the reward service (gateway) URL")]
TextnormRule = Annotated[
    str | None,
    typer.Option(
        help="TextNorm rule of every reward request: auto | counting | binding | composition | "
        "attributes [default: the service's, auto]"
    ),
]
TextnormScale = Annotated[
    float | None,
    typer.Option(help="TextNorm c of every reward request [default: the service's choice]"),
]
ApiKey = Annotated[
    str | None, typer.Option(envvar="REWARD_SERVICE_API_KEY", help="bearer token, if required")
]
Opt = typer.Option
JudgeDir = Annotated[
    str | None, Opt(help="judge dir, trained at the generator's size [default: shipped, 32 px]")
]


@finetune_app.command("run")
@user_errors
def run_cmd(
    run: Annotated[Path, typer.Option(help="run directory (resumed if it holds checkpoints)")],
    algorithm: Algorithm = "ddpo",
    reward: Reward = "textnorm",
    textnorm_rule: TextnormRule = None,
    textnorm_scale: TextnormScale = None,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    steps: Annotated[int, Opt(min=1)] = 20,
    seed: Annotated[int, Opt()] = 0,
    device: Device = "cpu",
    generator: Annotated[str | None, Opt(help="[default: shipped]")] = None,
    judge: JudgeDir = None,
    prompts: Annotated[int | None, Opt(min=1, help="prompt-set size [default: 12]")] = None,
    sample_batch_size: Annotated[int | None, Opt(min=1, help="[default: 8]")] = None,
    batches_per_step: Annotated[int | None, Opt(min=1, help="[default: 2]")] = None,
    ddim_steps: Annotated[int | None, Opt(min=1, help="[default: 10]")] = None,
    inner_epochs: Annotated[int | None, Opt(min=1, help="[default: 1]")] = None,
    train_batch_size: Annotated[int | None, Opt(min=1, help="[default: 8]")] = None,
    gradient_accumulation: Annotated[
        int | None, Opt(min=1, help="minibatches per optimizer step [default: 1]")
    ] = None,
    lr: Annotated[float | None, Opt(help="[default: 3e-5]")] = None,
    rwl_beta: Annotated[float | None, Opt(help="β of the pre-training loss [default: 1.0]")] = None,
    threads: Threads = 1,
) -> None:
    """Fine-tune the generator with DDPO or reward-weighted likelihood against the service."""
    # A bad option is refused here, before torch loads.
    cfg = _config(
        algorithm=algorithm, reward=reward, textnorm_rule=textnorm_rule,
        textnorm_scale=textnorm_scale, service_url=url, steps=steps, seed=seed, device=device,
        generator=generator, judge=judge, prompts=prompts,
        sample_batch_size=sample_batch_size, batches_per_step=batches_per_step,
        ddim_steps=ddim_steps, inner_epochs=inner_epochs, train_batch_size=train_batch_size,
        gradient_accumulation=gradient_accumulation, lr=lr, rwl_beta=rwl_beta,
    )  # fmt: skip
    import torch

    from finetune.trainers import run_finetune

    torch.set_num_threads(threads)
    trainer = run_finetune(cfg, run, api_key=api_key)
    print(f"{run}: step {trainer.step}; metrics in {run / 'metrics.csv'}")


@finetune_app.command("evaluate")
@user_errors
def evaluate_cmd(
    generator: Annotated[str | None, Opt(help="generator dir [default: shipped]")] = None,
    judge: JudgeDir = None,
    prompts: Annotated[int, Opt(min=1)] = 60,
    per_prompt: Annotated[int, Opt(min=1)] = 4,
    prompt_seed: Annotated[int, Opt(help="which fixed prompt set")] = 0,
    seed: Annotated[int, Opt(help="sampling seed")] = 0,
    ddim_steps: Annotated[int, Opt(min=1)] = 20,
    device: Device = "cpu",
    grid: Annotated[Path | None, Opt(help="also save an image grid here")] = None,
    as_json: Annotated[bool, Opt("--json")] = False,
    threads: Threads = 1,
) -> None:
    """Judge alignment per attribute of a generator's samples on a fixed prompt set."""
    _check_device(device)
    import torch

    from finetune.evaluate import judge_generator, save_grid
    from finetune.generator import load_generator
    from finetune.judge import check_reads, load_judge
    from finetune.text_encoder import TextConditioner
    from finetune.world_data import SHIPPED_GENERATOR_DIR, SHIPPED_JUDGE_DIR

    torch.set_num_threads(threads)
    unet, _ = load_generator(generator or SHIPPED_GENERATOR_DIR, device)
    reader = load_judge(judge or SHIPPED_JUDGE_DIR, device)
    check_reads(reader, unet.config.sample_size)
    result, images, _ = judge_generator(
        unet, TextConditioner(device=device), reader,
        prompts, per_prompt, prompt_seed=prompt_seed, seed=seed, ddim_steps=ddim_steps,
    )  # fmt: skip
    if grid is not None:
        save_grid(images[: 8 * per_prompt], grid, columns=per_prompt * 2)
    print(json.dumps(result) if as_json else "  ".join(f"{k} {v:.3f}" for k, v in result.items()))


@finetune_app.command("reward-signal")
@user_errors
def reward_signal_cmd(
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    settings: Annotated[
        str,
        Opt(
            help="comma-separated TextNorm settings: default (the service's) or a rule, "
            "optionally @c, e.g. default,counting,counting@5"
        ),
    ] = "default,counting",
    generator: Annotated[str | None, Opt(help="generator dir [default: shipped]")] = None,
    judge: JudgeDir = None,
    images: Annotated[
        str,
        Opt(
            help="generator: its samples, judged | rendered: renders of each prompt's scene or "
            "of it with one attribute changed, with their exact truth"
        ),
    ] = "generator",
    size: Annotated[
        int | None, Opt(min=8, max=512, help="px of rendered images [default: 32]")
    ] = None,
    prompts: Annotated[int, Opt(min=1)] = 48,
    per_prompt: Annotated[int, Opt(min=2)] = 16,
    prompt_seed: Annotated[int, Opt(help="which fixed prompt set")] = 0,
    seed: Annotated[int, Opt(help="sampling seed")] = 0,
    ddim_steps: Annotated[int, Opt(min=1)] = 10,
    device: Device = "cpu",
    out: Annotated[
        Path | None, Opt(help="write reward_signal.json, .md and the samples (npz) here")
    ] = None,
    threads: Threads = 1,
) -> None:
    """How well each reward orders the generator's own samples of a prompt as the judge does:
    mean per-prompt AUROC per attribute, for every reward field and TextNorm setting."""
    _check_device(device)
    import numpy as np
    import torch

    from finetune.reward_signal import markdown, measure, parse_settings

    torch.set_num_threads(threads)
    report, samples = measure(
        url, parse_settings(settings), api_key=api_key, generator=generator, judge=judge,
        prompts=prompts,
        per_prompt=per_prompt, prompt_seed=prompt_seed, seed=seed, ddim_steps=ddim_steps,
        device=device, batch_size=512 if device == "cuda" else 32, images_from=images,
        size=size,
    )  # fmt: skip
    table = markdown(report["rows"], report["alignment"])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "reward_signal.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "reward_signal.md").write_text(table)
        np.savez_compressed(out / "samples.npz", **samples)
    print(table)


@finetune_app.command("compare")
@user_errors
def compare_cmd(
    out: Annotated[Path, typer.Option(help="directory for every run, the summary, plot, grids")],
    rewards: Annotated[str, Opt(help="comma-separated reward fields")] = "raw,textnorm",
    seeds: Annotated[str, Opt(help="comma-separated seeds")] = "0,1",
    algorithm: Algorithm = "ddpo",
    textnorm_rule: TextnormRule = None,
    textnorm_scale: TextnormScale = None,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    steps: Annotated[int, Opt(min=1)] = 20,
    device: Device = "cpu",
    generator: Annotated[str | None, Opt(help="starting generator [default: shipped]")] = None,
    judge: JudgeDir = None,
    prompts: Annotated[
        int | None, Opt(min=1, help="training prompt-set size [default: 12]")
    ] = None,
    sample_batch_size: Annotated[int | None, Opt(min=1, help="[default: 8]")] = None,
    batches_per_step: Annotated[int | None, Opt(min=1, help="[default: 2]")] = None,
    ddim_steps: Annotated[int | None, Opt(min=1, help="[default: 10]")] = None,
    train_batch_size: Annotated[int | None, Opt(min=1, help="[default: 8]")] = None,
    gradient_accumulation: Annotated[
        int | None, Opt(min=1, help="minibatches per optimizer step [default: 1]")
    ] = None,
    lr: Annotated[float | None, Opt(help="[default: 3e-5]")] = None,
    checkpoint_every: Annotated[int | None, Opt(min=1, help="[default: 1]")] = None,
    jobs: Annotated[int, Opt(min=1, help="runs trained in parallel processes")] = 1,
    judge_prompts: Annotated[int, Opt(min=1, help="prompts per fixed judging set")] = 48,
    judge_per_prompt: Annotated[int, Opt(min=1, help="samples per prompt there")] = 4,
    judge_prompt_seeds: Annotated[
        str, Opt(help="comma-separated fixed sets (0: the training prompts' seed)")
    ] = "0",
    threads: Threads = 1,
) -> None:
    """Same seeds and step budget under each reward: CSV per run, summary.csv, compare.png, and
    the generators judged on fixed prompt sets at equal steps (fixed_set.csv / .md)."""
    # A bad option is refused here, before torch loads.
    cfg = _config(
        algorithm=algorithm, textnorm_rule=textnorm_rule, textnorm_scale=textnorm_scale,
        service_url=url, steps=steps, device=device, generator=generator, judge=judge,
        prompts=prompts, sample_batch_size=sample_batch_size, batches_per_step=batches_per_step,
        ddim_steps=ddim_steps, train_batch_size=train_batch_size,
        gradient_accumulation=gradient_accumulation, lr=lr, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    reward_list = rewards.split(",")
    for name in reward_list:
        replace(cfg, reward=name)  # an unknown reward too
    seed_list = integer_list(seeds, "--seeds")
    judge_seeds = integer_list(judge_prompt_seeds, "--judge-prompt-seeds")
    import torch

    from finetune.compare import FixedSet, compare

    torch.set_num_threads(threads)
    fixed = FixedSet(
        prompts=judge_prompts,
        per_prompt=judge_per_prompt,
        prompt_seeds=tuple(judge_seeds),
        ddim_steps=cfg.ddim_steps,
        batch_size=512 if device == "cuda" else 32,
    )
    summary = compare(cfg, reward_list, seed_list, out, api_key, jobs, fixed)
    print(summary.read_text())
    print((out / "fixed_set.md").read_text())
