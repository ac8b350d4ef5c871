"""What the sync and the asyncio REST clients share, with no I/O of its own (sans-I/O).

Each operation is a generator ("flow") that yields what it needs done, `Send` (one HTTP
request) or `Sleep`, and is sent back the outcome (an `httpx.Response`, or the
`httpx.TransportError` the request raised). `RewardClient` drives flows with blocking calls and
`AsyncRewardClient` with awaits, so retries, backoff, `Retry-After`, the deadline, failover,
prompt-set re-registration, chunking and the parsing of answers exist once.

Retry rules (CONTRACT.md item 3): connection errors and timeouts, 429, 503 and 504 are retried
with exponential backoff and full jitter, waiting at least the answer's `Retry-After`; every
retry of one request carries the same `request_id`; a call of several chunks gives chunk k the
id `<id>.<k>`. Any other 4xx/5xx (409: an id re-used with another body) is raised at once.
"""

from __future__ import annotations

import email.utils
import itertools
import math
import random
import threading
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from textnorm_reward_client import images as image_inputs
from textnorm_reward_client.errors import RewardServiceError, client_error
from textnorm_reward_client.results import (
    GroupResult,
    ScoreResult,
    ServiceLimits,
    check_advantage_eps,
    group_advantages,
    reward_model,
)

T = TypeVar("T")
REREGISTER_ATTEMPTS = 3  # replicas a request may meet that lack a set the client registered
MAX_REQUEST_ID = 128  # the service's request-id length limit
BODY_MARGIN = 0.9  # share of max_request_bytes a chunk may fill (JSON keys, prompts' escaping)


@dataclass(frozen=True)
class Send:
    method: str
    url: str
    json: dict[str, Any] | None
    request_id: str
    deadline: float | None  # time.monotonic() by which the whole call must be done
    timeout_s: float

    def timeout_now(self) -> float:
        """This attempt's timeout: the per-request timeout, cut to what the deadline leaves."""
        if self.deadline is None:
            return self.timeout_s
        return max(0.001, min(self.timeout_s, self.deadline - time.monotonic()))

    def wait_limit(self) -> float | None:
        """How long the attempt may wait for one of the client's own connections before it is
        sent: what the call's deadline leaves (None: no deadline, no limit)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class NotSent(httpx.TransportError):
    """An attempt that never left the client: the call's deadline passed while it waited for
    one of the client's own connections (`max_concurrency`). The server is not to blame."""


class Undecodable(httpx.TransportError):
    """An answer whose body could not be decoded (say, a corrupt gzip stream): retried as a
    lost answer is (the request id makes the retry safe)."""


@dataclass(frozen=True)
class Sleep:
    seconds: float


Outcome = httpx.Response | httpx.TransportError | None
Flow = Generator[Send | Sleep, Outcome, T]


@dataclass(frozen=True)
class RetryPolicy:
    """attempts: tries per request (1 = no retry). Backoff before try n+1: uniform(0, 1) ×
    min(backoff_max_s, backoff_base_s × 2ⁿ⁻¹), but at least the answer's Retry-After (capped at
    max_retry_after_s) plus up to 10 % jitter, so ranks told the same Retry-After spread out."""

    attempts: int = 4
    backoff_base_s: float = 0.25
    backoff_max_s: float = 10.0
    max_retry_after_s: float = 60.0
    retry_statuses: tuple[int, ...] = (429, 503, 504)
    failover_cooldown_s: float = 5.0  # an unreachable base URL is skipped this long

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = random.uniform(0, 1) * min(
            self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)
        )
        if retry_after is None:
            return backoff
        floor = min(retry_after, self.max_retry_after_s)
        return max(backoff, floor * random.uniform(1.0, 1.1))


def retry_after_s(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds (delta-seconds or an HTTP date), None if absent."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Endpoints:
    """Base URLs in round robin; one that could not be reached sits out a cooldown (unless
    every one is out), so a dead replica costs one failed try, not one per call."""

    def __init__(self, urls: str | Sequence[str], cooldown_s: float) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("no base URL given")
        self.urls = [u.rstrip("/") for u in urls]
        self._cycle = itertools.cycle(self.urls)
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        self.cooldown_s = cooldown_s

    def pick(self) -> str:
        with self._lock:
            now = time.monotonic()
            for _ in self.urls:
                url = next(self._cycle)
                if self._down.get(url, 0.0) <= now:
                    return url
            return next(self._cycle)  # every one is down: keep rotating

    def failed(self, url: str) -> None:
        with self._lock:
            self._down[url] = time.monotonic() + self.cooldown_s

    def rest(self, url: str, seconds: float) -> bool:
        """`url` asked for `seconds` of rest (Retry-After): skip it that long. True when another
        base URL can be tried now, so the retry need not wait."""
        with self._lock:
            now = time.monotonic()
            self._down[url] = max(self._down.get(url, 0.0), now + seconds)
            return any(self._down.get(u, 0.0) <= now for u in self.urls if u != url)

    def answered(self, url: str) -> None:
        with self._lock:
            self._down.pop(url, None)


def _error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"error": {"code": "http_error", "message": response.text[:300]}}
    return body if isinstance(body, dict) else {"error": {"message": str(body)[:300]}}


