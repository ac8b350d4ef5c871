"""`GrpcRewardClient`: rewards straight from Triton's `score` model over KServe v2 gRPC.

For trainers on the same cluster as Triton (the `grpc` extra: tritonclient, numpy, tokenizers).
Images go as uint8 tensors (no PNG, no base64); prompts are tokenised here with the export's
`tokenizer.json` (the same `ClipTokenizer` the gateway uses), so the rewards are the gateway's
for the same prompt set and c. TextNorm's c and λ are chosen as the gateway chooses them for
an explicit set: the ones you pass, else the calibrated values of that exact set (by
`contrastive_set_sha256`) in the calibration the export bundles, else the model's defaults;
each result says which (`textnorm_scale`, `textnorm_scale_source`). A calibration the gateway
is given by file (`REWARD_TEXTNORM_CALIBRATION_FILE`) is not seen here, and the per-prompt-kind
values apply only to sets the gateway builds by rule, which this path does not build.
It reads the export's `provenance.json` (the repository folder, or just those two files): every
call names the export's model version, so a Triton that serves another export refuses instead
of answering, and TextNorm's defaults are the export's. Unlike the gateway it builds no
contrastive sets: pass each prompt's contrastive prompts (e.g. from
`GET /v1/prompt-sets/{id}` or your own JSON file); blanks, repeats and the prompt itself are
dropped, as the gateway drops them.

Same interface and results as the REST clients: `score(images, prompts, contrastive)` (or
`textnorm={"contrastive": [...], "scale": c}`) and `score_group` return `ScoreResult` /
`GroupResult`; images are any kind `textnorm_reward_client.images` accepts (encoded files are
decoded here with Pillow); calls over the export's max batch are split; a failure is a
`RewardServiceError` (status: the HTTP status the gateway would answer).

Balancing over Triton pods: gRPC keeps one HTTP/2 connection, so behind a Kubernetes ClusterIP
every call would land on one pod. Give either one `dns:///<headless service>:8001` target (the
channel resolves every pod and balances round robin) or a list of `host:port` addresses (one
channel each, calls rotate over them and fail over when one is unavailable).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Sequence
from math import isfinite
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from textnorm_reward_client import images as image_inputs
from textnorm_reward_client.clip_tokenizer import ClipTokenizer
from textnorm_reward_client.core import RetryPolicy, new_request_id
from textnorm_reward_client.errors import RewardServiceError, client_error
from textnorm_reward_client.prompt_identity import contrastive_set_sha256, normalise_prompt
from textnorm_reward_client.results import (
    GroupResult,
    ScoreResult,
    ServiceLimits,
    check_advantage_eps,
    group_advantages,
)

MAX_PROMPTS = 33  # the true prompt + 32 contrastive prompts (the `score` model's contract)
_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def _status(exc: InferenceServerException) -> str:
    return (exc.status() or "").rsplit(".", 1)[-1].upper()


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, InferenceServerException) and _status(exc) in _RETRYABLE


class _Channels:
    """One tritonclient per address, taken in turn (thread-safe). gRPC resolves a DNS name
    again only when a connection fails, so a client kept for ever never calls Triton pods
    added behind a headless Service: one older than `max_age_s` (0: never) is replaced, and
    closed `grace_s` later, once the calls on it have ended."""

    def __init__(self, urls: Sequence[str], max_age_s: float, grace_s: float) -> None:
        self.urls, self.max_age_s, self.grace_s = list(urls), max_age_s, grace_s
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._clients = [(self._open(u), time.monotonic()) for u in self.urls]
        self._retired: list[tuple[threading.Timer, Any]] = []

    @staticmethod
    def _open(url: str) -> Any:
        return grpcclient.InferenceServerClient(
            url, channel_args=[("grpc.lb_policy_name", "round_robin")]
        )

    def next(self) -> Any:
        with self._lock:
            i = next(self._turn) % len(self.urls)
            client, since = self._clients[i]
            if self.max_age_s and time.monotonic() - since > self.max_age_s:
                timer = threading.Timer(self.grace_s, client.close)
                timer.daemon = True
                timer.start()
                self._retired.append((timer, client))
                client = self._open(self.urls[i])
                self._clients[i] = (client, time.monotonic())
            return client

    def close(self) -> None:
        with self._lock:
            for timer, client in self._retired:
                timer.cancel()
                client.close()
            self._retired.clear()
            for client, _ in self._clients:
                client.close()


class GrpcRewardClient:
    """Args:
    urls: `host:port`, `dns:///name:port`, or several `host:port` to rotate over.
    repository: the export Triton serves (its `provenance.json` and `tokenizer.json` suffice).
    textnorm_scale, ensemble_lambda: TextNorm's c and the ensemble's λ for every call, as if
    each request passed them (default: per set, as the gateway: calibrated, else the export's).
    timeout_s: per call; attempts: tries per call (unavailable / timed-out servers), with the
    REST clients' backoff (`retry`); deadline_s: per call, over every retry.
    channel_max_age_s: a channel older than this is replaced (it resolves the address again:
    Triton pods added behind a headless Service get calls); 0: never.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        repository: str | Path,
        *,
        textnorm_scale: float | None = None,
        ensemble_lambda: float | None = None,
        timeout_s: float = 60.0,
        attempts: int = 4,
        deadline_s: float | None = None,
        retry: RetryPolicy | None = None,
        model: str = "score",
        channel_max_age_s: float = 60.0,
    ) -> None:
        self.provenance = json.loads((Path(repository) / "provenance.json").read_text())
        defaults = self.provenance.get("textnorm_defaults") or {}
        version = self.provenance.get("model_version")
        self.version = "" if version is None else str(version)
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("no Triton address given")
        self._channels = _Channels(urls, channel_max_age_s, grace_s=timeout_s + 1.0)
        self.tokenizer = ClipTokenizer(Path(repository) / "tokenizer.json")
        self.default_scale = float(defaults.get("scale", 5.0))
        self.default_lambda = float(defaults.get("ensemble_lambda", 1.0))
        self.scale = None if textnorm_scale is None else float(textnorm_scale)
        self.lam = None if ensemble_lambda is None else float(ensemble_lambda)
        self.calibrated = calibrated_sets(self.provenance)
        self.timeout_s, self.model, self.deadline_s = timeout_s, model, deadline_s
        self.retry = retry or RetryPolicy(attempts=attempts)
        self.max_batch = int((self.provenance.get("options") or {}).get("max_batch") or 64)

    def _tokens(
        self, prompt: str, contrastive: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        for text in (prompt, *contrastive):
            if (token := self.tokenizer.special_token_in(text)) is not None:
                raise ValueError(f"{text!r} holds the tokenizer's special token {token}")
        # As the gateway cleans a set: the prompt and repeats dropped by the prompt-identity
        # key (case folded), then by the tokenizer's key (one embedding), the first kept.
        contrastive = [t.strip() for t in contrastive if t.strip()]
        for key in (normalise_prompt, self.tokenizer.normalise):
            seen, kept = {key(prompt)}, []
            for text in contrastive:
                if key(text) not in seen:
                    seen.add(key(text))
                    kept.append(text)
            contrastive = kept
        texts = [prompt, *contrastive]
        if not contrastive or len(texts) > MAX_PROMPTS:
            raise ValueError(f"{len(contrastive)} contrastive prompts: give 1 to {MAX_PROMPTS - 1}")
        tokenized = self.tokenizer.encode(texts)
        if tokenized.truncated.any():
            raise ValueError(f"over CLIP's 77 tokens: {texts[int(tokenized.truncated.argmax())]!r}")
        ids = np.full((MAX_PROMPTS, tokenized.ids.shape[1]), self.tokenizer.eos_id, np.int64)
        ids[: len(texts)] = tokenized.ids
        mask = np.zeros(MAX_PROMPTS, bool)
        mask[: len(texts)] = True
        return ids, mask, contrastive

    def _choose(self, sha: str, scale: float | None, lam: float | None) -> tuple[float, float, str]:
        """(c, λ, source) of one set, in the gateway's order (service/gateway/calibration.py):
        the request's, else the set's calibrated values, else the export's defaults."""
        found = self.calibrated.get(sha)
        if scale is not None:
            c, source = scale, "request"
        elif found is not None:
            c, source = found[0], "calibrated"
        else:
            c, source = self.default_scale, "default"
        if lam is None:
            lam = found[1] if found is not None else self.default_lambda
        return c, lam, source

    def _infer(self, inputs: list[grpcclient.InferInput], request_id: str, deadline: float | None):
        def wait(state: RetryCallState) -> float:
            """The backoff, or DEADLINE_EXCEEDED when it would end past the call's deadline
            (checked here, not by a stop: the sleep must not cross the deadline)."""
            if state.attempt_number >= self.retry.attempts:
                return 0.0  # no retry follows (tenacity asks for the wait before its stop)
            delay = self.retry.delay(state.attempt_number, None)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise InferenceServerException(
                    f"the call's deadline passed after {state.attempt_number} attempt(s); "
                    f"last answer: {state.outcome.exception() if state.outcome else None}",
                    status="StatusCode.DEADLINE_EXCEEDED",
                )
            return delay

        for attempt in Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait,
            reraise=True,
        ):
            with attempt:
                client = self._channels.next()  # rotate; a retry goes to the next address
                timeout = self.timeout_s
                if deadline is not None:
                    timeout = max(0.001, min(timeout, deadline - time.monotonic()))
                return client.infer(
                    self.model, inputs, model_version=self.version, client_timeout=timeout,
                    request_id=request_id,
                )  # fmt: skip
        raise AssertionError("unreachable")

    def models(self) -> dict[str, Any]:
        """The export's model card, as far as its provenance says (no gateway asked)."""
        model = self.provenance.get("model") or {}
        return {"models": [{**model, "max_batch": self.max_batch}], "provenance": self.provenance}

    def limits(self) -> ServiceLimits:
        size = (self.provenance.get("model") or {}).get("image_size")
        return ServiceLimits(
            max_items_per_request=self.max_batch,
            max_contrastive_prompts=MAX_PROMPTS - 1,
            image_formats=("raw",),
            raw_dtypes=("uint8",),
            image_size=size,
            from_service=False,
        )

    def score(
        self,
        images: Any,
        prompts: str | Sequence[str],
        contrastive: Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        textnorm: dict[str, Any] | None = None,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> ScoreResult:
        """Every reward the model has ("raw", "textnorm", …), per item in item order.

        images: any kind the REST client takes (uint8 [H, W, 3] arrays, a batch, tensors, PIL,
        encoded files); prompts: one per image, or one for all; contrastive (or
        textnorm["contrastive"]): that prompt's contrastive prompts, or one list per image;
        textnorm["scale"] / ["ensemble_lambda"] override the export's defaults. Images of one
        size go in one call (split at the export's max batch). Raises RewardServiceError
        (status: the HTTP status the gateway would answer) for an error answer that retrying
        cannot fix, after retries for the rest."""
        options = dict(textnorm or {})
        unsupported = set(options) - {"contrastive", "scale", "ensemble_lambda"}
        if unsupported:
            raise ValueError(f"textnorm options the gRPC path cannot apply: {sorted(unsupported)}")
        contrastive = options.get("contrastive", contrastive)
        if not contrastive:
            raise ValueError("the gRPC path needs contrastive prompts (no prompt sets here)")
        scale, lam = options.get("scale", self.scale), options.get("ensemble_lambda", self.lam)
        scale = None if scale is None else float(scale)
        lam = None if lam is None else float(lam)
        arrays = [_pixels(i) for i in image_inputs.expand(images)]
        n = len(arrays)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        sets = [contrastive] * n if isinstance(contrastive[0], str) else list(contrastive)
        if len(prompts) != n or len(sets) != n:
            raise ValueError(f"{n} images, {len(prompts)} prompts, {len(sets)} contrastive sets")
        rid = request_id or new_request_id()
        limit = self.deadline_s if deadline_s is None else deadline_s
        deadline = None if limit is None else time.monotonic() + limit
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, array in enumerate(arrays):
            groups.setdefault(array.shape, []).append(i)
        batches = [
            index[k : k + self.max_batch]
            for index in groups.values()
            for k in range(0, len(index), self.max_batch)
        ]
        tokens = [self._tokens(prompts[i], sets[i]) for i in range(n)]
        shas = [contrastive_set_sha256(prompts[i], tokens[i][2]) for i in range(n)]
        choices = [self._choose(sha, scale, lam) for sha in shas]
        columns: dict[str, np.ndarray] = {}
        for b, index in enumerate(batches):
            tensors = {
                "IMAGE": np.stack([arrays[i] for i in index]),
                "INPUT_IDS": np.stack([tokens[i][0] for i in index]),
                "PROMPT_MASK": np.stack([tokens[i][1] for i in index]),
                "TEXTNORM_SCALE": np.array([[choices[i][0]] for i in index], np.float32),
                "ENSEMBLE_LAMBDA": np.array([[choices[i][1]] for i in index], np.float32),
            }
            inputs = []
            for name, value in tensors.items():
                tensor = grpcclient.InferInput(
                    name, list(value.shape), np_to_triton_dtype(value.dtype)
                )
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            try:
                result = self._infer(inputs, rid if len(batches) == 1 else f"{rid}.{b}", deadline)
            except InferenceServerException as exc:
                raise _service_error(exc, rid) from None
            for output in result.get_response().outputs:
                values = result.as_numpy(output.name).reshape(-1).astype(np.float64)
                column = columns.setdefault(output.name.lower(), np.full(n, np.nan))
                column[index] = values
        items = []
        for i in range(n):
            item: dict[str, Any] = {name: float(col[i]) for name, col in columns.items()}
            item.update(
                contrastive_count=len(tokens[i][2]), contrastive_source="explicit",
                prompt_set=None, contrastive_sha256=shas[i], prompt_truncated=False,
                textnorm_scale=choices[i][0], ensemble_lambda=choices[i][1],
                textnorm_scale_source=choices[i][2],
                export_sha256=self.provenance.get("export_sha256"),
            )  # fmt: skip
            items.append(item)
        payload = {"request_id": rid, "results": items, "provenance": self.provenance}
        return ScoreResult.from_json(payload)

    def score_group(
        self,
        prompt: str,
        images: Any,
        advantages: bool = True,
        *,
        contrastive: Sequence[str] | None = None,
        textnorm: dict[str, Any] | None = None,
        advantage_of: str = "textnorm",
        advantage_eps: float = 1e-6,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> GroupResult:
        """One prompt × N images; advantages with the gateway's formula (computed here)."""
        check_advantage_eps(advantage_eps)
        scored = self.score(
            images, prompt, contrastive, textnorm=textnorm, request_id=request_id,
            deadline_s=deadline_s,
        )  # fmt: skip
        payload: dict[str, Any] = {**scored.raw_response, "prompt": prompt}
        if advantages:
            values = [r.get(advantage_of) for r in payload["results"]]
            payload.update(group_advantages(values, advantage_eps, advantage_of))
            payload["advantages_computed_by"] = "client"
        return GroupResult.from_json(payload)

    def close(self) -> None:
        self._channels.close()

    def __enter__(self) -> GrpcRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def calibrated_sets(provenance: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{contrastive_set_sha256: (c, λ)} of the calibration the export bundles (provenance
    `textnorm_calibration`; empty without one). ValueError when it is unusable."""
    bundled = provenance.get("textnorm_calibration") or {}
    try:
        sets = (bundled.get("document") or {}).get("prompt_sets") or {}
        out = {
            sha: (float(value["scale"]), float(value["ensemble_lambda"]))
            for sha, value in sets.items()
        }
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"provenance.json: unusable textnorm_calibration ({exc!r})") from None
    bad = [sha for sha, (c, lam) in out.items() if not (isfinite(c + lam) and c > 0 <= lam)]
    if bad:
        raise ValueError(f"provenance.json: textnorm_calibration set {bad[0][:12]}: bad c or λ")
    return out


def _pixels(image: Any) -> np.ndarray:
    """An expanded input → uint8 [H, W, 3] (encoded files and PIL images decoded with Pillow)."""
    if isinstance(image, np.ndarray):
        return image
    import io

    from PIL import Image

    if not image_inputs.is_pil_image(image):
        data = image.read_bytes() if isinstance(image, Path) else image
        image = Image.open(io.BytesIO(data))
    return np.asarray(image_inputs.to_rgb(image))


def _service_error(exc: InferenceServerException, request_id: str) -> RewardServiceError:
    message = exc.message() or str(exc)
    if "unknown model" in message.lower() and "version" in message.lower():
        body = {"error": {"code": "model_mismatch", "message": message}}
        return RewardServiceError(503, body, request_id=request_id)  # another export
    if _status(exc) in _RETRYABLE and "deadline" in message.lower():
        return client_error("deadline_exceeded", message, request_id=request_id)
    body = {"error": {"code": _status(exc).lower(), "message": message}}
    return RewardServiceError(_GRPC_TO_HTTP.get(_status(exc), 502), body, request_id=request_id)


# gRPC status → the HTTP status the gateway would answer, for one error type across clients.
_GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 422,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "RESOURCE_EXHAUSTED": 429,
    "UNAUTHENTICATED": 401,
}
