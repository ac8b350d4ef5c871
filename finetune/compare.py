"""`finetune compare`: the same seeds and step budget under several rewards; a summary CSV,
a plot of proxy reward and judge alignment over steps, image grids at start, middle and end, and
every run's generator judged on fixed prompt sets at equal steps against the generator it
started from (`fixed_set.csv` / `fixed_set.md`: the same sampling seed for every generator, so the
comparison is paired). With `jobs` > 1 the runs train in parallel processes (one GPU holds many
of these small runs)."""

from __future__ import annotations

import csv
import multiprocessing
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from textnorm_reward_client import RewardServiceError

from finetune import run_dir as rd
from finetune.config import FinetuneConfig
from finetune.evaluate import save_grid
from finetune.reward_client import ServiceReward
from finetune.trainers import run_finetune
from finetune.world_data import prompt_of, prompt_set

PLOTTED = ("mean_reward", "judge_count", "judge_colour", "judge_shape", "judge_background")
JUDGED = ("count", "colour", "shape", "background", "all")


@dataclass(frozen=True)
class FixedSet:
    """The judge's fixed prompt sets: `prompts` prompts (balanced over counts) of each of
    `prompt_seeds`, `per_prompt` samples each, DDIM `ddim_steps`, sampling seed `seed`. Sets
    are random draws (`prompt_set`, prefix-stable): set 0 starts with the training prompts of
    prompt seed 0 and goes on with prompts never trained on, and another seed's set may share
    prompts with training by chance; fixed_set.{csv,md} count them (`training_prompts`)."""

    prompts: int = 48
    per_prompt: int = 4
    prompt_seeds: tuple[int, ...] = (0,)
    ddim_steps: int = 10
    seed: int = 0
    # samples per sampling call: 32 suits a CPU; on a GPU the judging of 13 generators x 2 sets
    # x 768 samples at 32 took over 110 s on an H200 (launch-bound), so compare uses 512 there
    batch_size: int = 32


def run_name(reward: str, seed: int) -> str:
    return f"{reward}_seed{seed}"


def _train(cfg: FinetuneConfig, run: Path, api_key: str | None, threads: int) -> int:
    """One run in a worker process, with the parent's torch threads (no progress bar: several
    would interleave)."""
    import torch
    from rich.progress import Progress

    torch.set_num_threads(threads)
    return run_finetune(cfg, run, api_key, progress=Progress(disable=True)).step


