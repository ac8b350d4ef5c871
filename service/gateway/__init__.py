"""The REST gateway of the reward service (DESIGN.md 4-5): FastAPI in front of the reward models.

Modules: `app` (the app factory and routes), `schemas` (typed request/response models),
`scoring` (contrastive sets → embeddings → rewards), `images` (base64 decoding and limits),
`embedding_cache`, `prompt_set_registry`, `identity` (is the backend serving the
provenance's export?), `backend` (the backend protocol, its errors and the guard rails around
its calls), `coalescing` (concurrent requests' backend calls merged into one),
`triton_backend` (Triton over gRPC), `onnx_backend` (ONNX Runtime in process),
`provenance`, `auth` (API keys, `check_bind`), `middleware`, `metrics`, `errors`,
`request_ids`. CLIP tokenisation comes from the client distribution
(`textnorm_reward_client.clip_tokenizer`), so the direct gRPC client sends the same token ids.
Torch-free; nothing received is ever unpickled or evaluated.
"""

from service.gateway.app import create_app
from service.gateway.auth import check_bind
from service.gateway.backend import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    GuardedBackend,
    ModelMismatch,
    RewardBackendProtocol,
)
from service.gateway.provenance import load_provenance

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "GuardedBackend",
    "ModelMismatch",
    "RewardBackendProtocol",
    "check_bind",
    "create_app",
    "load_provenance",
]
