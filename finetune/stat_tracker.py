"""Per-prompt reward statistics for DDPO advantages (ddpo-pytorch's `PerPromptStatTracker`).

advantage = (r − mean_prompt) / (std_prompt + 1e-6) over the last `buffer_size` rewards of the
same prompt; until a prompt has `min_count` rewards, the statistics of the whole batch are used.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = np.array([p == prompt for p in prompts])
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            pool = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - pool.mean()) / (pool.std() + 1e-6)
        return advantages

    def state(self) -> dict[str, list[float]]:
        return {p: list(b) for p, b in self.stats.items()}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}
