"""`finetune compare`: the same seeds and step budget under several rewards; a summary CSV,
a plot of proxy reward and judge alignment over steps, and image grids at start, middle, end."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from finetune import run_dir as rd
from finetune.evaluate import save_grid
from finetune.trainers import FinetuneConfig, run_finetune

PLOTTED = ("mean_reward", "judge_count", "judge_colour", "judge_shape", "judge_background")


def run_name(reward: str, seed: int) -> str:
    return f"{reward}_seed{seed}"


def compare(
    base: FinetuneConfig,
    rewards: list[str],
    seeds: list[int],
    out: Path,
    api_key: str | None = None,
) -> Path:
    """Run (or resume) every reward x seed; returns the summary CSV path."""
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for reward in rewards:
            run = out / run_name(reward, seed)
            run_finetune(replace(base, reward=reward, seed=seed), run, api_key)
            for step in sorted({1, max(1, base.steps // 2), base.steps}):
                s = rd.load_samples(run, step)
                save_grid(s["images"][:16], out / "grids" / f"{run.name}_step_{step:04d}.png")
    return summarise(out, rewards, seeds)


def summarise(out: Path, rewards: list[str], seeds: list[int]) -> Path:
    metrics = {(r, s): rd.read_metrics(out / run_name(r, s)) for r in rewards for s in seeds}
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
                start = np.mean([float(x[0][m]) for x in rows])
                ends = [float(x[-1][m]) for x in rows]
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
