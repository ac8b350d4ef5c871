"""Trainer-side client of the TextNorm reward service (REST). Needs only httpx and tenacity:
no torch, no server dependencies, a package name that will not collide in a trainer's env.

    from textnorm_reward_client import RewardClient
    with RewardClient("http://reward:8000", api_key="...") as client:
        results = client.score([png_bytes, ...], ["three red circles", ...])
"""

from textnorm_reward_client.client import RewardClient, RewardServiceError

__all__ = ["RewardClient", "RewardServiceError"]
