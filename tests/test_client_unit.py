"""The trainer-side client's behaviour against a scripted service (httpx.MockTransport).

No Triton here: the service's answers are written by each test, so retries, Retry-After, the
deadline, request ids, chunking, failover and the image-input conversions are checked exactly.
The same rewards through the real stack: tests/test_client_e2e.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import pytest
from PIL import Image
from textnorm_reward_client import (
    AsyncRewardClient,
    RetryPolicy,
    RewardClient,
    RewardServiceError,
)
from textnorm_reward_client.adapters import (
    DdpoRewardFn,
    PerPromptStatTracker,
    async_grpo_reward_fn,
    group_advantages,
    grpo_reward_fn,
)

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.serial
URL = "http://reward.test"
FAST = RetryPolicy(attempts=4, backoff_base_s=0.001, backoff_max_s=0.002)
RAW_LIMITS = {
    "max_items_per_request": 3,
    "max_image_bytes": 8_000_000,
    "max_image_pixels": 4096 * 4096,
    "max_image_aspect_ratio": 20.0,
    "max_request_pixels": 64 * 1024 * 1024,
    "max_request_bytes": 128 * 1024 * 1024,
    "max_prompt_chars": 2000,
    "max_contrastive_prompts": 32,
    "image_formats": ["png", "jpeg", "webp", "raw"],
    "raw_dtypes": ["uint8"],
}


def decode(image) -> np.ndarray:
    """A wire image (base64 PNG or the raw-tensor object) → uint8 [H, W, 3]."""
    if isinstance(image, dict):
        assert set(image) == {"shape", "dtype", "data"} and image["dtype"] == "uint8"
        data = base64.b64decode(image["data"], validate=True)
        return np.frombuffer(data, np.uint8).reshape(image["shape"])
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB"))


def reward_of(pixels: np.ndarray) -> float:
    """The scripted service's 'reward': a function of the pixels, so order is checkable."""
    return float(pixels.astype(np.float64).mean()) + pixels.shape[0] / 1000


class FakeService:
    """A scripted gateway: /v1/models with `limits`, /v1/score and /v1/score/group answering
    `reward_of(pixels)`; `script` answers the first calls of a path with other statuses."""

    def __init__(self, limits: dict | None = RAW_LIMITS, image_size: int = 32) -> None:
        self.limits, self.image_size = limits, image_size
        self.script: dict[str, list[httpx.Response | Exception]] = {}
        self.seen: list[tuple[str, str, dict | None, float, str | None]] = []
        self.delay_for: dict[str, float] = {}  # request_id → seconds to wait before answering
        self.answered: list[str] = []  # request ids, in the order their answers went out
        self.lock = threading.Lock()

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        with self.lock:
            self.seen.append(
                (
                    str(request.url.copy_with(path="/")).rstrip("/"),
                    request.url.path,
                    body,
                    time.monotonic(),
                    request.headers.get("x-request-id"),
                )
            )
            scripted = self.script.get(request.url.path)
            answer = scripted.pop(0) if scripted else None
        if isinstance(answer, Exception):
            raise answer
        if answer is not None:
            return answer
        if body and body.get("request_id") in self.delay_for:
            time.sleep(self.delay_for[body["request_id"]])
        if body and "request_id" in body:
            with self.lock:
                self.answered.append(body["request_id"])
        return self.answer(request.url.path, body)

    def answer(self, path: str, body: dict | None) -> httpx.Response:
        provenance = {"export_sha256": "abc", "model": {"name": "fake"}}
        if path == "/v1/models":
            payload = {"models": [{"image_size": self.image_size}], "provenance": provenance}
            if self.limits is not None:
                payload["limits"] = self.limits
            return httpx.Response(200, json=payload)
        if path == "/v1/prompt-sets":
            return httpx.Response(200, json={"prompt_set": {"id": "ps_" + "0" * 32}})
        images = [i["image"] for i in body["items"]] if path == "/v1/score" else body["images"]
        results = []
        for image in images:
            value = reward_of(decode(image))
            results.append(
                {"raw": value, "textnorm": value / 255, "head": None, "contrastive_count": 1,
                 "contrastive_source": "rule", "prompt_truncated": False}
            )  # fmt: skip
        payload = {"request_id": body["request_id"], "results": results, "provenance": provenance}
        if path == "/v1/score/group":
            payload["prompt"] = body["prompt"]
            if body.get("advantages"):
                values = np.array([r["textnorm"] for r in results])
                std = values.std()
                payload["advantages"] = ((values - values.mean()) / (std + 1e-6)).tolist()
        return httpx.Response(200, json=payload)

    def calls(self, path: str) -> list[tuple]:
        return [s for s in self.seen if s[1] == path]

    def client(self, urls=URL, **kwargs) -> RewardClient:
        kwargs.setdefault("retry", FAST)
        return RewardClient(urls, transport=httpx.MockTransport(self.handler), **kwargs)

    def async_client(self, urls=URL, **kwargs) -> AsyncRewardClient:
        kwargs.setdefault("retry", FAST)
        return AsyncRewardClient(urls, transport=httpx.MockTransport(self.ahandler), **kwargs)

    async def ahandler(self, request: httpx.Request) -> httpx.Response:
        return await asyncio.to_thread(self.handler, request)


def images(n: int, size: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (size + i, size, 3), dtype=np.uint8) for i in range(n)]


def error(status: int, code: str = "x", headers: dict | None = None) -> httpx.Response:
    body = {"error": {"code": code, "message": f"status {status}", "field": "items[0].image"}}
    return httpx.Response(status, json={**body, "request_id": "r"}, headers=headers)