def _named_sets(body: dict[str, Any] | None) -> list[str]:
    """The prompt-set ids a request body names (request-level and per item)."""
    if not body:
        return []
    named = [(body.get("textnorm") or {}).get("prompt_set")]
    named += [item.get("prompt_set") for item in body.get("items", [])]
    return list(dict.fromkeys(s for s in named if s))


def new_request_id() -> str:
    return uuid.uuid4().hex


def deadline_of(deadline_s: float | None) -> float | None:
    return None if deadline_s is None else time.monotonic() + deadline_s


class ClientCore:
    """The state both REST clients share: endpoints, retry policy, known prompt sets, the
    service's limits (read once from GET /v1/models), and the flows built from them."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        timeout_s: float,
        deadline_s: float | None,
        retry: RetryPolicy,
        raw_tensors: bool,
        resize: bool,
        max_items_per_request: int | None,
        own_inputs: bool = False,
    ) -> None:
        """`own_inputs`: copy array and tensor inputs when a call is made, so the caller may
        reuse its buffers before the call is done (the async client)."""
        self.own_inputs = own_inputs
        self.endpoints = Endpoints(urls, retry.failover_cooldown_s)
        self.timeout_s, self.deadline_s, self.retry = timeout_s, deadline_s, retry
        self.raw_tensors, self.resize = raw_tensors, resize
        self.max_items_per_request = max_items_per_request
        self.sets: dict[str, dict[str, Any]] = {}  # id → {"prompt", "contrastive"}
        self.limits: ServiceLimits | None = None

    # -- one request, with retries -------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        request_id: str,
        deadline: float | None,
        pin: str | None = None,
        attempts: int | None = None,
    ) -> Flow[dict[str, Any]]:
        attempts = attempts or self.retry.attempts
        tries, reregistered = 0, 0
        last: RewardServiceError | None = None  # the previous attempt's failure
        sticky = pin  # a request for one replica (registering a set it lacks) retries there
        while True:
            url = sticky or pin or self.endpoints.pick()
            pin = None
            if deadline is not None and time.monotonic() >= deadline:
                raise self._deadline_error(request_id, tries, last)
            tries += 1
            send = Send(method, url + path, body, request_id, deadline, self.timeout_s)
            outcome = yield send
            if isinstance(outcome, NotSent):
                raise self._deadline_error(request_id, tries - 1, last)
            if isinstance(outcome, httpx.TransportError):
                self.endpoints.failed(url)
                failure = client_error(
                    "unreachable",
                    f"cannot reach {url}: {type(outcome).__name__}: {outcome}",
                    request_id=request_id,
                    attempts=tries,
                )
                failure.__cause__ = outcome
                wait_floor = None
            else:
                assert isinstance(outcome, httpx.Response)
                self.endpoints.answered(url)
                if outcome.status_code < 400:
                    try:
                        payload = outcome.json()
                    except ValueError:
                        payload = None
                    if not isinstance(payload, dict):
                        raise client_error(
                            "invalid_response",
                            f"{url}{path} answered {outcome.status_code} with a body that is "
                            f"not a JSON object: {outcome.text[:200]!r}",
                            request_id=request_id,
                            attempts=tries,
                        )
                    return payload
                error_body = _error_body(outcome)
                failure = RewardServiceError(
                    outcome.status_code, error_body, request_id=request_id, attempts=tries
                )
                missing = [s for s in _named_sets(body) if s in self.sets]
                if failure.code == "unknown_prompt_set" and missing:
                    if reregistered >= REREGISTER_ATTEMPTS:
                        raise failure
                    reregistered += 1
                    for set_id in missing:  # register there, then send again there
                        yield from self.request(
                            "POST",
                            "/v1/prompt-sets",
                            self.sets[set_id],
                            request_id=f"{request_id}.register",
                            deadline=deadline,
                            pin=url,
                        )
                    pin = url
                    continue
                if outcome.status_code not in self.retry.retry_statuses:
                    raise failure
                wait_floor = retry_after_s(outcome)
                if wait_floor is not None and sticky is None:
                    # Retry-After speaks for the replica that sent it: another may answer now
                    rest_s = min(wait_floor, self.retry.max_retry_after_s)  # as waits are
                    wait_floor = None if self.endpoints.rest(url, rest_s) else wait_floor
            last = failure
            if tries >= attempts:
                raise failure
            delay = self.retry.delay(tries, wait_floor)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise self._deadline_error(request_id, tries, failure)
            yield Sleep(delay)

    def _deadline_error(
        self, request_id: str, tries: int, last: RewardServiceError | None
    ) -> RewardServiceError:
        message = f"the call's deadline passed after {tries} attempt(s)"
        if last is not None:
            message += f"; last answer: {last}"
        error = client_error("deadline_exceeded", message, request_id=request_id, attempts=tries)
        error.last_error = last  # type: ignore[attr-defined]
        return error

    # -- the service's limits and models -------------------------------------------------------
    def models(self, deadline: float | None = None) -> Flow[dict[str, Any]]:
        rid = new_request_id()
        payload = yield from self.request(
            "GET", "/v1/models", None, request_id=rid, deadline=deadline
        )
        self.limits = ServiceLimits.from_models(payload)
        return payload

    def service_limits(self, deadline: float | None = None) -> Flow[ServiceLimits]:
        """The limits, read once (GET /v1/models, with the usual retries). A service without
        the endpoint (404) gets the fallback; any other failure is the call's failure."""
        if self.limits is None:
            try:
                yield from self.models(deadline)
            except RewardServiceError as exc:
                if exc.status not in (404, 405):
                    raise
                self.limits = ServiceLimits()
        assert self.limits is not None
        return self.limits.capped(self.max_items_per_request)

    def register_prompt_set(
        self, prompt: str, contrastive: Sequence[str], deadline: float | None = None
    ) -> Flow[str]:
        body = {"prompt": prompt, "contrastive": list(contrastive)}
        rid = new_request_id()
        answer = yield from self.request(
            "POST", "/v1/prompt-sets", body, request_id=rid, deadline=deadline
        )
        set_id = answer["prompt_set"]["id"]
        self.sets[set_id] = body
        return set_id

    # -- score calls ---------------------------------------------------------------------------
    def score_call(
        self,
        images: Any,
        prompts: str | Sequence[str],
        *,
        textnorm: dict[str, Any] | None,
        request_id: str | None,
        deadline_s: float | None,
    ) -> ScoreCall:
        items = image_inputs.expand(images, copy=self.own_inputs)
        prompts = [prompts] * len(items) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(items):
            raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
        if not items:
            raise ValueError("no images given")
        return ScoreCall(
            self, items, prompts, None, textnorm, request_id, self._deadline(deadline_s), {}
        )

    def group_call(
        self,
        prompt: str,
        images: Any,
        *,
        textnorm: dict[str, Any] | None,
        advantages: bool,
        advantage_of: str,
        advantage_eps: float,
        request_id: str | None,
        deadline_s: float | None,
    ) -> ScoreCall:
        items = image_inputs.expand(images, copy=self.own_inputs)
        if not items:
            raise ValueError("no images given")
        eps = check_advantage_eps(advantage_eps)
        group = {"advantages": advantages, "advantage_of": advantage_of, "eps": eps}
        return ScoreCall(
            self, items, [prompt] * len(items), prompt, textnorm, request_id,
            self._deadline(deadline_s), group,
        )  # fmt: skip

    def _deadline(self, deadline_s: float | None) -> float | None:
        return deadline_of(self.deadline_s if deadline_s is None else deadline_s)

    def call_deadline(self) -> float | None:
        """The deadline of a call made now with the client's `deadline_s`."""
        return self._deadline(None)


