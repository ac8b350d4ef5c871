"""A resumable run directory: config, metrics CSV, logged samples and checkpoints.

    RUN/config.json                  the run's configuration (a resume must match it)
    RUN/metrics.csv                  one row per step
    RUN/samples/step_0001.npz        the images sent to the service, their prompts, the rewards
    RUN/checkpoints/step_0001/       UNet (diffusers save_pretrained), optimizer state and RNG
                                     states (safetensors), trainer_state.json (step, tracker,
                                     config, the service's provenance block)

No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

METRIC_COLUMNS = (
    "step", "algorithm", "reward_field", "mean_reward", "judge_count", "judge_colour",
    "judge_shape", "judge_background", "judge_all", "distance_to_init", "reward_latency_s",
    "sample_s", "train_s", "loss", "approx_kl", "clipfrac",
)  # fmt: skip


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:04d}"


def _complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoint directories in step order; a `.tmp` one (a save cut short) is not one."""
    found = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
    return [p for p in found if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()]


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    done = _complete_checkpoints(run)
    return (int(done[-1].name.split("_")[1]), done[-1]) if done else None


def prune_checkpoints(run: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (a resume needs only the latest);
    returns what was removed."""
    done = _complete_checkpoints(run)
    removed = done[: max(0, len(done) - max(1, keep))]
    for path in removed:
        shutil.rmtree(path)
    return removed


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = opt.state_dict()
    tensors = {
        f"opt.{idx}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
        for idx, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list):
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run: Path,
    step: int,
    unet: torch.nn.Module,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    numpy_rng: np.random.Generator,
    extra: dict[str, Any],
) -> Path:
    """Write checkpoint `step` atomically (a temporary directory renamed into place)."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    tensors, groups = optimizer_tensors(opt)
    tensors |= {f"rng.{name}": g.get_state() for name, g in generators.items()}
    save_file(tensors, tmp / "trainer_state.safetensors")
    state = {"step": step, "param_groups": groups, "numpy_rng": numpy_rng.bit_generator.state}
    (tmp / "trainer_state.json").write_text(json.dumps({**state, **extra}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_checkpoint(
    path: Path,
    unet: torch.nn.Module,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    numpy_rng: np.random.Generator,
) -> dict[str, Any]:
    """Restore weights, optimizer, RNG states in place; returns trainer_state.json, with
    `reseeded`: the torch generators whose state was saved on another device type (a resume
    may change --device), seeded from their seed and the step instead."""
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(str(path / "unet"), low_cpu_mem_usage=False)
    unet.load_state_dict(loaded.state_dict())
    state = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(path / "trainer_state.safetensors")
    device = next(unet.parameters()).device
    load_optimizer(opt, {k: v.to(device) for k, v in tensors.items()}, state["param_groups"])
    state["reseeded"] = []
    for name, g in generators.items():
        saved = tensors[f"rng.{name}"]
        if saved.numel() == g.get_state().numel():
            g.set_state(saved)
        else:  # saved on another device type (CPU and CUDA states differ in kind and size):
            g.manual_seed(g.initial_seed() + 7919 * state["step"])  # continue, not bit-exact
            state["reseeded"].append(name)
    numpy_rng.bit_generator.state = state["numpy_rng"]
    return state


def append_metrics(run: Path, row: dict[str, Any]) -> None:
    path = run / "metrics.csv"
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_metrics(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def truncate_metrics(run: Path, last_step: int) -> None:
    """Drop rows past the checkpoint a run resumes from (a step that ran but was not saved)."""
    rows = [r for r in read_metrics(run) if int(r["step"]) <= last_step]
    (run / "metrics.csv").unlink(missing_ok=True)
    for row in rows:
        append_metrics(run, row)


def save_samples(
    run: Path, step: int, images: np.ndarray, prompts: list[str], rewards: np.ndarray, labels
) -> None:
    (run / "samples").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        run / "samples" / f"step_{step:04d}.npz",
        images=images,
        prompts=np.array(prompts),
        rewards=rewards,
        labels=labels,
    )


def load_samples(run: Path, step: int) -> dict[str, np.ndarray]:
    with np.load(run / "samples" / f"step_{step:04d}.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
