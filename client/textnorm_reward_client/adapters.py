"""Reward functions in the shapes the RL loops people use expect (numpy needed).

- `DdpoRewardFn`: ddpo-pytorch / flow_grpo / TRL-DDPO's `reward_fn(images, prompts, metadata)
  -> (rewards: np.ndarray, info: dict)`, and `.submit(...)`, the same call returning a
  `concurrent.futures.Future`, so the reward request overlaps the next sampling step (as
  ddpo-pytorch's `executor.submit(reward_fn, ...)` does).
- `grpo_reward_fn` / `async_grpo_reward_fn`: TRL `GRPOTrainer` reward functions
  `reward(prompts, completions, **kwargs) -> list[float]` (plain and `async def`) for image
  completions.
- `PerPromptStatTracker`: DDPO's running per-prompt mean/std advantages across steps.
- `group_advantages`: a flat batch grouped by prompt, each group scored with `score_group`
  (the service's (r − mean) / (std + eps) over the group), back in the batch's order.

Every function raises `RewardServiceError` when the batch cannot be scored: a reward is never
silently missing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from textnorm_reward_client import images as image_inputs
from textnorm_reward_client.errors import client_error
from textnorm_reward_client.results import REWARD_FIELDS, ScoreResult


def _checked(field: str) -> str:
    if field not in REWARD_FIELDS:
        raise ValueError(f"unknown reward {field!r}: one of {', '.join(REWARD_FIELDS)}")
    return field


def _required(result: ScoreResult, field: str) -> np.ndarray:
    """The `field` rewards, every one present: a null (an export without a head asked for
    "head"; TextNorm of a prompt left without a contrastive set by allow_missing) raises,
    where a NaN would pass into the advantages unnoticed."""
    rewards = result.rewards(field)
    missing = np.flatnonzero(np.isnan(rewards))
    if missing.size:
        raise client_error(
            "reward_missing",
            f"the service gave no {field!r} reward for {missing.size} of {rewards.size} items "
            f"(first: item {int(missing[0])}); ask for a field every item has",
            request_id=result.request_id,
        )
    return rewards


def _info(result: ScoreResult) -> dict[str, Any]:
    info: dict[str, Any] = {name: result.rewards(name) for name in REWARD_FIELDS}
    info.update(request_id=result.request_id, provenance=result.provenance)
    return info


class DdpoRewardFn:
    """ddpo-pytorch / flow_grpo reward function over a `RewardClient` (or `GrpcRewardClient`).

        reward_fn = DdpoRewardFn(client, field="textnorm")
        rewards, info = reward_fn(images, prompts, metadata)      # blocking
        future = reward_fn.submit(images, prompts, metadata)      # overlaps the next sampling
        ...  # sample the next batch
        rewards, info = future.result()

    images: a [N, 3, H, W] tensor in [0, 1] (what the VAE decodes to), a uint8 [N, H, W, 3]
    array, or a list of any image kind. metadata: per-image dicts (unused by the service; kept
    in `info["metadata"]`). textnorm: options for every call ({"contrastive": [...]} /
    {"prompt_set": id}). info holds every reward field as an array, the request id and the
    provenance.
    """

    def __init__(
        self,
        client: Any,
        field: str = "textnorm",
        textnorm: dict[str, Any] | None = None,
        max_pending: int = 2,
    ) -> None:
        self.client, self.field, self.textnorm = client, _checked(field), textnorm
        self._executor = ThreadPoolExecutor(max_pending, thread_name_prefix="reward-fn")
        self.__name__ = f"textnorm_{field}"

    def __call__(
        self, images: Any, prompts: Sequence[str], metadata: Sequence[Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        result = self.client.score(images, list(prompts), textnorm=self.textnorm)
        info = _info(result)
        info["metadata"] = list(metadata) if metadata is not None else None
        return _required(result, self.field).astype(np.float32), info

    def submit(
        self, images: Any, prompts: Sequence[str], metadata: Sequence[Any] | None = None
    ) -> Future[tuple[np.ndarray, dict[str, Any]]]:
        """The call in a background thread. Tensors and arrays are copied to host memory here,
        before returning, so sampling may overwrite its buffers (and no CUDA call runs in a
        thread)."""
        items = [
            np.array(i) if isinstance(i, np.ndarray) else i  # views of the caller's buffer
            for i in image_inputs.expand(images)
        ]
        return self._executor.submit(self, items, list(prompts), metadata)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _prompt_text(prompt: Any) -> str:
    """A TRL prompt: text, or a conversation (the last user message's text)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        users = [m for m in prompt if m.get("role") == "user"] or prompt
        content = users[-1].get("content", "")
        if isinstance(content, list):  # multimodal content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    raise TypeError(f"unsupported prompt type {type(prompt).__name__}")


def grpo_reward_fn(
    client: Any, field: str = "textnorm", textnorm: dict[str, Any] | None = None
) -> Callable[..., list[float]]:
    """A TRL `GRPOTrainer` reward function over a `RewardClient`:

        trainer = GRPOTrainer(..., reward_funcs=[grpo_reward_fn(client)])

    completions are the generated images (one per prompt; any image kind). TRL computes the
    group advantages itself from these rewards."""
    _checked(field)

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = [_prompt_text(p) for p in prompts]
        result = client.score(list(completions), texts, textnorm=textnorm)
        return _required(result, field).tolist()

    reward.__name__ = f"textnorm_{field}"
    return reward


def async_grpo_reward_fn(
    client: Any, field: str = "textnorm", textnorm: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """`grpo_reward_fn` as an `async def` over an `AsyncRewardClient` (TRL awaits coroutine
    reward functions concurrently)."""
    _checked(field)

    async def reward(
        prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        texts = [_prompt_text(p) for p in prompts]
        result = await client.score(list(completions), texts, textnorm=textnorm)
        return _required(result, field).tolist()

    reward.__name__ = f"textnorm_{field}"
    return reward


class PerPromptStatTracker:
    """DDPO's per-prompt advantages: each prompt's rewards are kept in a buffer of the last
    `buffer_size` (across steps); a prompt seen at least `min_count` times is normalised by its
    own mean and std, else by the batch's. (r − mean) / (std + 1e-6), population std.

        tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
        advantages = tracker.update(prompts, rewards)
    """

    def __init__(self, buffer_size: int, min_count: int, eps: float = 1e-6) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Sequence[float] | np.ndarray) -> np.ndarray:
        prompts_arr = np.asarray(list(prompts), dtype=object)
        rewards_arr = np.asarray(rewards, dtype=np.float64)
        if prompts_arr.shape != rewards_arr.shape:
            raise ValueError(f"{len(prompts_arr)} prompts but {rewards_arr.shape} rewards")
        advantages = np.empty_like(rewards_arr)
        for prompt in dict.fromkeys(prompts_arr.tolist()):
            mask = prompts_arr == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards_arr[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards_arr.mean(), rewards_arr.std()
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[mask] = (rewards_arr[mask] - mean) / (std + self.eps)
        return advantages

    def get_stats(self) -> dict[str, dict[str, float]]:
        return {
            p: {"mean": float(np.mean(b)), "std": float(np.std(b)), "count": len(b)}
            for p, b in self.stats.items()
        }

    def clear(self) -> None:
        self.stats = {}


def group_advantages(
    client: Any,
    images: Any,
    prompts: Sequence[str],
    field: str = "textnorm",
    textnorm: dict[str, Any] | None = None,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, advantages) in the batch's order: the batch grouped by prompt, one
    `score_group` per prompt (the service's per-group (r − mean) / (std + eps))."""
    items = image_inputs.expand(images)
    prompts = list(prompts)
    if len(items) != len(prompts):
        raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
    rewards = np.empty(len(items))
    advantages = np.empty(len(items))
    for prompt in dict.fromkeys(prompts):
        index = [i for i, p in enumerate(prompts) if p == prompt]
        group = client.score_group(
            prompt, [items[i] for i in index], textnorm=textnorm,
            advantage_of=_checked(field), advantage_eps=eps,
        )  # fmt: skip
        rewards[index] = _required(group, field)
        advantages[index] = group.advantage_array()
    return rewards, advantages