@dataclass
class ScoreCall:
    """One score / score_group call: its items, how they are encoded, the requests (chunks)
    they go in, and how the answers are merged back in item order."""

    core: ClientCore
    items: list[Any]
    prompts: list[str]
    group_prompt: str | None  # set for score_group
    textnorm: dict[str, Any] | None
    request_id: str | None
    deadline: float | None
    group: dict[str, Any]
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    sent_ids: list[str] = field(default_factory=list)  # one request id per chunk sent
    sent_sizes: list[int] = field(default_factory=list)  # items per chunk

    def __post_init__(self) -> None:
        self.request_id = self.request_id or new_request_id()

    @property
    def size(self) -> int:
        return len(self.items)

    def use(self, limits: ServiceLimits) -> None:
        self.limits = limits

    def encode(self, index: int) -> image_inputs.WireImage:
        """Item `index` → its JSON value (run in the client's encoding thread pool)."""
        raw = self.core.raw_tensors and self.limits.accepts_raw
        size = self.limits.image_size if self.core.resize else None
        return image_inputs.to_wire(self.items[index], raw=raw, resize_to=size)

    def chunks(self, wire: list[image_inputs.WireImage]) -> list[range]:
        """Consecutive item ranges, each within items, pixels and bytes per request."""
        limits = self.limits
        max_pixels = limits.max_request_pixels or math.inf
        max_chars = (limits.max_request_bytes or math.inf) * BODY_MARGIN
        out: list[range] = []
        start, pixels, chars = 0, 0, 0
        for i, image in enumerate(wire):
            cost = image.chars + 3 * len(self.prompts[i]) + 64
            full = i - start >= limits.max_items_per_request
            if i > start and (
                full or pixels + image.pixels > max_pixels or chars + cost > max_chars
            ):
                out.append(range(start, i))
                start, pixels, chars = i, 0, 0
            pixels += image.pixels
            chars += cost
        out.append(range(start, len(wire)))
        return out

    def chunk_ids(self, count: int) -> list[str]:
        rid = str(self.request_id)
        if count == 1:
            return [rid]
        if len(rid) + 1 + len(str(count - 1)) > MAX_REQUEST_ID:
            raise ValueError(f"request_id too long to derive {count} chunk ids from")
        return [f"{rid}.{k}" for k in range(count)]

    def requests(self, wire: list[image_inputs.WireImage]) -> list[Flow[dict[str, Any]]]:
        """One request flow per chunk; run them concurrently, then `merge` their answers."""
        chunks = self.chunks(wire)
        self.sent_ids = self.chunk_ids(len(chunks))
        self.sent_sizes = [len(c) for c in chunks]
        flows = []
        for chunk, rid in zip(chunks, self.sent_ids, strict=True):
            if self.group_prompt is None:
                path = "/v1/score"
                body: dict[str, Any] = {
                    "items": [{"image": wire[i].value, "prompt": self.prompts[i]} for i in chunk],
                    "request_id": rid,
                }
            else:
                path = "/v1/score/group"
                body = {
                    "prompt": self.group_prompt,
                    "images": [wire[i].value for i in chunk],
                    "request_id": rid,
                    # one chunk: the service computes the advantages; several: this client does
                    "advantages": bool(self.group["advantages"]) and len(chunks) == 1,
                }
                if body["advantages"]:
                    body["advantage_of"] = self.group["advantage_of"]
                    body["advantage_eps"] = self.group["eps"]
            if self.textnorm:
                body["textnorm"] = self.textnorm
            flows.append(
                self.core.request("POST", path, body, request_id=rid, deadline=self.deadline)
            )
        return flows

    def merge(self, payloads: list[dict[str, Any]]) -> ScoreResult:
        ids = list(self.sent_ids)
        for rid, size, payload in zip(ids, self.sent_sizes, payloads, strict=True):
            got = payload.get("results")
            if not isinstance(got, list) or len(got) != size:  # never a reward for another item
                count = len(got) if isinstance(got, list) else None
                raise client_error(
                    "invalid_response",
                    f"request {rid} sent {size} items and got {count} results back",
                    request_id=rid,
                )
        kind = ScoreResult if self.group_prompt is None else GroupResult
        if len(payloads) == 1:
            return kind.from_json(payloads[0], ids)
        provenances = [p.get("provenance") or {} for p in payloads]
        identities = {reward_model(p) for p in provenances}
        if len(identities) > 1:  # replicas serving different exports answered one call
            raise client_error(
                "mixed_provenance",
                "the chunks of one call were scored by different exports or calibration "
                f"files: {sorted(identities)}",
                request_id=self.request_id,
            )
        results = [r for p in payloads for r in p["results"]]
        merged: dict[str, Any] = {
            "request_id": self.request_id,
            "results": results,
            "provenance": _merged_provenance(provenances, results),
            "chunks": [
                {"request_id": p.get("request_id"), "items": len(p["results"])} for p in payloads
            ],
        }
        if self.group_prompt is not None:
            merged["prompt"] = payloads[0].get("prompt", self.group_prompt)
            if self.group["advantages"]:
                name = self.group["advantage_of"]
                values = [r.get(name) for r in merged["results"]]
                merged.update(group_advantages(values, self.group["eps"], name))
                merged["advantages_computed_by"] = "client"
        return kind.from_json(merged, ids)


def _merged_provenance(
    provenances: list[dict[str, Any]], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """The chunks' common provenance, with the TextNorm block's c, λ and scale source
    summarised over every item as the gateway summarises one request's: the value when all
    items agree, else null (the source: "mixed")."""
    merged = dict(provenances[0])
    textnorm = dict(merged.get("textnorm") or {})
    for key, per_item in _SUMMARISED:
        values = {r.get(per_item) for r in results if isinstance(r, dict)} - {None}
        if len(values) > 1:
            textnorm[key] = "mixed" if key == "scale_source" else None
        elif values:
            textnorm[key] = values.pop()
    if textnorm:
        merged["textnorm"] = textnorm
    return merged


# provenance.textnorm key ← the item field it summarises
_SUMMARISED = (
    ("scale", "textnorm_scale"),
    ("ensemble_lambda", "ensemble_lambda"),
    ("scale_source", "textnorm_scale_source"),
)
