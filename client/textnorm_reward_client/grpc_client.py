"""`GrpcRewardClient`: rewards straight from Triton's `score` model over KServe v2 gRPC.

For trainers on the same cluster as Triton (the `grpc` extra: tritonclient, numpy, tokenizers).
Images go as uint8 tensors (no PNG, no base64); prompts are tokenised here with the export's
`tokenizer.json` (the same `ClipTokenizer` the gateway uses), so the rewards are the gateway's.
It reads the export's `provenance.json` (the repository folder, or just those two files): every
call names the export's model version, so a Triton that serves another export refuses instead
of answering, and TextNorm's defaults are the export's. Unlike the gateway it builds no
contrastive sets: pass each prompt's contrastive prompts (e.g. from
`GET /v1/prompt-sets/{id}` or your own JSON file); blanks, repeats and the prompt itself are
dropped, as the gateway drops them.

Balancing over Triton pods: gRPC keeps one HTTP/2 connection, so behind a Kubernetes ClusterIP
every call would land on one pod. Give either one `dns:///<headless service>:8001` target (the
channel resolves every pod and balances round robin) or a list of `host:port` addresses (one
channel each, calls rotate over them and fail over when one is unavailable).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from textnorm_reward_client.client import RewardServiceError
from textnorm_reward_client.clip_tokenizer import ClipTokenizer

MAX_PROMPTS = 33  # the true prompt + 32 contrastive prompts (the `score` model's contract)
_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def _status(exc: InferenceServerException) -> str:
    return (exc.status() or "").rsplit(".", 1)[-1].upper()


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, InferenceServerException) and _status(exc) in _RETRYABLE


class GrpcRewardClient:
    """Args:
    urls: `host:port`, `dns:///name:port`, or several `host:port` to rotate over.
    repository: the export Triton serves (its `provenance.json` and `tokenizer.json` suffice).
    textnorm_scale, ensemble_lambda: TextNorm's c and the ensemble's λ (default: the export's).
    timeout_s: per call; attempts: tries per call (unavailable / timed-out servers).
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
        model: str = "score",
    ) -> None:
        self.provenance = json.loads((Path(repository) / "provenance.json").read_text())
        defaults = self.provenance.get("textnorm_defaults") or {}
        version = self.provenance.get("model_version")
        self.version = "" if version is None else str(version)
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("no Triton address given")
        balance = [("grpc.lb_policy_name", "round_robin")]
        self._clients = [grpcclient.InferenceServerClient(u, channel_args=balance) for u in urls]
        self._next = itertools.cycle(self._clients)
        self.tokenizer = ClipTokenizer(Path(repository) / "tokenizer.json")
        self.scale = float(defaults.get("scale", 5.0) if textnorm_scale is None else textnorm_scale)
        lam = defaults.get("ensemble_lambda", 1.0) if ensemble_lambda is None else ensemble_lambda
        self.lam = float(lam)
        self.timeout_s, self.model = timeout_s, model
        self._infer = retry(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.2, max=5),
            reraise=True,
        )(self._infer_once)

    def _tokens(self, prompt: str, contrastive: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        seen = {self.tokenizer.normalise(prompt)}
        kept = []
        for text in (t.strip() for t in contrastive):
            key = self.tokenizer.normalise(text)
            if text and key not in seen:
                seen.add(key)
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
        return ids, mask

    def _infer_once(self, inputs: list[grpcclient.InferInput]) -> grpcclient.InferResult:
        client = next(self._next)  # rotate; a retry goes to the next address
        return client.infer(
            self.model, inputs, model_version=self.version, client_timeout=self.timeout_s
        )

    def score(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        prompts: str | Sequence[str],
        contrastive: Sequence[str] | Sequence[Sequence[str]],
    ) -> dict[str, np.ndarray]:
        """Every reward the model has ("raw", "textnorm", …) as float arrays in item order.

        images: uint8 [H, W, 3] each (or one [N, H, W, 3] array); prompts: one per image, or
        one for all; contrastive: that prompt's contrastive prompts, or one list per image.
        Images of one size go in one call. Raises RewardServiceError (status = gRPC code)
        for an error answer that retrying cannot fix, after retries for the rest."""
        images = list(images)
        n = len(images)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        sets = [contrastive] * n if contrastive and isinstance(contrastive[0], str) else contrastive
        if len(prompts) != n or len(sets) != n:
            raise ValueError(f"{n} images, {len(prompts)} prompts, {len(sets)} contrastive sets")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(
                    f"images[{i}]: expected uint8 [H, W, 3], got {array.dtype} {array.shape}"
                )
            groups.setdefault(array.shape, []).append(i)
        out: dict[str, np.ndarray] = {}
        for index in groups.values():
            tokens = [self._tokens(prompts[i], sets[i]) for i in index]
            tensors = {
                "IMAGE": np.stack([np.asarray(images[i]) for i in index]),
                "INPUT_IDS": np.stack([t[0] for t in tokens]),
                "PROMPT_MASK": np.stack([t[1] for t in tokens]),
                "TEXTNORM_SCALE": np.full((len(index), 1), self.scale, np.float32),
                "ENSEMBLE_LAMBDA": np.full((len(index), 1), self.lam, np.float32),
            }
            inputs = []
            for name, value in tensors.items():
                tensor = grpcclient.InferInput(
                    name, list(value.shape), np_to_triton_dtype(value.dtype)
                )
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            try:
                result = self._infer(inputs)
            except InferenceServerException as exc:
                message = exc.message() or str(exc)
                if "unknown model" in message.lower() and "version" in message.lower():
                    body = {"error": {"code": "model_mismatch", "message": message}}
                    raise RewardServiceError(503, body) from None  # Triton serves another export
                body = {"error": {"code": _status(exc).lower(), "message": message}}
                raise RewardServiceError(_GRPC_TO_HTTP.get(_status(exc), 502), body) from None
            for output in result.get_response().outputs:
                values = result.as_numpy(output.name).reshape(-1).astype(np.float64)
                column = out.setdefault(output.name.lower(), np.full(n, np.nan))
                column[index] = values
        return out

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def __enter__(self) -> GrpcRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# gRPC status → the HTTP status the gateway would answer, for one error type across clients.
_GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 422,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "RESOURCE_EXHAUSTED": 429,
    "UNAUTHENTICATED": 401,
}