def compare(
    base: FinetuneConfig,
    rewards: list[str],
    seeds: list[int],
    out: Path,
    api_key: str | None = None,
    jobs: int = 1,
    fixed: FixedSet | None = FixedSet(),
) -> Path:
    """Run (or resume) every reward x seed to `base.steps`; returns the summary CSV path. Runs
    already past `base.steps` (kept checkpoints) are reported at `base.steps`."""
    with ServiceReward(base.service_url, rewards[0], api_key=api_key) as service:
        service.check()  # once, here: not N workers each loading torch and then failing
    out.mkdir(parents=True, exist_ok=True)
    half, last = judged_steps(base)  # their checkpoints must survive pruning
    keep = max(base.keep_checkpoints, (last - half) // base.checkpoint_every + 2)
    base = replace(base, keep_checkpoints=keep)
    runs = [(replace(base, reward=r, seed=s), out / run_name(r, s)) for s in seeds for r in rewards]
    if jobs > 1:
        import torch

        threads = torch.get_num_threads()
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        # A Pool, not a ProcessPoolExecutor: leaving the `with` block terminates the workers,
        # so the first failed run stops every other at once (no silent partial comparison).
        with spawn.Pool(jobs) as pool:
            pending = {
                pool.apply_async(_train, (cfg, run, api_key, threads)): run.name
                for cfg, run in runs
            }
            while pending:
                for result in [r for r in pending if r.ready()]:
                    name = pending.pop(result)
                    try:
                        print(f"{name}: step {result.get()}", flush=True)
                    except RewardServiceError:
                        raise  # the CLI says it in one line
                    except Exception as exc:
                        raise RuntimeError(f"run {name} failed: {exc}") from exc
                time.sleep(0.2)
    else:
        for cfg, run in runs:
            run_finetune(cfg, run, api_key)
    for _, run in runs:
        for step in sorted({1, half, last}):
            s = rd.load_samples(run, step)
            save_grid(s["images"][:16], out / "grids" / f"{run.name}_step_{step:04d}.png")
    if fixed is not None:
        judge_fixed_sets(base, rewards, seeds, out, fixed)
    return summarise(out, rewards, seeds, base.steps)


def judged_steps(cfg: FinetuneConfig) -> tuple[int, int]:
    """The two checkpointed steps a comparison judges: about half of `cfg.steps` (a multiple of
    `checkpoint_every`) and `cfg.steps`."""
    every = cfg.checkpoint_every
    half = (cfg.steps // 2) // every * every
    return (half or cfg.steps), cfg.steps


def judge_fixed_sets(
    base: FinetuneConfig, rewards: list[str], seeds: list[int], out: Path, fixed: FixedSet
) -> Path:
    """Judge alignment of the starting generator and of every run's checkpoints at half and all
    of `base.steps`, on each fixed prompt set: `fixed_set.csv` (one row per generator, step and
    prompt set) and `fixed_set.md` (means over seeds, the per-seed values, the change against
    the starting generator)."""
    import torch

    from finetune.evaluate import judge_generator
    from finetune.generator import load_generator
    from finetune.judge import load_judge
    from finetune.text_encoder import TextConditioner

    device = base.device
    text, judge = TextConditioner(device=device), load_judge(base.judge, device)
    steps = sorted(set(judged_steps(base)))
    generators = [("start", "-", 0, Path(base.generator))]
    generators += [
        (r, str(s), step, rd.checkpoint_dir(out / run_name(r, s), step) / "unet")
        for r in rewards
        for s in seeds
        for step in steps
    ]
    missing = [str(g[3]) for g in generators if not (g[3] / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"no checkpoint to judge at {missing[0]} (was the run pruned with a smaller "
            "keep_checkpoints, or stopped before that step?)"
        )
    trained = {prompt_of(s) for s in prompt_set(base.prompts, base.prompt_seed)}
    overlap = {
        ps: sum(prompt_of(s) in trained for s in prompt_set(fixed.prompts, ps))
        for ps in fixed.prompt_seeds
    }
    rows = []
    for reward, seed, step, path in generators:
        unet, _ = load_generator(path, device)
        for prompt_seed in fixed.prompt_seeds:
            with torch.no_grad():
                result, _, _ = judge_generator(
                    unet, text, judge, fixed.prompts, fixed.per_prompt, prompt_seed=prompt_seed,
                    seed=fixed.seed, ddim_steps=fixed.ddim_steps, batch_size=fixed.batch_size,
                )  # fmt: skip
            rows.append(
                {"generator": reward, "seed": seed, "step": step, "prompt_seed": prompt_seed,
                 "samples": fixed.prompts * fixed.per_prompt,
                 "training_prompts": overlap[prompt_seed],
                 **{a: f"{result[a]:.4f}" for a in JUDGED}}
            )  # fmt: skip
    path = out / "fixed_set.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "fixed_set.md").write_text(fixed_set_table(rows, rewards, steps, fixed))
    return path


def fixed_set_table(rows: list[dict], rewards: list[str], steps: list[int], fixed: FixedSet) -> str:
    """Markdown: per prompt set, the starting generator, then each reward at each step (mean
    over seeds, the per-seed values, and the mean change against the start)."""
    lines = []
    for prompt_seed in fixed.prompt_seeds:
        mine = [r for r in rows if r["prompt_seed"] == prompt_seed]
        start = next(r for r in mine if r["generator"] == "start")
        lines += [
            f"Prompt set seed {prompt_seed}: {fixed.prompts} prompts x {fixed.per_prompt} "
            f"samples, {fixed.ddim_steps} DDIM steps, sampling seed {fixed.seed}; "
            f"{start['training_prompts']} of the {fixed.prompts} prompts are training prompts.",
            "",
            "| generator | step | " + " | ".join(JUDGED) + " |",
            "| --- | ---: | " + " | ".join("---" for _ in JUDGED) + " |",
            "| start | 0 | " + " | ".join(f"{float(start[a]):.3f}" for a in JUDGED) + " |",
        ]
        for reward in rewards:
            for step in steps:
                runs = [r for r in mine if r["generator"] == reward and r["step"] == step]
                cells = []
                for a in JUDGED:
                    values = [float(r[a]) for r in runs]
                    delta = np.mean(values) - float(start[a])
                    per_seed = " / ".join(f"{v:.3f}" for v in values)
                    cells.append(f"{np.mean(values):.3f} ({per_seed}; {delta:+.3f})")
                lines.append(f"| {reward} | {step} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summarise(
    out: Path, rewards: list[str], seeds: list[int], steps: int | None = None, window: int = 5
) -> Path:
    """summary.csv: per reward, each metric's mean over the first and over the last `window`
    steps (one step's training samples are few), averaged over seeds, and the spread (max - min)
    of the seeds' last-window means; compare.png."""
    metrics = {
        (r, s): [
            row
            for row in rd.read_metrics(out / run_name(r, s))
            if steps is None or int(row["step"]) <= steps
        ]
        for r in rewards
        for s in seeds
    }
    summary = out / "summary.csv"
    columns = ["reward", "seeds", "first_step", "last_step"]
    columns += [
        f"{m}_{w}"
        for m in PLOTTED + ("judge_all", "distance_to_init")
        for w in ("start", "end", "end_spread")
    ]
    with summary.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rewards:
            rows = [metrics[(r, s)] for s in seeds]
            row = [r, len(seeds), rows[0][0]["step"], rows[0][-1]["step"]]
            for m in PLOTTED + ("judge_all", "distance_to_init"):
                start = np.mean([np.mean([float(y[m]) for y in x[:window]]) for x in rows])
                ends = [np.mean([float(y[m]) for y in x[-window:]]) for x in rows]
                row += [f"{start:.4f}", f"{np.mean(ends):.4f}", f"{np.ptp(ends):.4f}"]
            writer.writerow(row)
    _plot(out, metrics, rewards, seeds)
    return summary


def _plot(out: Path, metrics: dict, rewards: list[str], seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.4))
    for ax, m in zip(axes, PLOTTED, strict=True):
        for k, r in enumerate(rewards):
            curves = [[float(x[m]) for x in metrics[(r, s)]] for s in seeds]
            length = min(len(c) for c in curves)
            arr = np.array([c[:length] for c in curves])
            steps = np.arange(1, length + 1)
            for c in arr:
                ax.plot(steps, c, color=f"C{k}", alpha=0.3, lw=1)
            ax.plot(steps, arr.mean(0), color=f"C{k}", lw=2, label=r)
        ax.set_title(m.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
