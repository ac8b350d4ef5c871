"""DDPO and reward-weighted likelihood (RWL) fine-tuning of the generator against the service.

One *step* samples `batches_per_step` batches with the current model (the reward call of batch k
runs on a worker thread while batch k + 1 is sampled), then updates the model:

- `ddpo` (ddpo-pytorch): advantages from a per-prompt stat tracker, clipped to ±adv_clip_max;
  `inner_epochs` passes over the samples, each minibatch one optimizer step on the clipped
  importance-ratio objective max(−A·ρ, −A·clip(ρ, 1 ± ε)) summed over the DDIM steps, where
  ρ = p_θ(x_{t−1}|x_t) / p_old(x_{t−1}|x_t).
- `rwl` (Lee et al.): minimise E_model[−r · log p] + β · E_pretrain[−log p], with −log p replaced
  by its bound, the DDPM denoising loss: reward-weighted denoising loss on the model's samples
  plus β × the denoising loss on freshly rendered data (the generator's pre-training data; no
  prompt dropout). The weights are r clipped at 0, as the paper's rewards lie in [0, 1]: with
  `raw` (a cosine) about half the samples weigh 0, and the rewards' scales differ (raw's mean
  weight ≈ 0.19 against TextNorm's ≈ 0.06), so β does not mean the same for both.

The trainer talks to the service only through `finetune.reward_client`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from textnorm_reward_client.results import reward_model

from finetune import run_dir as rd
from finetune.config import RESUMABLE_CHANGES, FinetuneConfig
from finetune.ddim import ddim_step_with_logprob, guided_eps, sample
from finetune.generator import (
    denoising_loss,
    load_generator,
    noise_scheduler,
    to_model_space,
    to_uint8,
)
from finetune.judge import alignment, check_reads, load_judge
from finetune.reward_client import SET_FREE_FIELDS, ServiceReward
from finetune.stat_tracker import PerPromptStatTracker
from finetune.text_encoder import TextConditioner
from finetune.world_data import (
    labels_of,
    prompt_of,
    prompt_set,
    rendered_set,
)


@dataclass
class _Batch:
    images: np.ndarray
    prompts: list[str]
    labels: np.ndarray
    cond: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor


@dataclass(frozen=True)
class _Rollout:
    """A step's samples as DDPO trains on them: per sample, its DDIM trajectory and the
    log-probability of each transition when sampled, its conditioning and its advantage."""

    latents: torch.Tensor  # [N, steps + 1, ...]
    log_probs: torch.Tensor  # [N, steps]
    cond: torch.Tensor
    advantages: torch.Tensor  # [N]
    timesteps: torch.Tensor  # [steps]


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "none"


class Trainer:
    def __init__(self, cfg: FinetuneConfig, run: Path) -> None:
        self.cfg, self.run = cfg, run
        device = cfg.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device")
        torch.manual_seed(cfg.seed)
        self.unet, self.generator_meta = load_generator(cfg.generator, device)
        self.initial = [p.detach().clone() for p in self.unet.parameters()]
        self.judge = load_judge(cfg.judge, device)
        check_reads(self.judge, self.unet.config.sample_size)
        self.text = TextConditioner(device=device)
        self.null = self.text.encode([""])[0]
        self.acp = noise_scheduler().alphas_cumprod.to(device)
        self.noise_sched = noise_scheduler()
        self.scenes = prompt_set(cfg.prompts, cfg.prompt_seed)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.gens = {
            "sample": torch.Generator(device).manual_seed(cfg.seed),
            "train": torch.Generator(device).manual_seed(cfg.seed + 1),
        }
        self.rng = np.random.default_rng([cfg.seed, 3])
        self.tracker = PerPromptStatTracker(cfg.tracker_buffer, cfg.tracker_min_count)
        self.step = 0
        self.provenance: dict[str, Any] | None = None
        self.contrastive_sets: dict[str, str | None] = {}  # prompt → its set's sha256
        self.pretrain = None
        if cfg.algorithm == "rwl":
            miscount = float(self.generator_meta.get("config", {}).get("miscount_rate", 0.0))
            size = self.unet.config.sample_size
            data = rendered_set(cfg.rwl_pretrain_pool, 9000 + cfg.seed, miscount, size)
            self.pretrain = (to_model_space(data.images).to(device), self.text.encode(data.prompts))

    # -- run directory --------------------------------------------------------------------------
    def open_run(self) -> None:
        """Create the run directory, or resume from its latest checkpoint."""
        self.run.mkdir(parents=True, exist_ok=True)
        config_path = self.run / "config.json"
        if config_path.is_file():
            saved = json.loads(config_path.read_text())
            mine, defaults = asdict(self.cfg), asdict(FinetuneConfig())
            # a setting added after the run began: the run used its default
            differ = [
                k
                for k in mine
                if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != mine[k]
            ]
            if differ:
                raise ValueError(f"{self.run} holds a run with other settings: {', '.join(differ)}")
        config_path.write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        latest = rd.latest_checkpoint(self.run)
        if latest is not None:
            state = rd.load_checkpoint(latest[1], self.unet, self.opt, self.gens, self.rng)
            if state["reseeded"]:
                print(
                    f"resuming on {self.cfg.device}: the {', '.join(state['reseeded'])} random "
                    "states were saved on another device and are reseeded (the run continues, "
                    "not bit-exactly)"
                )
            self.tracker.load_state(state["tracker"])
            self.provenance = state.get("provenance")
            self.contrastive_sets = dict(state.get("contrastive_sets") or {})
            self.step = state["step"]
        rd.truncate_metrics(self.run, self.step)

    def checkpoint(self) -> Path:
        extra = {
            "config": asdict(self.cfg),
            "provenance": self.provenance,
            "contrastive_sets": self.contrastive_sets,
            "tracker": self.tracker.state(),
        }
        path = rd.save_checkpoint(
            self.run, self.step, self.unet, self.opt, self.gens, self.rng, extra
        )
        rd.prune_checkpoints(self.run, self.cfg.keep_checkpoints)
        return path

    # -- sampling -------------------------------------------------------------------------------
    def _sample_batch(self) -> _Batch:
        cfg = self.cfg
        picks = self.rng.integers(len(self.scenes), size=cfg.sample_batch_size)
        scenes = [self.scenes[i] for i in picks]
        prompts = [prompt_of(s) for s in scenes]
        cond = self.text.encode(prompts)
        self.unet.eval()
        traj = sample(
            self.unet, self.acp, cond, self.null, cfg.ddim_steps, cfg.eta, cfg.guidance,
            self.gens["sample"],
        )  # fmt: skip
        images = to_uint8(traj.images)
        labels = np.stack([labels_of(s) for s in scenes])
        return _Batch(images, prompts, labels, cond, traj.latents, traj.log_probs, traj.timesteps)

    def _collect(self, reward: ServiceReward) -> tuple[list[_Batch], np.ndarray, float]:
        """Sample every batch of a step; batch k's reward call overlaps batch k+1's sampling."""
        batches, futures = [], []
        for _ in range(self.cfg.batches_per_step):
            batch = self._sample_batch()
            batches.append(batch)
            futures.append(reward.submit(batch.images, batch.prompts))
        results = [f.result() for f in futures]
        self.provenance = self.provenance or results[0].provenance  # a new run: its first batch
        for batch, result in zip(batches, results, strict=True):
            self._check_same_reward_model(result.provenance)
            self._check_same_contrastive_sets(batch.prompts, result.contrastive_sha256)
        self.provenance = results[-1].provenance
        rewards = np.concatenate([r.rewards for r in results])
        return batches, rewards, float(np.mean([r.latency_s for r in results]))

    def _check_same_reward_model(self, provenance: dict[str, Any]) -> None:
        """Every reward of a run comes from one export and calibration file: a resume against
        another service, or a service redeployed mid-run, would mix two reward models in the
        stat tracker and the curves without a trace."""
        if self.provenance is None:
            return
        before, now = reward_model(self.provenance), reward_model(provenance)
        if before != now:
            raise ValueError(
                f"the reward service now serves {now}, but this run's rewards came from "
                f"{before}: point --url at a service serving that, or start a new run directory"
            )

    def _check_same_contrastive_sets(self, prompts: list[str], sets: list[str | None]) -> None:
        """A TextNorm reward also depends on the contrastive set the service builds for a
        prompt, which the gateway's settings choose (max_contrastive_prompts, a prompt-sets or
        vocabulary file) and neither hash names: each prompt's set (its sha256) must stay the
        one its first reward used, across a resume or a redeploy too."""
        if self.cfg.reward in SET_FREE_FIELDS:
            return
        for prompt, sha in zip(prompts, sets, strict=True):
            first = self.contrastive_sets.setdefault(prompt, sha)
            if first != sha:
                raise ValueError(
                    f"the reward service now scores {prompt!r} against another contrastive set "
                    f"({_short(sha)}, was {_short(first)}): its contrastive settings "
                    "(max_contrastive_prompts, prompt-sets or vocabulary file) changed; point "
                    "--url at a service configured as before, or start a new run directory"
                )

    # -- updates --------------------------------------------------------------------------------
    def _ddpo_update(self, batches: list[_Batch], rewards: np.ndarray) -> dict[str, float]:
        cfg = self.cfg
        prompts = [p for b in batches for p in b.prompts]
        adv = self.tracker.update(prompts, rewards)
        adv = torch.as_tensor(np.clip(adv, -cfg.adv_clip_max, cfg.adv_clip_max)).float()
        rollout = _Rollout(
            latents=torch.cat([b.latents for b in batches]),
            log_probs=torch.cat([b.log_probs for b in batches]),
            cond=torch.cat([b.cond for b in batches]),
            advantages=adv.to(self.acp.device),
            timesteps=batches[0].timesteps,
        )
        stats: list[tuple[float, float, float]] = []  # (loss, approx kl, clip fraction)
        self.unet.train()
        for _ in range(cfg.inner_epochs):
            n = len(rollout.latents)
            order = torch.randperm(n, generator=self.gens["train"], device=self.acp.device)
            for group in self._accumulation_groups(order):
                self.opt.zero_grad()
                size = sum(len(mb) for mb in group)
                for mb in group:  # each its share of the group's samples
                    stats += self._ddpo_backward(rollout, mb, weight=len(mb) / size)
                self._clip_finite_gradients()
                self.opt.step()
        loss, kl, clipfrac = np.mean(stats, axis=0)
        return {"loss": float(loss), "approx_kl": float(kl), "clipfrac": float(clipfrac)}

    def _accumulation_groups(self, order: torch.Tensor) -> list[list[torch.Tensor]]:
        """`order` cut into minibatches of train_batch_size, gradient_accumulation of them per
        group: one optimizer step per group (a round's last group may be shorter)."""
        size, k = self.cfg.train_batch_size, self.cfg.gradient_accumulation
        minibatches = [order[i : i + size] for i in range(0, len(order), size)]
        return [minibatches[i : i + k] for i in range(0, len(minibatches), k)]

    def _ddpo_backward(
        self, rollout: _Rollout, mb: torch.Tensor, weight: float
    ) -> list[tuple[float, float, float]]:
        """Backpropagate minibatch `mb`'s clipped surrogate over every DDIM step, the mean over
        steps times `weight` (its share of the optimizer step); (loss, kl, clipfrac) per step."""
        cfg = self.cfg
        ratio_step = len(self.acp) // cfg.ddim_steps
        steps = len(rollout.timesteps)
        a = rollout.advantages[mb]
        out = []
        for j, t in enumerate(rollout.timesteps):
            x_t = rollout.latents[mb, j]
            eps = guided_eps(self.unet, x_t, t, rollout.cond[mb], self.null, cfg.guidance)
            _, lp = ddim_step_with_logprob(
                self.acp, eps, t.expand(len(mb)), (t - ratio_step).expand(len(mb)),
                x_t, cfg.eta, prev_sample=rollout.latents[mb, j + 1],
            )  # fmt: skip
            old = rollout.log_probs[mb, j]
            ratio = torch.exp(lp - old)
            clipped = torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)
            loss = torch.maximum(-a * ratio, -a * clipped).mean()
            (loss * weight / steps).backward()
            kl = 0.5 * ((lp - old) ** 2).mean().item()
            clipfrac = ((ratio - 1).abs() > cfg.clip_range).float().mean().item()
            out.append((loss.item(), kl, clipfrac))
        return out

    def _rwl_update(self, batches: list[_Batch], rewards: np.ndarray) -> dict[str, float]:
        cfg = self.cfg
        device = self.acp.device
        x0 = to_model_space(np.concatenate([b.images for b in batches])).to(device)
        cond = torch.cat([b.cond for b in batches])
        # r ≥ 0 as in Lee et al. (rewards in [0, 1]): a negative raw cosine weighs 0, not < 0
        weights = torch.as_tensor(np.clip(rewards, 0.0, None)).float().to(device)
        pool_x, pool_c = self.pretrain
        losses = []
        self.unet.train()
        for _ in range(cfg.inner_epochs):
            order = torch.randperm(len(x0), generator=self.gens["train"], device=device)
            for group in self._accumulation_groups(order):
                self.opt.zero_grad()
                size = sum(len(mb) for mb in group)
                for mb in group:
                    per_sample = denoising_loss(
                        self.unet, self.noise_sched, x0[mb], cond[mb], self.gens["train"],
                        reduce=False,
                    )  # fmt: skip
                    pre = torch.randint(
                        len(pool_x), (len(mb),), generator=self.gens["train"], device=device
                    )
                    pre_loss = denoising_loss(
                        self.unet, self.noise_sched, pool_x[pre], pool_c[pre], self.gens["train"]
                    )
                    loss = (weights[mb] * per_sample).mean() + cfg.rwl_beta * pre_loss
                    (loss * (len(mb) / size)).backward()
                    losses.append(loss.item())
                self._clip_finite_gradients()
                self.opt.step()
        return {"loss": float(np.mean(losses)), "approx_kl": float("nan"), "clipfrac": float("nan")}

    def _clip_finite_gradients(self) -> None:
        """Clip the gradient norm; a non-finite one (a NaN or inf loss, or weights gone NaN)
        stops the run before the optimizer step, so no NaN weights are checkpointed and the
        last finite checkpoints are not pruned."""
        norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.max_grad_norm)
        if not torch.isfinite(norm):
            raise ValueError(
                f"step {self.step + 1}: the gradient is not finite (NaN or inf); the update was "
                "not applied and the run stops (a resume would replay this step exactly): start "
                "a new run directory, e.g. with a lower --lr"
            )

    def distance_to_init(self) -> float:
        with torch.no_grad():
            sq = sum(
                ((p - p0) ** 2).sum()
                for p, p0 in zip(self.unet.parameters(), self.initial, strict=True)
            )
        return float(torch.sqrt(sq))

    def train_step(self, reward: ServiceReward) -> dict[str, Any]:
        began = time.perf_counter()
        batches, rewards, latency = self._collect(reward)
        sampled = time.perf_counter()
        update = self._ddpo_update if self.cfg.algorithm == "ddpo" else self._rwl_update
        stats = update(batches, rewards)
        self.step += 1
        images = np.concatenate([b.images for b in batches])
        labels = np.concatenate([b.labels for b in batches])
        prompts = [p for b in batches for p in b.prompts]
        rd.save_samples(self.run, self.step, images, prompts, rewards, labels)
        judged = alignment(self.judge, images, labels)
        row = {
            "step": self.step,
            "algorithm": self.cfg.algorithm,
            "reward_field": self.cfg.reward,
            "mean_reward": float(rewards.mean()),
            **{f"judge_{k}": v for k, v in judged.items()},
            "distance_to_init": self.distance_to_init(),
            "reward_latency_s": latency,
            "sample_s": sampled - began,
            "train_s": time.perf_counter() - sampled,
            **stats,
        }
        rd.append_metrics(self.run, row)
        if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
            self.checkpoint()
        return row