# -- retries, Retry-After, deadline, request ids -------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "tries"),
    [
        (error(503), 4), (error(504), 4), (error(429), 4),
        (httpx.ConnectError("refused"), 4), (httpx.ReadTimeout("slow"), 4),
        (error(502), 1), (error(422), 1), (error(409, "request_id_conflict"), 1), (error(401), 1),
    ],
)  # fmt: skip
def test_what_is_retried_and_the_error_that_reaches_the_caller(answer, tries):
    service = FakeService()
    service.script["/v1/score"] = [answer] * 10
    with service.client() as client, pytest.raises(RewardServiceError) as raised:
        client.score(images(1), "a red circle", request_id="rid-1")
    sent = service.calls("/v1/score")
    assert len(sent) == tries
    assert {s[2]["request_id"] for s in sent} == {"rid-1"}  # the same id on every retry
    assert {s[4] for s in sent} == {"rid-1"}  # and in the X-Request-ID header
    exc = raised.value
    assert exc.attempts == tries and exc.request_id == "rid-1"
    if isinstance(answer, Exception):
        assert exc.status is None and exc.code == "unreachable"
        assert f"cannot reach {URL}" in str(exc) and isinstance(exc.__cause__, type(answer))
    else:
        assert exc.status == answer.status_code
        assert exc.error["field"] == "items[0].image" and exc.body["request_id"] == "r"


def test_retry_then_success_returns_the_rewards_of_one_request():
    service = FakeService()
    service.script["/v1/score"] = [error(503), httpx.ConnectError("refused"), error(429)]
    pixels = images(2)
    with service.client() as client:
        result = client.score(pixels, ["a", "b"], request_id="same")
    assert len(service.calls("/v1/score")) == 4
    assert [s[2]["request_id"] for s in service.calls("/v1/score")] == ["same"] * 4
    assert np.allclose(result.rewards("raw"), [reward_of(p) for p in pixels])
    assert result.request_id == "same" and result["results"][0]["raw"] == result.results[0].raw


def test_the_wait_honours_retry_after():
    """Measured: the second try comes no sooner than Retry-After, though the backoff alone
    would retry within milliseconds."""
    service = FakeService()
    service.script["/v1/score"] = [error(503, headers={"Retry-After": "1"})]
    with service.client() as client:
        client.score(images(1), "a red circle")
    first, second = service.calls("/v1/score")
    waited = second[3] - first[3]
    assert waited >= 1.0, waited
    print(f"Retry-After: 1 → waited {waited:.3f} s (backoff alone: ≤ 0.002 s)")


