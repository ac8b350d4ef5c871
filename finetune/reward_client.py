"""Every call the trainers make to the reward service, in one place (through the client only).

`ServiceReward` takes uint8 images [N, H, W, 3] and prompts and returns the chosen reward field
as a float64 array plus the service's provenance block. The images go to the service as raw
uint8 tensors (no PNG encoding; `textnorm_reward_client` chunks by the service's limits and
retries). `submit` runs a call on a worker thread so the reward of batch k overlaps the
sampling of batch k + 1. `every_reward` returns every field at once (`finetune reward-signal`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from textnorm_reward_client import RewardClient

# ensemble_models_uw: the two-model ensemble, from a service with REWARD_MEMBERS set
REWARD_FIELDS = ("raw", "textnorm", "head", "textnorm_head", "ensemble_uw", "ensemble_models_uw")
# The fields that need no contrastive set: the set a service builds does not change them.
SET_FREE_FIELDS = ("raw", "head")


@dataclass
class RewardBatch:
    rewards: np.ndarray  # float64 [N], the chosen field
    provenance: dict[str, Any]
    latency_s: float  # wall time of the service call (encoding included)
    # per item, the sha256 of the contrastive set TextNorm used (None: no set)
    contrastive_sha256: list[str | None] = field(default_factory=list)


class ServiceReward:
    """The reward service as a reward function of (images, prompts), for one reward field."""

    def __init__(
        self,
        url: str,
        field: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        textnorm: dict[str, Any] | None = None,
    ) -> None:
        """textnorm: the request's TextNorm options, e.g. {"rule": "counting"} (None: the
        service's defaults)."""
        if field not in REWARD_FIELDS:
            raise ValueError(f"unknown reward {field!r}; known: {', '.join(REWARD_FIELDS)}")
        self.url, self.field, self.textnorm = url, field, textnorm
        self._client = RewardClient(url, api_key=api_key, timeout_s=timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def check(self) -> None:
        """Raise `RewardServiceError` unless the service answers GET /v1/models (reachable, and
        the API key accepted): a trainer calls it before it spends seconds loading models."""
        self._client.limits()

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardBatch:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        began = time.perf_counter()
        out = self._client.score(np.ascontiguousarray(images), list(prompts), self.textnorm)
        latency = time.perf_counter() - began
        rewards, provenance = out.rewards(self.field), out.provenance  # NaN where null
        if np.isnan(rewards).any():
            raise ValueError(
                f"the service returned no {self.field!r} reward (is a head, or a second "
                "model, served?)"
            )
        sets = [item.contrastive_sha256 for item in out.results]
        return RewardBatch(rewards, provenance, latency, sets)

    def submit(self, images: np.ndarray, prompts: list[str]) -> Future[RewardBatch]:
        """The same call on the worker thread: returns at once."""
        return self._pool.submit(self, images, list(prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> ServiceReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def every_reward(
    client: RewardClient,
    images: np.ndarray,
    prompts: list[str],
    textnorm: dict[str, Any] | None = None,
    batch: int = 64,
    advance: Callable[[int], object] = lambda n: None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every reward field the service returns for (images, prompts) under the request's
    `textnorm` options: {field: float64 [N], NaN where null}, and the last call's provenance.
    `batch` images per call; `advance(n)` after each (a progress bar's)."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in REWARD_FIELDS}
    provenance: dict[str, Any] = {}
    for start in range(0, len(images), batch):
        chunk = np.ascontiguousarray(images[start : start + batch])
        out = client.score(chunk, list(prompts[start : start + batch]), textnorm)
        for name in REWARD_FIELDS:
            columns[name].append(out.rewards(name))
        provenance = out.provenance
        advance(len(chunk))
    return {k: np.concatenate(v) for k, v in columns.items()}, provenance
