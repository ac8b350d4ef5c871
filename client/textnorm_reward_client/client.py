"""`RewardClient`: the blocking REST client (httpx). `AsyncRewardClient` (async_client.py) has
the same interface for asyncio; both drive the flows of `core.py`, where everything they do
(retries, Retry-After, deadline, failover, chunking, prompt-set re-registration, parsing)
lives once.

Prompt sets registered through the client are remembered (id → prompt and contrastive
prompts). Gateway replicas share no state and a set's id is its content hash, so when a
request naming a set reaches a replica that never saw it (`unknown_prompt_set`), the client
registers the set there — under the same id — and sends the request again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import httpx

from textnorm_reward_client.core import (
    ClientCore,
    Flow,
    NotSent,
    RetryPolicy,
    Send,
    Sleep,
    T,
    Undecodable,
)
from textnorm_reward_client.errors import RewardServiceError, client_error
from textnorm_reward_client.results import GroupResult, ScoreResult, ServiceLimits

__all__ = ["ImageInput", "RewardClient", "RewardServiceError"]

ImageInput = Any  # bytes | str | Path | PIL image | numpy array | torch tensor (see images.py)


class _ClientBase:
    """Constructor and options shared by the sync and the asyncio client.

    url: one base URL or several (rotated round robin; a retry goes to the next one, and one
        that cannot be reached sits out `retry.failover_cooldown_s`).
    api_key: sent as `Authorization: Bearer`.
    timeout_s: per HTTP request; deadline_s: per call, over every retry and chunk (None: no
        deadline beyond the retries); attempts: tries per request (or give `retry`).
    max_concurrency: requests in flight at once (a call's chunks, and, for the asyncio client,
        all calls together); encode_workers: threads that base64/PNG-encode images.
    raw_tensors: send arrays/tensors as raw uint8 (when the service accepts it; else PNG).
    resize: shrink images whose shorter side exceeds the model's input size (`image_size` of
        /v1/models) to it here (bicubic, Pillow), cutting the payload ~5× at 512 px for a 224 px
        model. Off by default: the service's own resize is what the rewards were validated with,
        so resized rewards are close to, not bit-identical with, unresized ones.
    max_items_per_request: a cap below the service's limit (None: the service's).
    transport: an httpx transport (tests; unix sockets).
    """

    _OWN_INPUTS = False  # copy the caller's arrays when a call is made (ClientCore)

    def __init__(
        self,
        url: str | Sequence[str],
        api_key: str | None = None,
        timeout_s: float = 60.0,
        attempts: int = 4,
        transport: Any = None,
        *,
        deadline_s: float | None = None,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 8,
        encode_workers: int | None = None,
        raw_tensors: bool = True,
        resize: bool = False,
        max_items_per_request: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        retry = retry or RetryPolicy(attempts=attempts)
        self._core = ClientCore(
            url,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            retry=retry,
            raw_tensors=raw_tensors,
            resize=resize,
            max_items_per_request=max_items_per_request,
            own_inputs=self._OWN_INPUTS,
        )
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.max_concurrency = max_concurrency
        workers = encode_workers or min(4, os.cpu_count() or 1)
        self._encoder = ThreadPoolExecutor(workers, thread_name_prefix="reward-encode")
        self._http = self._make_http(transport)

    @property
    def urls(self) -> list[str]:
        return list(self._core.endpoints.urls)

    def _make_http(self, transport: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def _request_args(send: Send) -> dict[str, Any]:
        return {
            "json": send.json,
            "headers": {"X-Request-ID": send.request_id},
            "timeout": send.timeout_now(),
        }


class RewardClient(_ClientBase):
    """Blocking client. Every method raises `RewardServiceError` when a call cannot be scored.

    with RewardClient(["http://reward-0:8000", "http://reward-1:8000"], api_key=KEY) as c:
        result = c.score(uint8_batch, prompts)          # [N, H, W, 3], or a list of images
        result.rewards("textnorm")                       # numpy, item order
    """

    def _make_http(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="reward-http")
        # Attempts run here, so the caller can stop waiting at the attempt's limit (httpx's
        # timeout is per phase, not per request; see `_send`).
        self._senders = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="reward-send")
        return httpx.Client(headers=self.headers, timeout=self._core.timeout_s, transport=transport)

    # -- driving flows -------------------------------------------------------------------------
    def _send(self, send: Send) -> httpx.Response | httpx.TransportError:
        running = threading.Event()
        future = self._senders.submit(self._send_now, send, running)
        # Waiting for a sender thread (several threads calling at once, or attempts abandoned
        # at their limit still finishing) is not the server's doing: only the call's deadline
        # bounds it (NotSent past it), and the attempt's timeout starts once it runs.
        if not running.wait(send.wait_limit()) and future.cancel():
            return NotSent(f"the call's deadline passed while all {self.max_concurrency} "
                           "of this client's sender threads were busy")  # fmt: skip
        limit = send.timeout_now()
        try:
            return future.result(timeout=limit)
        except FutureTimeout:  # the thread ends the attempt itself (`_send_now`)
            return httpx.TimeoutException(f"no complete answer within {limit:.3g} s")

    def _send_now(
        self, send: Send, running: threading.Event
    ) -> httpx.Response | httpx.TransportError:
        """One attempt, cut at `timeout_now()` as a whole: httpx's timeout is per phase and
        restarts with every byte read, so a server that trickles its answer could hold this
        thread far longer. The answer is read in chunks, and dropped past the limit."""
        running.set()
        limit = send.timeout_now()
        end = time.monotonic() + limit
        try:
            request = self._http.build_request(send.method, send.url, **self._request_args(send))
            response = self._http.send(request, stream=True)
            try:
                body = bytearray()
                for chunk in response.iter_bytes():  # decoded (gzip ...), as httpx reads it
                    body += chunk
                    if time.monotonic() > end:
                        message = f"no complete answer within {limit:.3g} s"
                        return httpx.ReadTimeout(message, request=request)
            finally:
                response.close()
        except httpx.TransportError as exc:
            return exc
        except httpx.DecodingError as exc:
            return Undecodable(f"the answer could not be decoded: {exc}")
        headers = httpx.Headers(response.headers)
        for name in ("content-encoding", "content-length", "transfer-encoding"):
            headers.pop(name, None)  # they described the bytes on the wire
        return httpx.Response(
            response.status_code, headers=headers, content=bytes(body), request=request
        )

    def _drive(self, flow: Flow[T]) -> T:
        outcome: Any = None
        try:
            while True:
                action = flow.send(outcome)
                if isinstance(action, Sleep):
                    time.sleep(action.seconds)
                    outcome = None
                else:
                    outcome = self._send(action)
        except StopIteration as done:
            return done.value

    def _drive_all(
        self, flows: list[Flow[T]], deadline: float | None, request_id: str | None
    ) -> list[T]:
        """The chunks' flows on the client's pool. The pool is shared by every call on this
        client, so a chunk may wait for a thread: the call's deadline bounds that wait too."""
        if len(flows) == 1:
            return [self._drive(flows[0])]
        futures = [self._pool.submit(self._drive, f) for f in flows]
        limit = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, pending = wait(futures, timeout=limit, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                for other in futures:
                    other.cancel()
                raise future.exception()  # type: ignore[misc]
        if pending:  # each running chunk ends at the deadline by itself; queued ones never run
            for future in pending:
                future.cancel()
            raise client_error(
                "deadline_exceeded",
                f"the call's deadline passed with {len(pending)} of its {len(futures)} chunks "
                f"unanswered (running, or waiting for one of this client's "
                f"{self.max_concurrency} threads)",
                request_id=request_id,
            )
        return [f.result() for f in futures]

    def _execute(self, call: Any) -> Any:
        call.use(self._drive(self._core.service_limits(call.deadline)))
        if call.size == 1:
            wire = [call.encode(0)]
        else:
            wire = list(self._encoder.map(call.encode, range(call.size)))
        return call.merge(self._drive_all(call.requests(wire), call.deadline, call.request_id))

    # -- the interface -------------------------------------------------------------------------
    def score(
        self,
        images: Any,
        prompts: str | Sequence[str],
        textnorm: dict[str, Any] | None = None,
        request_id: str | None = None,
        *,
        deadline_s: float | None = None,
    ) -> ScoreResult:
        """One reward per (image, prompt); a single prompt string applies to every image.

        images: see `textnorm_reward_client.images` (bytes, paths, PIL, numpy, torch; a batch
        array or a list). textnorm: the request's TextNorm options ({"contrastive": [...]},
        {"prompt_set": id}, {"scale": c}, ...). More items than one request may hold are sent
        as concurrent chunks (ids `<request_id>.<k>`) and reassembled in item order."""
        call = self._core.score_call(
            images, prompts, textnorm=textnorm, request_id=request_id, deadline_s=deadline_s
        )
        return self._execute(call)

    def score_group(
        self,
        prompt: str,
        images: Any,
        advantages: bool = True,
        *,
        textnorm: dict[str, Any] | None = None,
        advantage_of: str = "textnorm",
        advantage_eps: float = 1e-6,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> GroupResult:
        """One prompt × N images (a GRPO/DDPO group) with (r − mean) / (std + eps) advantages.

        A group over the service's per-request limits is scored in chunks and its advantages
        computed here, from the merged rewards, with the service's formula (population std);
        `result.advantages_computed_by` says which side computed them."""
        call = self._core.group_call(
            prompt, images, textnorm=textnorm, advantages=advantages,
            advantage_of=advantage_of, advantage_eps=advantage_eps,
            request_id=request_id, deadline_s=deadline_s,
        )  # fmt: skip
        return self._execute(call)

    def register_prompt_set(self, prompt: str, contrastive: Sequence[str]) -> str:
        """Register a contrastive set; returns its id (a content hash, the same on every
        replica). Name it in `score(..., textnorm={"prompt_set": id})`."""
        return self._drive(
            self._core.register_prompt_set(prompt, contrastive, self._core.call_deadline())
        )

    def models(self) -> dict[str, Any]:
        """GET /v1/models (the model cards, provenance and limits), as JSON."""
        return self._drive(self._core.models(self._core.call_deadline()))

    def limits(self) -> ServiceLimits:
        """The service's request limits (read once, then cached)."""
        return self._drive(self._core.service_limits(self._core.call_deadline()))

    def close(self) -> None:
        self._http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._senders.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
