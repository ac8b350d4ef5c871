"""The gateway's production backend: the Triton reward models over KServe v2 gRPC (asyncio).

`RewardBackend` wraps `tritonclient.grpc.aio.InferenceServerClient` with the tensor contract of
`service.model_contract`: images → image embeddings, token ids → text embeddings, and the
reward head (every output it declares, read from its metadata at connect time), plus the export
hash each model's config carries. Errors come out as the backend protocol's types
(`service.gateway.backend`), so the gateway can map them to status codes:

- `BackendUnavailable`: the server cannot be reached, is shutting down or a model is not
  loaded — answer 503; a call past its deadline is `BackendTimeout` (a subclass) — 504;
- `BackendError`: the server answered with an error about the request or the model — 502.

`url` is `host:port`, or any gRPC target such as `dns:///triton-headless:8001`: with a DNS
name the channel resolves every address behind it (a headless Service's pods) and balances
calls over them round robin (`grpc.lb_policy_name`), since one HTTP/2 connection through a
ClusterIP would pin every call to one pod.

The gRPC channel is created lazily inside the running event loop, with unlimited message sizes
(a 2048×2048×3 uint8 image is 12 MiB, over gRPC's 4 MiB default) and short reconnect backoff,
so after a Triton restart on the same address the same object recovers within about a second,
without being recreated. Torch-free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from service.gateway.backend import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ModelMismatch,
    StubUnhealthy,
)
from service.gateway.identity import hash_in_config
from service.model_contract import (
    CONTEXT_LENGTH,
    EXPORT_HASH_PARAMETER,
    image_encoder,
    reward_head,
    text_encoder,
)

_IMAGE = image_encoder(0)
_TEXT = text_encoder(0)
_HEAD = reward_head(0, has_head=False)
IMAGE_INPUT = _IMAGE.inputs[0].name
IMAGE_OUTPUT = _IMAGE.outputs[0].name
TEXT_INPUT = _TEXT.inputs[0].name
TEXT_OUTPUT = _TEXT.outputs[0].name
HEAD_INPUTS = tuple(t.name for t in _HEAD.inputs)  # IMAGE_EMBEDS, PROMPT_EMBEDS, ...

# gRPC status codes that mean "the backend is not there (now)", not "the request is wrong".
_UNAVAILABLE_CODES = {"UNAVAILABLE", "CANCELLED", "ABORTED"}
_TIMEOUT_CODES = {"DEADLINE_EXCEEDED"}
# Counters in inference statistics (uint64, which protobuf JSON writes as strings).
_COUNT_KEYS = {"count", "ns", "batch_size", "inference_count", "execution_count", "last_inference"}


def _code_name(status: str | None) -> str:
    return (status or "").rsplit(".", 1)[-1].upper()


def _translate(exc: BaseException, what: str) -> Exception:
    if isinstance(exc, InferenceServerException):
        code, message = _code_name(exc.status()), exc.message() or str(exc)
    elif isinstance(exc, grpc.RpcError):
        code = exc.code().name if hasattr(exc, "code") and exc.code() else ""  # type: ignore[attr-defined]
        message = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[attr-defined]
    elif isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return BackendTimeout(f"{what}: timed out")
    else:  # closed channel and similar transport trouble
        return BackendUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    if code in _TIMEOUT_CODES:
        return BackendTimeout(f"{what}: [{code}] {message}")
    if code in _UNAVAILABLE_CODES or "failed to connect" in (message or "").lower():
        return BackendUnavailable(f"{what}: [{code}] {message}")
    if "stub process" in (message or "").lower() and "not healthy" in (message or "").lower():
        # A Python-backend process died: Triton must be restarted (`serve`'s watchdog does),
        # so the request is worth retrying there, not a 502 about this request.
        return StubUnhealthy(f"{what}: a Triton Python-backend process died ({message})")
    if "unknown model" in (message or "").lower() and "version" in (message or "").lower():
        return ModelMismatch(f"{what}: Triton serves another export ([{code}] {message})")
    return BackendError(f"{what}: [{code}] {message}")


def _numbers(value: Any, key: str = "") -> Any:
    """Protobuf JSON → Python with counters as ints."""
    if isinstance(value, dict):
        return {k: _numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v, key) for v in value]
    if key in _COUNT_KEYS and isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def executions_by_batch_size(stats: Mapping[str, Any]) -> dict[int, int]:
    """{batch size: number of model executions with it} from `RewardBackend.model_stats`."""
    return {
        int(entry["batch_size"]): int(entry.get("compute_infer", {}).get("count", 0))
        for entry in stats.get("batch_stats", [])
    }


class RewardBackend:
    """The three reward models of one Triton server, over gRPC (asyncio).

    Args:
        url: `host:port` of Triton's gRPC endpoint (e.g. `TritonServer.grpc_url`).
        timeout: seconds per call (inference and metadata), as a gRPC deadline.
        ready_timeout: seconds per health call in `ready()`.
        image_model, text_model, reward_model: model names in the repository.
        max_message_bytes: gRPC send/receive limit; -1 = unlimited.
        reconnect_backoff_ms: (initial, max) reconnect backoff of the channel after a failure.
        channel_args: extra gRPC channel arguments.
        model_version: the export's version, named in every call ("": whatever is loaded).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        ready_timeout: float = 2.0,
        image_model: str = _IMAGE.name,
        text_model: str = _TEXT.name,
        reward_model: str = _HEAD.name,
        max_message_bytes: int = -1,
        reconnect_backoff_ms: tuple[int, int] = (100, 1000),
        channel_args: Sequence[tuple[str, Any]] = (),
        model_version: int | None = None,
        on_stub_unhealthy: Callable[[], None] | None = None,
        channel_max_age_s: float = 0.0,
    ) -> None:
        self.url = url
        self.on_stub_unhealthy = on_stub_unhealthy  # `serve`: tells the watchdog
        # Every call names the export's model version (provenance.json's model_version), so a
        # Triton pod that serves another export refuses it (ModelMismatch) instead of answering.
        self.version = "" if model_version is None else str(model_version)
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self.image_model = image_model
        self.text_model = text_model
        self.reward_model = reward_model
        initial, maximum = reconnect_backoff_ms
        self._channel_args = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", initial),
            ("grpc.min_reconnect_backoff_ms", initial),
            ("grpc.max_reconnect_backoff_ms", maximum),
            ("grpc.keepalive_time_ms", 2**31 - 1),
            ("grpc.lb_policy_name", "round_robin"),  # every address a DNS target resolves to
            *channel_args,
        ]
        self._client: InferenceServerClient | None = None
        # gRPC resolves DNS again only when a connection fails: a channel kept for ever never
        # sees Triton pods added behind a headless Service. A channel older than this is
        # replaced (0: never); calls in flight finish on it, then it is closed.
        self.channel_max_age_s = channel_max_age_s
        self._client_since = 0.0
        self._retired: dict[InferenceServerClient, asyncio.Task] = {}
        self.reward_outputs: tuple[str, ...] | None = None  # from reward_head's metadata
        self.embed_dim: int | None = None

    @property
    def models(self) -> tuple[str, str, str]:
        """The models this backend calls (image, text, reward head), by repository name."""
        return (self.image_model, self.text_model, self.reward_model)

    # -- connection ----------------------------------------------------------------------------
    def _grpc(self) -> InferenceServerClient:
        now = time.monotonic()
        age = now - self._client_since
        if self._client is not None and self.channel_max_age_s and age > self.channel_max_age_s:
            self._retire(self._client)
            self._client = None
        if self._client is None:  # created inside the running loop
            self._client = InferenceServerClient(self.url, channel_args=self._channel_args)
            self._client_since = now
        return self._client

    def _retire(self, client: InferenceServerClient) -> None:
        """Close `client` once every call on it has ended (each is bounded by the timeout)."""

        async def close_later() -> None:
            await asyncio.sleep(self.timeout + 1.0)
            self._retired.pop(client, None)
            await client.close()

        self._retired[client] = asyncio.get_running_loop().create_task(close_later())

    async def _call(self, what: str, coro_fn, *args, **kwargs):
        try:
            return await coro_fn(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except (BackendUnavailable, BackendError):
            raise
        except Exception as exc:  # tritonclient, grpc and channel errors
            error = _translate(exc, what)
            if isinstance(error, StubUnhealthy) and self.on_stub_unhealthy is not None:
                self.on_stub_unhealthy()
            raise error from exc

    async def connect(self) -> RewardBackend:
        """Read the reward head's outputs (and the embedding size) from model metadata."""
        client = self._grpc()
        meta = await self._call(
            f"{self.reward_model} metadata",
            client.get_model_metadata,
            self.reward_model,
            self.version,
            as_json=True,
            client_timeout=self.timeout,
        )
        self.reward_outputs = tuple(o["name"] for o in meta["outputs"])
        dims = {i["name"]: [int(d) for d in i["shape"]] for i in meta["inputs"]}
        self.embed_dim = dims.get(HEAD_INPUTS[0], [-1, -1])[-1]
        return self

    async def close(self) -> None:
        """Close the channel; a later call opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        for old, task in list(self._retired.items()):
            task.cancel()
            await old.close()
        self._retired.clear()

    async def __aenter__(self) -> RewardBackend:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- health --------------------------------------------------------------------------------
    async def ready(self) -> bool:
        """Server live and ready, and the three models ready; False on any failure."""
        client = self._grpc()
        t = self.ready_timeout
        try:
            if not await client.is_server_live(client_timeout=t):
                return False
            if not await client.is_server_ready(client_timeout=t):
                return False
            for model in (self.image_model, self.text_model, self.reward_model):
                if not await client.is_model_ready(model, self.version, client_timeout=t):
                    return False
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        return True

    async def model_stats(self, model: str) -> dict[str, Any]:
        """Inference statistics of `model` (all versions merged into the first entry's form).

        Keys as Triton's statistics extension: `inference_count`, `execution_count`,
        `inference_stats`, `batch_stats` (one entry per executed batch size; see
        `executions_by_batch_size`). Counters are ints.
        """
        stats = await self._call(
            f"{model} statistics",
            self._grpc().get_inference_statistics,
            model,
            as_json=True,
            client_timeout=self.timeout,
        )
        entries = [_numbers(e) for e in stats.get("model_stats", [])]
        if not entries:
            raise BackendError(f"{model}: no statistics")
        return entries[0]

    async def export_hashes(self, models: Sequence[str]) -> dict[str, str | None]:
        """The export content hash in each model's config (None where it has none). Without
        our version, the hash of the version Triton does serve (to name it in the error)."""
        out: dict[str, str | None] = {}
        for model in models:
            try:
                out[model] = await self._export_hash(model, self.version)
            except (ModelMismatch, BackendError):  # not our version: what is there instead?
                try:
                    out[model] = await self._export_hash(model, "")
                except (ModelMismatch, BackendError):  # no such model at all
                    out[model] = None
        return out

    async def _export_hash(self, model: str, version: str) -> str | None:
        config = await self._call(
            f"{model} config",
            self._grpc().get_model_config,
            model,
            version,
            as_json=True,
            client_timeout=self.timeout,
        )
        return hash_in_config(config.get("config", {}), EXPORT_HASH_PARAMETER)

    # -- inference -----------------------------------------------------------------------------
    async def _infer(
        self, model: str, inputs: Iterable[tuple[str, np.ndarray]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        tensors = []
        for name, array in inputs:
            t = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            tensors.append(t)
        requested = [InferRequestedOutput(name) for name in outputs]
        result = await self._call(
            f"{model} inference",
            self._grpc().infer,
            model,
            tensors,
            model_version=self.version,
            outputs=requested,
            client_timeout=self.timeout,
        )
        out = {}
        for name in outputs:
            value = result.as_numpy(name)
            if value is None:
                raise BackendError(f"{model}: no output {name} in the response")
            out[name] = value
        return out

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] RGB images (one size per call) → float32 [B, D] embeddings."""
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B,H,W,3], got {images.dtype} {images.shape}")
        out = await self._infer(self.image_model, [(IMAGE_INPUT, images)], [IMAGE_OUTPUT])
        return out[IMAGE_OUTPUT]

    async def encode_texts(self, ids: np.ndarray) -> np.ndarray:
        """int64 [B, T] token ids (2 ≤ T ≤ 77) → float32 [B, D] embeddings."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or not 2 <= ids.shape[1] <= CONTEXT_LENGTH:
            raise ValueError(f"ids must be [B, 2..{CONTEXT_LENGTH}], got {ids.shape}")
        out = await self._infer(self.text_model, [(TEXT_INPUT, ids)], [TEXT_OUTPUT])
        return out[TEXT_OUTPUT]

    async def rewards(
        self,
        image_embeds: np.ndarray,
        prompt_embeds: np.ndarray,
        prompt_mask: np.ndarray,
        scale: np.ndarray,
        lam: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Every reward the head declares ({"RAW": [B,1], "TEXTNORM": [B,1], ...}).

        image_embeds float32 [B, D]; prompt_embeds float32 [B, 33, D]; prompt_mask bool [B, 33];
        scale and lam float32 [B, 1] (TextNorm scale c, ensemble λ).
        """
        if self.reward_outputs is None:
            await self.connect()
        assert self.reward_outputs is not None
        arrays = [
            np.ascontiguousarray(image_embeds, dtype=np.float32),
            np.ascontiguousarray(prompt_embeds, dtype=np.float32),
            np.ascontiguousarray(prompt_mask, dtype=np.bool_),
            np.ascontiguousarray(scale, dtype=np.float32),
            np.ascontiguousarray(lam, dtype=np.float32),
        ]
        batch = {a.shape[0] if a.ndim else -1 for a in arrays}
        if len(batch) != 1:
            raise ValueError(f"reward inputs disagree on the batch size: {sorted(batch)}")
        return await self._infer(
            self.reward_model, zip(HEAD_INPUTS, arrays, strict=True), self.reward_outputs
        )