def test_retry_policy_delays():
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=4.0, max_retry_after_s=30)
    for attempt in range(1, 8):
        delays = [policy.delay(attempt, None) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= min(4.0, 0.5 * 2 ** (attempt - 1))
        assert len(set(delays)) > 100  # jittered
    with_header = [policy.delay(1, 2.0) for _ in range(200)]
    assert min(with_header) >= 2.0 and max(with_header) <= 2.2
    assert max(policy.delay(1, 500.0) for _ in range(50)) <= 33.0  # capped


def test_the_deadline_ends_a_call_instead_of_waiting_out_retry_after():
    service = FakeService()
    service.script["/v1/score"] = [error(503, headers={"Retry-After": "30"})] * 5
    with service.client(deadline_s=0.5) as client, pytest.raises(RewardServiceError) as raised:
        client.score(images(1), "a red circle")
    assert raised.value.code == "deadline_exceeded" and raised.value.status is None
    assert raised.value.last_error.status == 503
    assert len(service.calls("/v1/score")) == 1  # it did not sleep 30 s and try again


def test_the_deadline_cuts_each_attempts_timeout():
    seen_timeouts = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_timeouts.append(request.extensions["timeout"]["read"])
        return FakeService().answer(request.url.path, json.loads(request.content or b"null"))

    with RewardClient(URL, timeout_s=60, deadline_s=5, transport=httpx.MockTransport(handler)) as c:
        c.score(images(1), "a red circle")
    assert all(t <= 5 for t in seen_timeouts) and len(seen_timeouts) == 2  # models + score


class TricklingServer:
    """A real loopback HTTP server that answers every request one byte per 0.1 s (a 100 s body):
    httpx's read timeout restarts with every byte, so only a per-attempt cut ends the call."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            conn.sendall(b"Content-Length: 1000\r\n\r\n")
            for _ in range(1000):
                if self.stopping.wait(0.1):
                    return
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_deadline_holds_against_a_server_that_trickles_its_answer(kind):
    server = TricklingServer()
    try:
        started = time.monotonic()
        with pytest.raises(RewardServiceError) as raised:
            if kind == "sync":
                with RewardClient(server.url, timeout_s=30, deadline_s=1.0) as client:
                    client.score(images(1), "a red circle")
            else:

                async def call() -> None:
                    async with AsyncRewardClient(server.url, timeout_s=30, deadline_s=1.0) as c:
                        await c.score(images(1), "a red circle")

                asyncio.run(call())
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert raised.value.code == "deadline_exceeded"
    assert elapsed < 10  # the trickle lasts 100 s; httpx's per-read timeout never fires


def test_an_async_calls_deadline_covers_waiting_for_a_connection_slot():
    """One slot, held by a call to a trickling server: a second call's deadline still holds."""
    server = TricklingServer()

    async def calls() -> tuple[BaseException, float, float]:
        async with AsyncRewardClient(server.url, timeout_s=30, max_concurrency=1) as client:
            started = time.monotonic()
            holder = asyncio.ensure_future(client.score(images(1), "a", deadline_s=4.0))
            await asyncio.sleep(0.2)
            with pytest.raises(RewardServiceError) as raised:
                await client.score(images(1), "b", deadline_s=0.5)
            second = time.monotonic() - started
            with pytest.raises(RewardServiceError):
                await holder
            return raised.value, second, time.monotonic() - started

    try:
        error, second, first = asyncio.run(calls())
    finally:
        server.close()
    assert error.code == "deadline_exceeded"
    assert second < first  # it did not wait for the slot's holder to give up


# -- chunking ----------------------------------------------------------------------------------
def test_a_call_over_the_item_limit_is_split_and_reassembled_in_order():
    """10 items, 3 per request: 4 concurrent requests `<id>.<k>`; the first answers last."""
    service = FakeService()
    service.delay_for = {"big.0": 0.3, "big.1": 0.15}
    pixels = images(10)
    with service.client(max_concurrency=4) as client:
        result = client.score(pixels, [f"p{i}" for i in range(10)], request_id="big")
    sent = service.calls("/v1/score")
    assert sorted(s[2]["request_id"] for s in sent) == ["big.0", "big.1", "big.2", "big.3"]
    assert [len(s[2]["items"]) for s in sorted(sent, key=lambda s: s[2]["request_id"])] == [
        3, 3, 3, 1
    ]  # fmt: skip
    assert service.answered[-1] == "big.0"  # answered last, still first in the result
    by_id = sorted(sent, key=lambda s: s[2]["request_id"])
    prompts = [i["prompt"] for s in by_id for i in s[2]["items"]]
    assert prompts == [f"p{i}" for i in range(10)]
    assert np.allclose(result.rewards("raw"), [reward_of(p) for p in pixels])
    assert result.chunk_request_ids == ["big.0", "big.1", "big.2", "big.3"]
    assert result.request_id == "big" and len(result["results"]) == 10


def test_async_chunking_keeps_item_order():
    service = FakeService()
    service.delay_for = {"a.0": 0.2}
    pixels = images(7)

    async def run():
        async with service.async_client(max_concurrency=3) as client:
            return await client.score(np.stack([p[:8] for p in pixels]), "x", request_id="a")

    result = asyncio.run(run())
    assert np.allclose(result.rewards("raw"), [reward_of(p[:8]) for p in pixels])
    assert len(service.calls("/v1/score")) == 3


def in_chunk_order(calls: list[tuple]) -> list[tuple]:
    """Calls in the order of the caller's items: a request's chunks (`<id>.<k>`, sent
    concurrently, so they arrive in any order) by k; separate requests as they came."""

    def split(call: tuple) -> tuple[str, int]:
        rid = call[2]["request_id"]
        base, dot, k = rid.rpartition(".")
        return (base, int(k)) if dot and k.isdigit() else (rid, 0)

    first: dict[str, int] = {}
    for call in calls:
        first.setdefault(split(call)[0], len(first))
    return sorted(calls, key=lambda c: (first[split(c)[0]], split(c)[1]))


def test_chunks_respect_the_request_pixel_and_byte_limits():
    service = FakeService(limits={**RAW_LIMITS, "max_items_per_request": 64,
                                  "max_request_pixels": 2 * 16 * 16})  # fmt: skip
    pixels = [np.full((16, 16, 3), i, np.uint8) for i in range(5)]
    with service.client() as client:
        result = client.score(pixels, "x")
    sent = in_chunk_order(service.calls("/v1/score"))
    assert [len(s[2]["items"]) for s in sent] == [2, 2, 1]
    assert np.allclose(result.rewards("raw"), [reward_of(p) for p in pixels])
    service = FakeService(limits={**RAW_LIMITS, "max_items_per_request": 64,
                                  "max_request_bytes": 4000})  # fmt: skip
    with service.client() as client:
        client.score(pixels, "x")  # 1 KiB of base64 per image: 3 fit in 90 % of 4000
    assert [len(s[2]["items"]) for s in in_chunk_order(service.calls("/v1/score"))] == [3, 2]
    assert all(len(json.dumps(s[2])) <= 4000 for s in service.calls("/v1/score"))


def test_a_group_over_the_limit_gets_client_side_advantages_with_the_service_formula():
    service = FakeService()
    pixels = images(7)
    with service.client() as client:
        small = client.score_group("x", pixels[:3])
        big = client.score_group("x", pixels, request_id="g")
    assert small.advantages_computed_by == "service" and small.advantages is not None
    assert [s[2]["advantages"] for s in service.calls("/v1/score/group")] == [True] + [False] * 3
    values = big.rewards("textnorm")
    expected = (values - values.mean()) / (values.std() + 1e-6)
    assert big.advantages_computed_by == "client"
    assert np.allclose(big.advantage_array(), expected, atol=1e-12)
    assert np.isclose(big.reward_std, values.std()) and big.prompt == "x"
    chunks = in_chunk_order(service.calls("/v1/score/group")[1:])
    sent = [i for s in chunks for i in s[2]["images"]]
    whole = {"prompt": "x", "images": sent, "advantages": True, "request_id": "r"}
    on_server = service.answer("/v1/score/group", whole).json()["advantages"]
    assert np.allclose(big.advantages, on_server, atol=1e-9)  # what one request would give


def test_chunk_answers_from_different_exports_are_refused():
    service = FakeService()
    original = service.answer
    count = iter(range(100))

    def answer(path, body):
        response = original(path, body)
        if path == "/v1/score" and next(count) == 1:
            payload = response.json()
            payload["provenance"]["export_sha256"] = "other"
            return httpx.Response(200, json=payload)
        return response

    service.answer = answer
    with service.client() as client, pytest.raises(RewardServiceError) as raised:
        client.score(images(6), "x")
    assert raised.value.code == "mixed_provenance"


# -- several base URLs ---------------------------------------------------------------------------
def test_round_robin_over_base_urls_and_failover_past_a_dead_one():
    service = FakeService()
    urls = ["http://a.test", "http://b.test", "http://c.test"]
    with service.client(urls) as client:
        for _ in range(6):
            client.score(images(1), "x")
    used = [s[0] for s in service.calls("/v1/score")]
    assert sorted(set(used)) == urls and max(used.count(u) for u in urls) == 2

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.test":
            raise httpx.ConnectError("refused", request=request)
        return service.handler(request)

    service.seen.clear()
    transport = httpx.MockTransport(handler)
    with RewardClient(urls, transport=transport, retry=FAST) as client:
        for _ in range(6):
            assert np.isfinite(client.score(images(1), "x").rewards("raw")).all()
    used = [s[0] for s in service.seen]
    assert "http://a.test" not in used and {"http://b.test", "http://c.test"} <= set(used)


def test_unknown_prompt_set_is_registered_on_the_replica_that_lacks_it():
    service = FakeService()
    set_id = "ps_" + "0" * 32
    with service.client(["http://a.test", "http://b.test"]) as client:
        assert client.register_prompt_set("x", ["y"]) == set_id
        service.script["/v1/score"] = [error(404, "unknown_prompt_set")]
        client.score(images(1), "x", textnorm={"prompt_set": set_id})
    steps = [(s[0], s[1]) for s in service.seen if s[1] != "/v1/models"]
    failed_on = steps[1][0]
    assert steps[1:] == [
        (failed_on, "/v1/score"), (failed_on, "/v1/prompt-sets"), (failed_on, "/v1/score")
    ]  # fmt: skip


def test_a_registration_refused_for_load_is_retried_on_the_same_replica():
    """The replica that lacks the set may answer its registration 429 (prompt-set uploads are
    admitted like scoring): the retry registers there, not on another replica."""
    service = FakeService()
    set_id = "ps_" + "0" * 32
    with service.client(["http://a.test", "http://b.test"]) as client:
        assert client.register_prompt_set("x", ["y"]) == set_id
        busy = httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": "x"}})
        service.script["/v1/score"] = [error(404, "unknown_prompt_set")]
        service.script["/v1/prompt-sets"] = [busy, busy]
        client.score(images(1), "x", textnorm={"prompt_set": set_id})
    steps = [(s[0], s[1]) for s in service.seen if s[1] != "/v1/models"][1:]
    failed_on = steps[0][0]
    assert steps == [(failed_on, "/v1/score")] + [(failed_on, "/v1/prompt-sets")] * 3 + [
        (failed_on, "/v1/score")
    ]


def test_grpc_attempts_running_out_before_the_deadline_report_the_last_error():
    from textnorm_reward_client.grpc_client import GrpcRewardClient, _service_error
    from tritonclient.utils import InferenceServerException

    class Down:
        def infer(self, *args, **kwargs):
            raise InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")

    client = object.__new__(GrpcRewardClient)  # only what _infer reads
    client._channels = types.SimpleNamespace(next=Down)  # every turn: an unavailable Triton
    client.timeout_s, client.model, client.version = 60.0, "score", "1"

    class NoWaitThenLong(RetryPolicy):  # a retry at once; the wait after the last is long
        def delay(self, attempt: int, floor: float | None) -> float:
            return 0.0 if attempt == 1 else 1000.0

    client.retry = NoWaitThenLong(attempts=2)
    with pytest.raises(InferenceServerException) as caught:
        client._infer([], "rid", time.monotonic() + 30)  # 2 attempts, far within the deadline
    assert _service_error(caught.value, "rid").code == "unavailable"


def test_advantage_eps_takes_any_real_number_type():
    from textnorm_reward_client.results import check_advantage_eps

    assert check_advantage_eps(np.float32(0.5)) == 0.5 and check_advantage_eps(1) == 1.0
    with pytest.raises(ValueError, match="advantage_eps"):
        check_advantage_eps(True)


# -- image inputs ---------------------------------------------------------------------------------
def sent_images(service: FakeService) -> list:
    return [i["image"] for s in in_chunk_order(service.calls("/v1/score")) for i in s[2]["items"]]


def test_arrays_go_raw_and_files_and_pil_as_base64_with_the_same_pixels():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (2, 12, 10, 3), dtype=np.uint8)
    floats = rng.random((2, 3, 12, 10), dtype=np.float32)
    floats[0, 0, 0, :3] = [-0.5, 1.5, 0.5 / 255]  # clipped, clipped, rounds to 0 (half to even)
    expected_floats = np.rint(np.clip(floats, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    png = io.BytesIO()
    Image.fromarray(hwc[0]).save(png, "PNG")
    cases = [
        (hwc, list(hwc), dict),  # [N, H, W, 3] uint8
        (hwc[0], [hwc[0]], dict),  # [H, W, 3]
        (hwc.astype(np.float64) / 255, list(hwc), dict),  # numpy floats in [0, 1]
        (torch.from_numpy(floats), list(expected_floats), dict),  # [N, 3, H, W] float
        (torch.from_numpy(hwc[1]).permute(2, 0, 1), [hwc[1]], dict),  # [3, H, W] uint8
        ([Image.fromarray(hwc[0]), png.getvalue()], [hwc[0], hwc[0]], str),  # PIL, bytes
        ([torch.from_numpy(floats[0]), hwc[1]], [expected_floats[0], hwc[1]], dict),  # a mix
    ]
    for given, expected, kind in cases:
        service = FakeService(limits={**RAW_LIMITS, "max_items_per_request": 64})
        with service.client() as client:
            client.score(given, "x")
        sent = sent_images(service)
        assert [type(s) for s in sent] == [kind] * len(expected)
        for wire, pixels in zip(sent, expected, strict=True):
            assert np.array_equal(decode(wire), pixels)
    before = floats.copy()
    assert np.array_equal(floats, before)  # the caller's tensor was not changed in place


def test_a_service_without_limits_gets_png_and_the_fallback_item_limit(tmp_path):
    service = FakeService(limits=None)
    pixels = images(70, size=4)
    path = tmp_path / "one.png"
    Image.fromarray(pixels[0]).save(path)
    with service.client() as client:
        assert not client.limits().from_service and client.limits().max_items_per_request == 64
        client.score([*pixels, path], "x")
    sent = sent_images(service)
    assert all(isinstance(s, str) for s in sent)  # PNG base64
    assert [len(s[2]["items"]) for s in in_chunk_order(service.calls("/v1/score"))] == [64, 7]
    for wire, expected in zip(sent, [*pixels, pixels[0]], strict=True):
        assert np.array_equal(decode(wire), expected)


def test_resize_to_the_models_input_size_is_opt_in():
    service = FakeService(image_size=16)
    big = np.random.default_rng(1).integers(0, 256, (64, 40, 3), dtype=np.uint8)
    with service.client(resize=True) as client:
        client.score([big, big[:10, :12]], "x")
    with service.client() as client:
        client.score(big, "x")
    shapes = [decode(s).shape for s in sent_images(service)]
    assert shapes == [(26, 16, 3), (10, 12, 3), (64, 40, 3)]  # shorter side 16; small kept


def test_bad_inputs_are_refused_before_any_request():
    service = FakeService()
    with service.client() as client:
        for bad, match in [
            (np.zeros((4, 4), np.uint8), r"\[H, W, 3\]"),
            (np.zeros((4, 4, 4), np.uint8), r"\[H, W, 3\]"),
            (np.zeros((4, 4, 3), np.int32), "uint8 or float"),
            (object(), "unsupported image type"),
        ]:
            with pytest.raises((ValueError, TypeError), match=match):
                client.score(bad, "x")
        with pytest.raises(ValueError, match="2 images but 1 prompts"):
            client.score(images(2), ["x"])
    assert service.calls("/v1/score") == []


def test_the_plain_http_path_imports_and_runs_without_numpy_or_torch(tmp_path):
    """numpy, PIL and torch made unimportable: the package imports, scores encoded bytes and
    returns typed results; `.rewards()` then says numpy is needed."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('numpy', 'torch', 'PIL'):\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import httpx, json\n"
        "import textnorm_reward_client as c\n"
        "def handler(request):\n"
        "    if request.url.path == '/v1/models':\n"
        "        return httpx.Response(200, json={'models': [{}]})\n"
        "    body = json.loads(request.content)\n"
        "    results = [{'raw': 0.5, 'textnorm': 0.25} for _ in body['items']]\n"
        "    return httpx.Response(200, json={'request_id': body['request_id'],"
        " 'results': results, 'provenance': {}})\n"
        "with c.RewardClient('http://x', transport=httpx.MockTransport(handler)) as client:\n"
        "    out = client.score([b'\\x89PNG...', b'\\x89PNG...'], 'a prompt')\n"
        "assert [r.textnorm for r in out.results] == [0.25, 0.25], out\n"
        "try:\n"
        "    out.rewards()\n"
        "except ImportError:\n"
        "    pass\n"
        "assert not {'numpy', 'torch', 'PIL'} & set(sys.modules), sys.modules.keys()\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, str(probe)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- adapters --------------------------------------------------------------------------------------
def test_stat_tracker_matches_numpy_over_the_buffers():
    rng = np.random.default_rng(3)
    tracker = PerPromptStatTracker(buffer_size=5, min_count=4)
    history: dict[str, list[float]] = {}
    for _ in range(4):
        prompts = list(rng.choice(["a", "b", "c"], size=6))
        rewards = rng.random(6)
        got = tracker.update(prompts, rewards)
        for prompt in dict.fromkeys(prompts):
            mask = np.array(prompts) == prompt
            history.setdefault(prompt, []).extend(rewards[mask])
            buffer = np.array(history[prompt][-5:])
            ref = buffer if len(buffer) >= 4 else rewards  # too few: the batch's statistics
            expected = (rewards[mask] - ref.mean()) / (ref.std() + 1e-6)
            assert np.allclose(got[mask], expected, atol=1e-12), prompt
    stats = tracker.get_stats()
    assert all(s["count"] == min(5, len(history[p])) for p, s in stats.items())
    tracker.clear()
    assert tracker.get_stats() == {}


def test_reward_fn_adapters_return_the_clients_rewards_in_order():
    torch = pytest.importorskip("torch")
    service = FakeService(limits={**RAW_LIMITS, "max_items_per_request": 64})
    batch = torch.rand(4, 3, 8, 8)
    expected = np.rint(batch.numpy().clip(0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    want = np.array([reward_of(p) / 255 for p in expected])
    with service.client() as client:
        reward_fn = DdpoRewardFn(client)
        rewards, info = reward_fn(batch, ["x"] * 4, [{}] * 4)
        future = reward_fn.submit(batch, ["x"] * 4, [{"i": i} for i in range(4)])
        batch.zero_()  # the next sampling step overwrites the buffer: the call kept a copy
        later, later_info = future.result(timeout=10)
        buffer = expected.copy()
        from_numpy = reward_fn.submit(buffer, ["x"] * 4)
        buffer[:] = 0  # the same for a numpy buffer
        assert np.allclose(from_numpy.result(timeout=10)[0], want, atol=1e-6)
        reward_fn.close()
        grpo = grpo_reward_fn(client)
        conversational = [[{"role": "user", "content": "x"}]] * 4
        listed = grpo(conversational, list(expected))
    assert rewards.dtype == np.float32 and np.allclose(rewards, want, atol=1e-6)
    assert np.allclose(later, want, atol=1e-6) and later_info["metadata"][3] == {"i": 3}
    assert set(info) >= {"raw", "textnorm", "request_id", "provenance"}
    assert listed == pytest.approx(want.tolist()) and grpo.__name__ == "textnorm_textnorm"
    assert [i["prompt"] for s in service.calls("/v1/score") for i in s[2]["items"]][-4:] == [
        "x"
    ] * 4

    async def run():
        async with service.async_client() as client:
            return await async_grpo_reward_fn(client)(["x"] * 4, list(expected))

    assert asyncio.run(run()) == pytest.approx(want.tolist())


def test_group_advantages_groups_a_flat_batch_by_prompt():
    service = FakeService()
    pixels = images(6)
    prompts = ["a", "b", "a", "b", "a", "b"]
    with service.client() as client:
        rewards, advantages = group_advantages(client, pixels, prompts)
    want = np.array([reward_of(p) / 255 for p in pixels])
    assert np.allclose(rewards, want)
    for prompt in ("a", "b"):
        mask = np.array(prompts) == prompt
        values = want[mask]
        expected = (values - values.mean()) / (values.std() + 1e-6)
        assert np.allclose(advantages[mask], expected, atol=1e-9)


def test_an_answer_missing_results_or_not_json_is_an_error_never_a_short_array():
    for answer in (
        httpx.Response(200, json={"request_id": "r", "results": [{"raw": 0.1}], "provenance": {}}),
        httpx.Response(200, text="<html>proxy</html>"),
    ):
        service = FakeService()
        service.script["/v1/score"] = [answer]
        with service.client() as client, pytest.raises(RewardServiceError) as raised:
            client.score(images(2), "x")
        assert raised.value.code == "invalid_response", raised.value


def test_async_client_retries_and_raises_the_same_way():
    service = FakeService()
    service.script["/v1/score"] = [error(503, headers={"Retry-After": "0.2"}), error(504)]

    async def run():
        async with service.async_client() as client:
            ok = await client.score(images(2), "x", request_id="async-1")
            service.script["/v1/score"] = [httpx.ConnectError("refused")] * 4
            with pytest.raises(RewardServiceError) as raised:
                await client.score(images(1), "x", request_id="async-2")
            return ok, raised.value

    ok, failure = asyncio.run(run())
    sent = service.calls("/v1/score")
    assert [s[2]["request_id"] for s in sent] == ["async-1"] * 3 + ["async-2"] * 4
    assert sent[1][3] - sent[0][3] >= 0.2  # Retry-After honoured on the asyncio path too
    assert np.allclose(ok.rewards("raw"), [reward_of(p) for p in images(2)])
    assert failure.code == "unreachable" and failure.attempts == 4


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_requests_in_flight_never_exceed_max_concurrency(kind):
    service = FakeService(limits={**RAW_LIMITS, "max_items_per_request": 1})
    in_flight, peak = 0, 0
    lock = threading.Lock()
    original = service.answer

    def answer(path, body):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return original(path, body)

    service.answer = answer
    if kind == "sync":
        with service.client(max_concurrency=3) as client:
            result = client.score(images(9), "x")  # 9 chunks of one item
        assert len(result.chunk_request_ids) == 9
    else:

        async def run():
            async with service.async_client(max_concurrency=3) as client:
                return await asyncio.gather(*(client.score(images(3), "x") for _ in range(4)))

        assert len(asyncio.run(run())) == 4
    assert peak == 3, peak  # concurrent, and bounded


def test_a_service_error_crosses_process_boundaries_as_itself():
    """Trainers run reward calls in worker processes (finetune compare --jobs): the error that
    comes back must be the same error, not a broken pool."""
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    body = {"error": {"code": "too_many_items", "message": "65 items", "field": "items"}}
    error = RewardServiceError(422, body, request_id="r-1", attempts=3)
    error.last_error = "HTTP 503: busy"  # set after construction (deadline errors do)
    again = pickle.loads(pickle.dumps(error))
    assert again.last_error == "HTTP 503: busy"
    assert type(again) is RewardServiceError and str(again) == str(error)
    assert (again.status, again.body, again.request_id, again.attempts, again.code) == (
        422, body, "r-1", 3, "too_many_items",
    )  # fmt: skip
    with ProcessPoolExecutor(1) as pool:
        raised = pool.submit(_raise_service_error, body).exception()
    assert isinstance(raised, RewardServiceError) and raised.code == "too_many_items"


def _raise_service_error(body: dict) -> None:
    raise RewardServiceError(422, body, request_id="r-2")


@pytest.mark.parametrize("eps", [0, -1e-6, 2.0, float("nan")])
def test_advantage_eps_outside_the_services_range_is_refused_before_anything_is_sent(eps):
    service = FakeService()
    with service.client() as client, pytest.raises(ValueError, match="advantage_eps"):
        client.score_group("x", images(2), advantage_eps=eps)

    async def run_async() -> None:
        async with service.async_client() as aclient:
            with pytest.raises(ValueError, match="advantage_eps"):
                await aclient.score_group("x", images(2), advantage_eps=eps)

    asyncio.run(run_async())
    assert service.calls("/v1/score/group") == []


def test_the_tokenizer_names_special_tokens_in_any_case_that_would_break_its_cache_key():
    from textnorm_reward_client.clip_tokenizer import ClipTokenizer

    tok = ClipTokenizer(REPO_ROOT / "models" / "shapes-clip" / "tokenizer.json")
    exact = "three red triangles<|endoftext|> on grass"
    shouted = "three red triangles<|ENDOFTEXT|> on grass"
    # Why: equal normalised text (the cache key), different token ids (the special token is
    # matched in the raw text only: the exact one ends the prompt early).
    assert tok.normalise(exact) == tok.normalise(shouted)
    assert not np.array_equal(tok.encode([exact]).ids, tok.encode([shouted]).ids)
    assert tok.special_token_in(exact) == tok.special_token_in(shouted) == "<|endoftext|>"
    assert tok.special_token_in("a <|StartOfText|>") == "<|startoftext|>"
    assert tok.special_token_in("three red triangles on a grass background") is None
    assert tok.special_token_in("a <| endoftext |> look-alike") is None


def test_the_async_client_reads_its_inputs_when_the_call_is_made_not_when_awaited():
    import torch

    service = FakeService()
    batch = np.full((2, 8, 8, 3), 10, np.uint8)
    nhwc = torch.full((2, 8, 8, 3), 10, dtype=torch.uint8)
    tensor = nhwc.permute(0, 3, 1, 2)  # NCHW over channels-last memory: converting is a view

    async def run() -> list:
        async with service.async_client() as client:
            pending = [client.score(batch, "p"), client.score(tensor, "p")]
            batch[:] = 200  # the trainer reuses its buffers before awaiting
            nhwc.fill_(200)
            return await asyncio.gather(*pending)

    want = reward_of(np.full((8, 8, 3), 10, np.uint8))
    for result in asyncio.run(run()):
        assert np.allclose(result.rewards("raw"), want)


def test_async_calls_waiting_for_a_slot_are_not_timed_out_nor_their_url_benched():
    service = FakeService()
    ids = [f"call-{i}" for i in range(6)]
    service.delay_for = dict.fromkeys(ids, 0.2)  # 6 × 0.2 s through one slot: 1.2 s > timeout_s

    async def run(**kwargs) -> list:
        async with service.async_client(max_concurrency=1, timeout_s=0.5, **kwargs) as client:
            await client.limits()
            calls = [client.score(images(1), "p", request_id=i) for i in ids]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    assert not [r for r in results if isinstance(r, BaseException)]
    assert sorted(c[4] for c in service.calls("/v1/score")) == ids  # each sent once, no retry
    # With a deadline, the calls still waiting for the slot when it passes were never sent:
    # deadline_exceeded, not `unreachable` (which would bench a healthy URL).
    service.seen.clear()
    results = asyncio.run(run(deadline_s=0.5))
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed and {e.code for e in failed} == {"deadline_exceeded"}
    never_sent = [e for e in failed if e.attempts == 0]
    assert never_sent and len(service.calls("/v1/score")) == len(ids) - len(never_sent)


class _Trickle(httpx.SyncByteStream):
    """An answer that comes a byte every 0.1 s for 3 s: httpx's per-read timeout never fires."""

    def __iter__(self):
        for _ in range(30):
            time.sleep(0.1)
            yield b" "


def test_a_sync_attempt_trickling_past_its_limit_frees_its_thread_for_the_retry():
    service = FakeService()
    service.script["/v1/score"] = [httpx.Response(200, stream=_Trickle())]
    with service.client(max_concurrency=1, timeout_s=0.5) as client:
        result = client.score(images(1), "p")
    assert np.allclose(result.rewards("raw"), reward_of(images(1)[0]))
    first, retry = service.calls("/v1/score")
    assert retry[3] - first[3] < 1.5  # sent at the first one's limit, not after its 3 s


def test_a_sync_call_waiting_for_a_sender_past_its_deadline_was_never_sent():
    service = FakeService()
    service.delay_for = {"slow": 0.8}
    with service.client(max_concurrency=1) as client:
        client.limits()
        slow = threading.Thread(
            target=client.score, args=(images(1), "p"), kwargs={"request_id": "slow"}
        )
        slow.start()
        while not service.calls("/v1/score"):
            time.sleep(0.01)
        with pytest.raises(RewardServiceError) as caught:
            client.score(images(1), "p", request_id="waits", deadline_s=0.3)
        slow.join()
    assert caught.value.code == "deadline_exceeded" and caught.value.attempts == 0
    assert [c[4] for c in service.calls("/v1/score")] == ["slow"]


def test_the_grpc_backoff_never_sleeps_past_the_calls_deadline():
    from textnorm_reward_client.grpc_client import GrpcRewardClient, _service_error
    from tritonclient.utils import InferenceServerException

    tries = []

    class Down:  # a Triton that is always unavailable
        def infer(self, *args, client_timeout=None, **kwargs):
            tries.append(time.monotonic())
            raise InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")

    client = object.__new__(GrpcRewardClient)  # only what _infer reads
    client._channels = types.SimpleNamespace(next=Down)  # every turn: an unavailable Triton
    client.timeout_s, client.model, client.version = 60.0, "score", "1"
    client.retry = RetryPolicy(attempts=4, backoff_base_s=2.0, backoff_max_s=10.0)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        client._infer([], "rid", start + 1.0)
    assert time.monotonic() - start < 1.0 and len(tries) >= 1
    assert _service_error(caught.value, "rid").code == "deadline_exceeded"


# -- found by review 2026-12-07: deadline, failover, provenance, inputs, adapters ---------------
def test_a_split_calls_deadline_covers_waiting_for_the_clients_shared_threads():
    """Two chunked calls on one client share its threads: the one with a deadline ends at it,
    not when the slow call holding the threads finishes."""
    service = FakeService()
    service.delay_for = {"slow.0": 2.0, "slow.1": 2.0}
    with service.client(max_concurrency=1, max_items_per_request=1) as client:
        client.limits()
        slow = threading.Thread(target=client.score, args=(images(2), "x"),
                                kwargs={"request_id": "slow"})  # fmt: skip
        slow.start()
        time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(RewardServiceError) as raised:
            client.score(images(2), "x", request_id="quick", deadline_s=0.5)
        took = time.monotonic() - start
        slow.join()
    assert raised.value.code == "deadline_exceeded" and raised.value.request_id == "quick"
    assert took < 1.2, took  # the slow call held the threads for 2 s more
    assert "quick.0" not in service.answered  # queued behind it: never sent


def test_retry_after_rests_that_replica_and_the_retry_goes_to_another_at_once():
    """A 429 with Retry-After from one replica: the retry goes to the other now (no wait,
    within a 2 s deadline), and later calls skip the resting replica, for at most
    max_retry_after_s."""
    service = FakeService()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.test" and request.url.path == "/v1/score":
            service.seen.append(("http://a.test", "/v1/score", None, time.monotonic(), None))
            return error(429, headers={"Retry-After": "86400"})
        return service.handler(request)

    urls = ["http://a.test", "http://b.test"]
    transport = httpx.MockTransport(handler)
    start = time.monotonic()
    policy = RetryPolicy(attempts=4, backoff_base_s=0.001, backoff_max_s=0.002,
                         max_retry_after_s=5.0)  # fmt: skip
    with RewardClient(urls, transport=transport, retry=policy, deadline_s=2.0) as client:
        for _ in range(4):
            assert np.isfinite(client.score(images(1), "x").rewards("raw")).all()
        resting = client._core.endpoints._down["http://a.test"] - time.monotonic()
    assert time.monotonic() - start < 1.5
    assert 0 < resting <= 5.0  # a day's Retry-After benches it no longer than a wait would be
    used = [s[0] for s in service.calls("/v1/score")]
    assert used.count("http://a.test") == 1 and used.count("http://b.test") == 4
    # one replica alone: its Retry-After is still waited out (test_the_wait_honours_retry_after)


def _calibrated_answers(service: FakeService, per_chunk: list[dict]) -> None:
    """Chunk k's answer carries per_chunk[k]: its provenance.textnorm and each item's c
    (k from the chunk's request id `<id>.<k>`: chunks are sent at once, in any order)."""
    original = service.answer

    def answer(path, body):
        response = original(path, body)
        if path != "/v1/score":
            return response
        chosen = per_chunk[int(body["request_id"].rsplit(".", 1)[-1]) % len(per_chunk)]
        payload = response.json()
        payload["provenance"]["textnorm"] = dict(chosen["textnorm"])
        for r in payload["results"]:
            r["textnorm_scale"] = chosen["scale"]
            r["textnorm_scale_source"] = chosen["textnorm"]["scale_source"]
        return httpx.Response(200, json=payload)

    service.answer = answer


def test_chunks_scored_under_different_calibration_files_are_refused():
    service = FakeService()
    block = {"scale": 2.5, "scale_source": "calibrated", "calibration_sha256": "cal-v1"}
    _calibrated_answers(service, [
        {"textnorm": block, "scale": 2.5},
        {"textnorm": {**block, "calibration_sha256": "cal-v2", "scale": 5.0}, "scale": 5.0},
    ])  # fmt: skip
    with service.client() as client, pytest.raises(RewardServiceError) as raised:
        client.score(images(6), "x")
    assert raised.value.code == "mixed_provenance" and "cal-v2" in str(raised.value)


def test_a_split_calls_provenance_summarises_every_chunks_c_as_one_request_would():
    """Same calibration file, items of two kinds: chunk 0 at c = 2.5, chunk 1 at c = 5. The
    merged block says null / "mixed", as the gateway says for one request; not chunk 0's c."""
    service = FakeService()
    cal = {"calibration_sha256": "cal-v1"}
    _calibrated_answers(service, [
        {"textnorm": {"scale": 2.5, "scale_source": "calibrated", **cal}, "scale": 2.5},
        {"textnorm": {"scale": 5.0, "scale_source": "default", **cal}, "scale": 5.0},
    ])  # fmt: skip
    with service.client() as client:
        result = client.score(images(6), "x")
        textnorm = result.provenance["textnorm"]
        assert (textnorm["scale"], textnorm["scale_source"]) == (None, "mixed")
        assert [r.textnorm_scale for r in result.results] == [2.5] * 3 + [5.0] * 3
        _calibrated_answers(service, [  # every chunk alike: its value
            {"textnorm": {"scale": 2.5, "scale_source": "calibrated", **cal}, "scale": 2.5},
        ])  # fmt: skip
        same = client.score(images(6), "x").provenance["textnorm"]
    assert (same["scale"], same["scale_source"]) == (2.5, "calibrated")


def test_the_async_client_reads_files_when_the_call_is_made(tmp_path):
    """A trainer that writes sample_i.png every step and overwrites them before awaiting
    gets the rewards of the files as they were when it called."""
    service = FakeService()
    paths = [tmp_path / f"sample_{i}.png" for i in range(2)]

    def write(step: int) -> list[np.ndarray]:
        pixels = [np.full((8, 8, 3), 10 * step + i, np.uint8) for i in range(2)]
        for path, p in zip(paths, pixels, strict=True):
            Image.fromarray(p).save(path)
        return pixels

    async def run() -> np.ndarray:
        async with service.async_client() as client:
            await client.limits()
            first = write(step=1)
            pending = client.score(paths, "x")
            write(step=2)
            rewards = (await pending).rewards("raw")
        return rewards, first

    rewards, first = asyncio.run(run())
    assert np.allclose(rewards, [reward_of(p) for p in first])


@pytest.mark.parametrize("field", ["head", "textnorm"])
def test_the_adapters_raise_on_a_null_reward_instead_of_passing_nan(field):
    """`head` of an export without one (null for every item), or TextNorm of an item left
    without a contrastive set (allow_missing): never a NaN reward into the advantages."""
    service = FakeService()
    original = service.answer

    def answer(path, body):
        response = original(path, body)
        if path == "/v1/score":
            payload = response.json()
            payload["results"][1]["textnorm"] = None  # head is null everywhere already
            return httpx.Response(200, json=payload)
        return response

    service.answer = answer
    with service.client() as client:
        reward_fn = DdpoRewardFn(client, field=field)
        calls = [
            lambda: reward_fn(images(3), ["a", "b", "c"]),
            lambda: grpo_reward_fn(client, field=field)(["a", "b", "c"], images(3)),
        ]
        for call in calls:
            with pytest.raises(RewardServiceError) as raised:
                call()
            assert raised.value.code == "reward_missing"
            first = 0 if field == "head" else 1
            assert f"no {field!r} reward for" in str(raised.value)
            assert f"(first: item {first})" in str(raised.value)
        reward_fn.close()


def test_float_images_convert_exactly_and_nan_is_refused():
    """float16 in [0, 1] gives round(x × 255) exactly (computed in float32, not float16);
    NaN pixels are refused rather than sent as 0."""
    torch = pytest.importorskip("torch")
    from textnorm_reward_client.images import expand

    levels = np.arange(256) / 255
    half = np.repeat(levels.astype(np.float16)[:, None, None], 3, axis=2)[None]  # [1,256,1,3]
    exact = np.rint(half.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(expand(half)[0], exact[0])
    tensor = torch.from_numpy(half).permute(0, 3, 1, 2)
    assert np.array_equal(expand(tensor)[0], exact[0])
    for bad in (np.full((2, 2, 3), np.nan, np.float32), torch.full((3, 2, 2), float("nan"))):
        with pytest.raises(ValueError, match="NaN pixels"):
            expand(bad)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_undecodable_or_non_object_answer_is_a_reward_service_error(kind):
    """A corrupt gzip body is retried as a lost answer; a 200 whose JSON is not an object is
    `invalid_response`. Neither escapes as another exception type."""
    service = FakeService()

    def broken() -> httpx.Response:
        body = httpx.ByteStream(b"not gzip")  # read by the client, not here
        return httpx.Response(200, stream=body, headers={"content-encoding": "gzip"})

    def score_once():
        if kind == "sync":
            with service.client() as client:
                return client.score(images(1), "x")

        async def run():
            async with service.async_client() as client:
                return await client.score(images(1), "x")

        return asyncio.run(run())

    service.script["/v1/score"] = [broken() for _ in range(10)]
    with pytest.raises(RewardServiceError) as undecodable:
        score_once()
    assert undecodable.value.code == "unreachable" and undecodable.value.attempts == 4
    assert "could not be decoded" in str(undecodable.value)
    service.script["/v1/score"] = [httpx.Response(200, json=[1, 2, 3])]
    with pytest.raises(RewardServiceError) as listed:
        score_once()
    assert listed.value.code == "invalid_response" and "not a JSON object" in str(listed.value)


def test_the_grpc_client_cleans_a_contrastive_set_as_the_gateway_does():
    """Repeats by the case-folded prompt key first (so "Straße" repeats "STRASSE"), then by
    the tokenizer's key: the same set, so the same sha256 and calibrated c, on both paths."""
    from textnorm_reward_client.clip_tokenizer import ClipTokenizer
    from textnorm_reward_client.grpc_client import GrpcRewardClient

    from service.contrastive.prompt_sets import clean_contrastive_set

    tokenizer = ClipTokenizer(REPO_ROOT / "models" / "shapes-clip" / "tokenizer.json")
    grpc = object.__new__(GrpcRewardClient)  # only its tokenizer is needed to clean a set
    grpc.tokenizer = tokenizer
    prompt = "a red circle"
    sets = [
        ["a blue Straße sign", "a blue STRASSE sign", "a green square"],
        [" A  Red Circle ", "a red  circle!", "two red circles", "TWO red circles", ""],
    ]
    for candidates in sets:
        _, mask, kept = grpc._tokens(prompt, candidates)
        gateway, seen = [], {tokenizer.normalise(prompt)}
        for text in clean_contrastive_set(prompt, candidates):  # then Scorer.plan_texts
            if tokenizer.normalise(text) not in seen:
                seen.add(tokenizer.normalise(text))
                gateway.append(text)
        assert kept == gateway and int(mask.sum()) == len(kept) + 1
    assert grpc._tokens(prompt, sets[0])[2] == ["a blue Straße sign", "a green square"]
