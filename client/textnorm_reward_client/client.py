"""`RewardClient`: calls to /v1/score and /v1/score/group with retries on 503/504/network.

Prompt sets registered through the client are remembered (id → prompt and contrastive
prompts). Gateway replicas share no state and a set's id is its content hash, so when a
request naming a set reaches a replica that never saw it (`unknown_prompt_set`), the client
registers the set there — under the same id — and sends the request again.
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

ImageInput = bytes | str | Path  # encoded PNG/JPEG/WebP bytes, or a path to such a file


class RewardServiceError(RuntimeError):
    """A non-retryable error answer; `status` and the service's JSON `error` block attached."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {error.get('message', body)}")
        self.status, self.error = status, error


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    # 502 is the backend failing on this input (a bad output, a model error): not transient.
    return isinstance(exc, RewardServiceError) and exc.status in (503, 504)


REREGISTER_ATTEMPTS = 3  # replicas a request may meet that lack a set the client registered


def _named_sets(body: dict[str, Any]) -> list[str]:
    """The prompt-set ids a request body names (request-level and per item)."""
    named = [(body.get("textnorm") or {}).get("prompt_set")]
    named += [item.get("prompt_set") for item in body.get("items", [])]
    return list(dict.fromkeys(s for s in named if s))


def _b64(image: ImageInput) -> str:
    data = Path(image).read_bytes() if isinstance(image, str | Path) else image
    return base64.b64encode(data).decode("ascii")


class RewardClient:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        attempts: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )
        self._post_retrying = retry(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.5, max=10),
            reraise=True,
        )(self._post_once)
        self._sets: dict[str, dict[str, Any]] = {}  # id → {"prompt", "contrastive"}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; a known prompt set a replica lacks is registered there first."""
        for _ in range(REREGISTER_ATTEMPTS):
            try:
                return self._post_retrying(path, body)
            except RewardServiceError as exc:
                missing = [s for s in _named_sets(body) if s in self._sets]
                if exc.error.get("code") != "unknown_prompt_set" or not missing:
                    raise
                for set_id in missing:
                    self._post_retrying("/v1/prompt-sets", self._sets[set_id])
        return self._post_retrying(path, body)

    def register_prompt_set(self, prompt: str, contrastive: list[str]) -> str:
        """Register a contrastive set; returns its id (a content hash, the same on every
        replica). Name it in `score(..., textnorm={"prompt_set": id})`."""
        body = {"prompt": prompt, "contrastive": list(contrastive)}
        set_id = self._post_retrying("/v1/prompt-sets", body)["prompt_set"]["id"]
        self._sets[set_id] = body
        return set_id

    def _post_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._http.post(path, json=body)
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": {"message": response.text[:200]}}
        if response.status_code >= 400:
            raise RewardServiceError(response.status_code, payload)
        return payload

    def score(
        self,
        images: list[ImageInput],
        prompts: list[str] | str,
        textnorm: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """One reward per (image, prompt); a single prompt string applies to every image.
        Returns the service's response: `results` in item order, `provenance`, `request_id`."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        body: dict[str, Any] = {
            "items": [
                {"image": _b64(i), "prompt": p} for i, p in zip(images, prompts, strict=True)
            ],
            "request_id": request_id or uuid.uuid4().hex,
        }
        if textnorm:
            body["textnorm"] = textnorm
        return self._post("/v1/score", body)

    def score_group(
        self, prompt: str, images: list[ImageInput], advantages: bool = True, **options: Any
    ) -> dict[str, Any]:
        """One prompt × N images (GRPO/DDPO), with per-group normalised advantages."""
        body = {
            "prompt": prompt,
            "images": [_b64(i) for i in images],
            "advantages": advantages,
            "request_id": options.pop("request_id", None) or uuid.uuid4().hex,
            **options,
        }
        return self._post("/v1/score/group", body)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
