"""All configuration in one typed object, read from `REWARD_*` environment variables."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models import SHIPPED_CALIBRATION_FILE, SHIPPED_HEAD_DIR, SHIPPED_MODEL_DIR

# Caches live outside the package (a non-editable install's site-packages is not ours to write).
CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "textnorm-reward"
).absolute()

__all__ = [
    "CACHE_DIR",
    "SHIPPED_CALIBRATION_FILE",
    "SHIPPED_HEAD_DIR",
    "SHIPPED_MODEL_DIR",
    "Settings",
    "get_settings",
    "unknown_env",
]


# The most items a request may ever carry (max_items_per_request's ceiling): the gateway's
# schemas refuse a longer list before validating its elements.
ITEMS_BOUND = 4096


class Settings(BaseSettings):
    # No error ever echoes a value: REWARD_API_KEYS holds secrets (pod logs keep stderr).
    model_config = SettingsConfigDict(
        env_prefix="REWARD_", extra="ignore", hide_input_in_errors=True
    )

    model: str = Field(
        default=str(SHIPPED_MODEL_DIR),
        description="CLIP checkpoint: a local save_pretrained directory or a Hugging Face hub id",
    )
    head: str | None = Field(
        default=str(SHIPPED_HEAD_DIR),
        description="learned reward head directory trained on `model` (None: no head; the "
        "shipped head is the default for the shipped model only)",
    )
    members: list[str] = Field(
        default_factory=list,
        description="further CLIP checkpoints served beside `model` as a multi-model ensemble "
        "(each its own Triton models; they must share `model`'s tokenizer). Responses then add "
        "each member's rewards and the mean and uncertainty-regularised ensembles of the "
        "models' TextNorm probabilities (shipped second member: models/shapes-clip-b). "
        "Environment: a JSON list",
    )
    textnorm_scale: float = Field(default=5.0, gt=0, description="TextNorm scale c")
    ensemble_lambda: float = Field(default=1.0, ge=0, description="λ of the uncertainty ensemble")
    benchmark_seed: int = Field(default=20_240_611, description="seed of the held-out benchmark")
    calibration_seed: int = Field(
        default=12_345,
        description="validation seed of `reward-service calibrate` (never the held-out "
        "benchmark_seed)",
    )
    calibration: str | None = Field(
        default=str(SHIPPED_CALIBRATION_FILE),
        description="calibration JSON (`reward-service calibrate`) the export bundles into the "
        "repository, in its hash: the served default c (and λ) per prompt kind. Applies with "
        "the shipped model only unless given with the model; None: the model's c",
    )
    textnorm_calibration_file: str | None = Field(
        default=None,
        description="calibration JSON written by `reward-service calibrate`: the gateway uses a "
        "prompt set's or a prompt kind's calibrated c (and λ) unless the request sets them "
        "(None: the one the export bundles, if any, else the model's defaults)",
    )

    # -- serving (service/launcher.py): where things listen and what Triton loads ---------------
    host: str = Field(default="127.0.0.1", description="gateway bind address")
    port: int = Field(default=8000, ge=1, le=65535, description="gateway port")
    triton_grpc_port: int | None = Field(default=None, description="Triton gRPC port (None: free)")
    triton_http_port: int | None = Field(default=None, description="Triton HTTP port (None: free)")
    triton_metrics_port: int | None = Field(default=None, description="Triton metrics port")
    repositories_dir: str = Field(
        default=str(CACHE_DIR / "repositories"),
        description="where `serve` exports model repositories (content-addressed, reused)",
    )
    triton_runtime_dir: str = Field(
        default=str(CACHE_DIR / "triton-runtime"),
        description="writable copy of the bundled tritonserver's backends, and its logs",
    )
    repository: str | None = Field(
        default=None,
        description="an exported repository (at least its provenance.json and tokenizer.json): "
        "`gateway` serves the model it names; `serve` uses it as is and never runs the exporter",
    )
    triton_url: str | None = Field(
        default=None,
        description="`gateway`: Triton's gRPC endpoint HOST:PORT, or dns:///NAME:PORT of a "
        "headless Service (resolved to every pod, calls balanced round robin)",
    )
    identity_check_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="how old the check that Triton serves the provenance's models may get "
        "before scoring re-checks it (every /readyz checks too)",
    )
    contrastive_vocabulary_file: str | None = Field(
        default=None,
        description="JSON vocabulary {colours, shapes: {singular: plural}, backgrounds} of the "
        "attributes/auto contrastive rules (default: the shapes world's, "
        "service/contrastive/default_vocabulary.json)",
    )
    prompt_sets_file: str | None = Field(
        default=None,
        description="JSON prompt sets ({prompt: [contrastive, ...]}, the TextNorm authors' "
        "format) loaded at start on every replica, e.g. from a ConfigMap; they apply to their "
        "prompts without naming an id",
    )
    max_batch: int = Field(default=64, ge=1, le=4096, description="Triton max batch size")
    triton_onnx_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="ONNX Runtime intra-op threads of each CPU model instance in Triton (0: "
        "all cores); chosen by `bench serving` (README)",
    )
    triton_instances: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Triton instances of every model (CPU flavour; chosen by `bench "
        "serving`, README)",
    )
    triton_queue_delay_us: int = Field(
        default=500,
        ge=0,
        le=1_000_000,
        description="dynamic batching max queue delay in µs (chosen by `bench serving`; README)",
    )

    precision: Literal["fp32", "int8", "bf16"] = Field(
        default="fp32",
        description="precision of the image and text towers that `serve` exports (CPU): fp32 "
        "(rewards equal the PyTorch reference within 1e-4), int8 (ONNX Runtime dynamic "
        "quantization: about 3x the image tower on a ViT-B/32-sized CLIP on AMX/VNNI cores, "
        "embeddings within 5e-3 of fp32 measured, verify tolerance 2e-2; README 'int8 "
        "towers') or bf16 (OpenVINO, bfloat16 MatMuls on AMX / AVX-512 BF16 cores: about 4x "
        "the fp32 image tower, rewards independent of batch-mates; README 'bf16 towers'). "
        "Responses name it (provenance `precision`)",
    )

    onnx_backend_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="ONNX Runtime intra-op threads of each model in `gateway --onnx` (the "
        "in-process backend, no Triton; 0: all cores)",
    )

    # -- gateway (service/gateway): security, request limits, caches, backend calls ------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer API keys accepted by the gateway's /v1 endpoints (REWARD_API_KEYS: "
        "a JSON list, or one bare key); empty: no auth, and only a loopback bind is allowed",
    )
    max_items_per_request: int = Field(
        default=64,
        ge=1,
        le=ITEMS_BOUND,
        description="items per /v1/score request (and images per group)",
    )
    max_image_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1, description="bytes per image after base64 decoding"
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="width × height per image, checked from the header before decoding",
    )
    max_image_aspect_ratio: float = Field(
        default=20.0,
        gt=1,
        description="longer side / shorter side per image, checked from the header before "
        "decoding (the encoder resizes the shorter side to its input size, so a 1 × N image "
        "would cost N times the pixels)",
    )
    max_request_pixels: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="width × height summed over a request's images, checked from each header "
        "before decoding (bounds a request's decoded memory: 3 bytes per pixel)",
    )
    max_request_bytes: int = Field(
        default=128 * 1024 * 1024, ge=1, description="HTTP request body size in bytes"
    )
    body_read_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="seconds a request body may go without a byte arriving before it is "
        "refused with 408 (nginx's client_body_timeout): an upload that stalls (a crashed or "
        "cut-off client) would otherwise hold its admission slot and reserved bytes until the "
        "socket closes, which uvicorn's keep-alive timeout does not cover mid-body",
    )
    body_total_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="seconds a whole request body may take to arrive before it is refused with "
        "408: a client trickling a byte now and then (within body_read_timeout_s) would "
        "otherwise hold an admission slot as long as it likes (the largest body, 128 MB, "
        "needs ~1 MB/s to make it)",
    )
    max_prompt_chars: int = Field(
        default=2_000, ge=1, description="characters per prompt (before tokenisation)"
    )
    max_contrastive_prompts: int = Field(
        default=32, ge=1, le=32, description="contrastive prompts per prompt (model contract: 32)"
    )
    text_token_bucket: int = Field(
        default=4,
        ge=1,
        le=77,
        description="text batches go to the encoder with as many tokens as their longest "
        "prompt needs, rounded up to a multiple of this (exact: padding never changes an "
        "embedding). Measured on the ViT-B/32-sized model, cold prompts (README): 4 is as fast "
        "as exact lengths (+7–9 % img/s over 16 at one client, equal at 8) while calls of "
        "nearby lengths still share a shape for Triton's batcher to merge",
    )
    truncate_long_prompts: bool = Field(
        default=False,
        description="prompts over CLIP's 77 tokens: truncate (and say so) instead of a 422; "
        "contrastive prompts the cut makes token-identical to the prompt or to each other are "
        "dropped",
    )
    access_log: bool = Field(
        default=False,
        description="uvicorn's line per request (at hundreds of requests/s a measurable cost; "
        "requests are counted and timed in /metrics either way)",
    )
    keep_alive_s: int = Field(
        default=75,
        ge=1,
        description="seconds an idle client connection is kept open (uvicorn's keep-alive "
        "timeout). Longer than the clients' own idle limits (aiohttp 15 s, httpx 5 s) and "
        "than a trainer's pause between RL steps, so the server never closes a pooled "
        "connection just as a client reuses it (uvicorn's 5 s default did: a request sent "
        "on it fails with 'Server disconnected'); 75 s as nginx, above a cloud load "
        "balancer's usual 60 s",
    )
    backend_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="timeout of each gateway → backend call, in seconds (past it: 504)",
    )
    retry_after_s: int = Field(
        default=5,
        ge=1,
        description="Retry-After seconds sent with 503 (backend unavailable) and 504 (timeout)",
    )
    # -- admission control (service/gateway/admission.py): past a limit, 429 with Retry-After --
    max_requests_in_flight: int = Field(
        default=64,
        ge=1,
        description="requests with a body to work on (/v1/score, /v1/score/group, POST "
        "/v1/prompt-sets and its import) admitted at once; more are refused at once with 429 "
        "(never queued)",
    )
    max_body_bytes_in_flight: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="request-body bytes of admitted requests, summed (from "
        "Content-Length before the body is read, else as it streams in); raised to "
        "max_request_bytes if lower, so one maximal request always fits",
    )
    max_images_in_flight: int = Field(
        default=1024,
        ge=1,
        description="images of admitted scoring requests, summed (queued or being scored); "
        "raised to max_items_per_request if lower",
    )
    max_decoded_bytes_in_flight: int = Field(
        default=512 * 1024 * 1024,
        ge=1,
        description="decoded pixel bytes (H × W × 3) of admitted requests, summed, reserved "
        "from each image's header before it is decoded; raised to 3 × max_request_pixels if "
        "lower",
    )
    triton_channel_max_age_s: float = Field(
        default=60.0,
        ge=0,
        description="seconds the gateway uses one gRPC channel to Triton before a new one "
        "replaces it (calls in flight finish on the old): a new channel resolves the Triton "
        "address again, so pods added behind a headless Service get traffic (0: never)",
    )
    max_backend_calls: int = Field(
        default=64,
        ge=1,
        description="calls out to the backend at once (merged calls, or every call with "
        "merging off), across all requests and models; callers waiting to be merged hold no "
        "slot (README, admission control)",
    )
    merged_calls_in_flight: int = Field(
        default=1,
        ge=0,
        le=64,
        description="merged backend calls in flight per model, call kind and shape: concurrent "
        "requests' calls wait while this many are out and go together as one (0: every call "
        "alone; service/gateway/coalescing.py)",
    )
    max_backend_calls_per_request: int = Field(
        default=4,
        ge=1,
        description="backend calls in flight for one request (its chunks and image sizes), "
        "so one large request cannot take every backend slot",
    )
    overload_retry_after_s: int = Field(
        default=1, ge=1, description="Retry-After seconds sent with 429 (a limit above is full)"
    )
    decode_threads: int = Field(
        default=4,
        ge=1,
        le=256,
        description="worker threads that parse request JSON and decode images, off the event "
        "loop (so /healthz and /readyz answer under full load)",
    )
    idempotency_cache_entries: int = Field(
        default=1024,
        ge=0,
        description="responses kept by request_id: a retry with the same id and body gets "
        "the same result, the same id with another body a 409 (0: off)",
    )
    embedding_cache_entries: int = Field(
        default=50_000, ge=0, description="text embeddings kept in the gateway's LRU cache"
    )
    max_prompt_sets: int = Field(
        default=10_000, ge=1, description="contrastive prompt sets in the gateway's registry"
    )
    tokenizer_file: str | None = Field(
        default=None,
        description="tokenizer.json for the gateway (default: the exported model's source "
        "directory, from the repository's provenance.json)",
    )

    # -- supervision of the bundled Triton (`serve`, service/launcher.py) ----------------------
    triton_probe_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="seconds between the supervisor's readiness probes of the bundled Triton",
    )
    triton_probe_timeout_s: float = Field(
        default=2.0, gt=0, description="timeout of one readiness probe (GET /v2/health/ready)"
    )
    triton_probe_failures: int = Field(
        default=3,
        ge=1,
        description="consecutive failed readiness probes of a running Triton (hung, e.g. "
        "SIGSTOP or a deadlock) before the supervisor kills and restarts it",
    )
    triton_restart_backoff_s: float = Field(
        default=1.0, gt=0, description="first wait before retrying a failed Triton restart"
    )
    triton_restart_backoff_max_s: float = Field(
        default=30.0, gt=0, description="longest wait between failed Triton restarts (doubling)"
    )

    # -- exposure and per-key limits (service/gateway/auth.py, openapi.py) ---------------------
    rate_limit_per_key_rps: float | None = Field(
        default=None,
        gt=0,
        description="requests per second each API key may make to /v1 (token bucket; None: "
        "no limit); past it 429 with Retry-After",
    )
    rate_limit_burst: int = Field(
        default=20, ge=1, description="token-bucket size of the per-key rate limit (a burst)"
    )
    expose_metrics: bool = Field(
        default=True, description="serve Prometheus metrics at /metrics (False: 404)"
    )
    expose_docs: bool = Field(
        default=True, description="serve /docs, /redoc and /openapi.json (False: all 404)"
    )

    @model_validator(mode="after")
    def _head_follows_the_model(self) -> Settings:
        """The shipped head is trained on the shipped CLIP: another `model` (REWARD_MODEL or
        --model) gets no head unless one is given (the export refuses a head of another CLIP)."""
        shipped = not self.model or (  # "" (an unset --model "$VAR") means the shipped one
            Path(self.model).expanduser().resolve() == SHIPPED_MODEL_DIR.resolve()
        )
        if "head" not in self.model_fields_set and not shipped:
            object.__setattr__(self, "head", None)
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: Any) -> Any:
        """REWARD_API_KEYS as a JSON list of keys, or one bare key; an error never quotes it."""
        if isinstance(value, str):
            text = value.strip()
            if text[:1] in ("[", "{", '"'):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError("not valid JSON (a list of keys, or one bare key)") from None
            elif any(ch.isspace() or ch == "," for ch in text):
                raise ValueError('several keys go in a JSON list: \'["key1", "key2"]\'')
            else:
                value = [text] if text else []
            if isinstance(value, str):
                value = [value]
        if not isinstance(value, list) or not all(isinstance(k, str | SecretStr) for k in value):
            raise ValueError("expected a list of key strings (JSON), or one bare key")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()


# REWARD_* variables the CLI's client commands read (`score`, `eval --via`, `finetune`), not
# the server.
CLIENT_ENV = ("REWARD_URL", "REWARD_API_KEY", "REWARD_EVAL_API_KEY", "REWARD_SERVICE_API_KEY")


def unknown_env(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """REWARD_* variables that no setting and no client command reads (a typo: ignored)."""
    known = {f"REWARD_{name}".upper() for name in Settings.model_fields} | set(CLIENT_ENV)
    return sorted(k for k in environ if k.upper().startswith("REWARD_") and k.upper() not in known)
