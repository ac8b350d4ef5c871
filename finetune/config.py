"""What a fine-tuning run is asked for (`reward-service finetune run`'s options), checked when
built.

Torch-free and cheap to import, so the CLI refuses a bad option at once, before torch, diffusers
and the generator load; `finetune.trainers` runs the configuration. The run directory keeps it
as config.json: a resume must match it except for `RESUMABLE_CHANGES`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from finetune.reward_client import REWARD_FIELDS
from finetune.world_data import SHIPPED_GENERATOR_DIR, SHIPPED_JUDGE_DIR

ALGORITHMS = ("ddpo", "rwl")
TRAIN_TIMESTEPS = 1000  # the generator's noise schedule (finetune.generator.noise_scheduler)


@dataclass(frozen=True)
class FinetuneConfig:
    algorithm: str = "ddpo"
    reward: str = "textnorm"
    # the request's TextNorm options (None: the service's defaults, the `auto` rule and its
    # calibrated c); "counting" scores each prompt against its count changes only
    textnorm_rule: str | None = None
    textnorm_scale: float | None = None
    service_url: str = "http://127.0.0.1:8000"
    steps: int = 20
    seed: int = 0
    device: str = "cpu"
    generator: str = str(SHIPPED_GENERATOR_DIR)
    judge: str = str(SHIPPED_JUDGE_DIR)
    prompts: int = 12  # size of the fixed prompt set (balanced over counts)
    prompt_seed: int = 0
    sample_batch_size: int = 8
    batches_per_step: int = 2
    ddim_steps: int = 10
    eta: float = 1.0
    guidance: float = 3.0
    lr: float = 3e-5  # 3e-4 wrecked colour within 2 steps (Adam moves every weight by ~lr)
    inner_epochs: int = 1
    train_batch_size: int = 8
    # minibatches whose gradients add up to one optimizer step (ddpo-pytorch's
    # train.gradient_accumulation_steps). 1: a step per minibatch, so the later minibatches of
    # a round are scored against a policy that already moved: 21-24% of a round's ratios fell
    # outside clip_range at these defaults, 40% with 4 minibatches (README)
    gradient_accumulation: int = 1
    clip_range: float = 1e-4  # ddpo-pytorch's default
    adv_clip_max: float = 5.0
    tracker_buffer: int = 32
    tracker_min_count: int = 8
    rwl_beta: float = 1.0
    rwl_pretrain_pool: int = 1024
    max_grad_norm: float = 1.0
    checkpoint_every: int = 1
    keep_checkpoints: int = 3  # about 13 MB each (UNet + Adam state)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; known: {', '.join(ALGORITHMS)}"
            )
        if self.reward not in REWARD_FIELDS:
            raise ValueError(f"unknown reward {self.reward!r}; known: {', '.join(REWARD_FIELDS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.textnorm_scale is not None and not 0 < self.textnorm_scale < float("inf"):
            raise ValueError(f"textnorm_scale must be > 0, got {self.textnorm_scale}")
        if not 0 < self.eta <= 1:  # > 1: a negative variance, not DDIM; 0: no log-probability
            raise ValueError(f"eta must be in (0, 1], got {self.eta}")
        if not 1 <= self.ddim_steps < TRAIN_TIMESTEPS:
            most = TRAIN_TIMESTEPS - 1
            raise ValueError(f"ddim_steps must be in 1..{most}, got {self.ddim_steps}")
        if self.gradient_accumulation < 1:
            raise ValueError(
                f"gradient_accumulation must be >= 1, got {self.gradient_accumulation}"
            )
        for name in ("lr", "clip_range"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def textnorm_options(self) -> dict[str, Any] | None:
        """The `textnorm` object of every reward request (None: the service's defaults)."""
        options = {"rule": self.textnorm_rule, "scale": self.textnorm_scale}
        return {k: v for k, v in options.items() if v is not None} or None

    @classmethod
    def from_json(cls, data: dict) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Settings a resume may change (the rest must match the run directory's config.json).
RESUMABLE_CHANGES = ("steps", "service_url", "device", "checkpoint_every", "keep_checkpoints")
