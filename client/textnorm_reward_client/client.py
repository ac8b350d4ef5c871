"""`RewardClient`: typed calls to /v1/score and /v1/score/group with retries on 503/network."""

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


def _b64(image: ImageInput) -> str:
    data = Path(image).read_bytes() if isinstance(image, str | Path) else image
    return base64.b64encode(data).decode("ascii")


class RewardClient:
    def __init__(
        self, url: str, api_key: str | None = None, timeout_s: float = 60.0, attempts: int = 4
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self._post = retry(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.5, max=10),
            reraise=True,
        )(self._post_once)

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
