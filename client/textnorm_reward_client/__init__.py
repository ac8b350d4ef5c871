"""Trainer-side client of the TextNorm reward service: its own distribution, no torch, no
server dependencies, a package name that will not collide in a trainer's env.

    from textnorm_reward_client import RewardClient          # REST: httpx + tenacity only
    with RewardClient("http://reward:8000", api_key="...") as client:
        result = client.score(images, prompts)               # bytes, paths, PIL, numpy, torch
        result.rewards("textnorm")                           # numpy array, item order

    from textnorm_reward_client import AsyncRewardClient     # the same interface for asyncio
    from textnorm_reward_client import GrpcRewardClient      # direct Triton gRPC: the grpc extra
    from textnorm_reward_client import adapters              # DDPO / flow_grpo / TRL reward fns

numpy is imported only for array inputs and `.rewards()`; torch never (a tensor is converted
with its own methods).
"""

from textnorm_reward_client.async_client import AsyncRewardClient
from textnorm_reward_client.client import RewardClient
from textnorm_reward_client.core import RetryPolicy
from textnorm_reward_client.errors import RewardServiceError
from textnorm_reward_client.results import (
    GroupResult,
    ItemResult,
    MemberReward,
    ScoreResult,
    ServiceLimits,
)

__all__ = [
    "AsyncRewardClient",
    "GroupResult",
    "GrpcRewardClient",
    "ItemResult",
    "MemberReward",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "ScoreResult",
    "ServiceLimits",
]


def __getattr__(name: str):
    if name == "GrpcRewardClient":  # imports numpy and tritonclient: only when asked for
        from textnorm_reward_client.grpc_client import GrpcRewardClient

        return GrpcRewardClient
    raise AttributeError(name)
