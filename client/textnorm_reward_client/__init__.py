"""Trainer-side client of the TextNorm reward service: its own distribution, no torch, no
server dependencies, a package name that will not collide in a trainer's env.

    from textnorm_reward_client import RewardClient          # REST: httpx + tenacity only
    with RewardClient("http://reward:8000", api_key="...") as client:
        results = client.score([png_bytes, ...], ["three red circles", ...])

    from textnorm_reward_client import GrpcRewardClient      # direct Triton gRPC: the grpc extra
    with GrpcRewardClient("dns:///triton-grpc:8001", "repo/") as client:   # provenance + tokenizer
        rewards = client.score(uint8_images, "three red circles", contrastive_prompts)
"""

from textnorm_reward_client.client import RewardClient, RewardServiceError

__all__ = ["GrpcRewardClient", "RewardClient", "RewardServiceError"]


def __getattr__(name: str):
    if name == "GrpcRewardClient":  # imports numpy and tritonclient: only when asked for
        from textnorm_reward_client.grpc_client import GrpcRewardClient

        return GrpcRewardClient
    raise AttributeError(name)