def run_finetune(
    cfg: FinetuneConfig,
    run: Path,
    api_key: str | None = None,
    progress: Progress | None = None,
) -> Trainer:
    """Train (or resume) until `cfg.steps`; returns the trainer at its last step. The API key
    is not part of the config (never written to the run directory)."""
    reward_fn = ServiceReward(
        cfg.service_url, cfg.reward, api_key=api_key, textnorm=cfg.textnorm_options()
    )
    with reward_fn as reward:
        reward.check()  # reachable, and the key accepted, before the models load (seconds)
        trainer = Trainer(cfg, run)
        trainer.open_run()
        progress = progress or Progress()
        _run_steps(trainer, reward, progress)
    return trainer


def _run_steps(trainer: Trainer, reward: ServiceReward, progress: Progress) -> None:
    """Train steps until the config's step count, with a progress bar."""
    cfg = trainer.cfg
    with progress:
        task = progress.add_task(
            f"{cfg.algorithm} / {cfg.reward}", total=cfg.steps, completed=trainer.step
        )
        while trainer.step < cfg.steps:
            row = trainer.train_step(reward)
            progress.update(
                task,
                advance=1,
                description=f"{cfg.algorithm} / {cfg.reward} (reward {row['mean_reward']:.3f}, "
                f"count {row['judge_count']:.2f})",
            )
