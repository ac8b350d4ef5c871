"""Admission control, backpressure, timeouts and idempotent retries of the gateway (issue 13).

Two kinds of tests, both with real components:
- a real gateway app under uvicorn on loopback (in a thread of this process), on the real
  ONNX backend, which a thin wrapper can hold at a gate (so a request stays in flight for as
  long as the test needs) — the budgets, 429 + Retry-After (from Content-Length, before the
  body is read), health under load, bounded backend calls, idempotency;
- the production pair, end to end: `reward-service gateway` in its own process against the
  session's real tritonserver — a burst of 4× the in-flight capacity (429s with Retry-After,
  no 5xx, every accepted answer right, the gateway's RSS recorded), /healthz and /readyz
  answering while scoring requests are in flight, and a SIGSTOPped Triton giving 504 within the
  deadline, never a hang, then scoring again once it runs.
No timing is asserted beyond "answered before X finished" and deadlines far above the normal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from service.gateway import BackendUnavailable, create_app
from service.gateway.metrics import REFUSAL_CAUSES
from service.gateway.onnx_backend import OnnxBackend
from service.gateway.provenance import load_provenance
from service.settings import Settings
from service.triton_server import free_ports
from shapes_world.scene import Group, Scene
from tests.conftest import REPO_ROOT, assert_error
from tests.test_gateway import SHORT_SET, TRUE_PROMPT, RecordingBackend, b64, gateway, world_image

pytestmark = pytest.mark.serial

pytest_plugins = ("tests.conftest_triton",)


@pytest.fixture(scope="module")
def provenance(triton_repo) -> dict:
    return load_provenance(triton_repo)


@pytest.fixture(scope="module")
def onnx_backend(triton_repo) -> OnnxBackend:
    return OnnxBackend(triton_repo, intra_op_threads=1)


def raw(pixels: np.ndarray) -> dict:
    data = base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode()
    return {"shape": list(pixels.shape), "dtype": "uint8", "data": data}


def item(image, prompt: str = TRUE_PROMPT) -> dict:
    return {"image": image, "prompt": prompt, "contrastive": SHORT_SET}


IMAGE = b64(world_image())


class GatedBackend(RecordingBackend):
    """The real backend, but image encoding waits until the test opens the gate."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.entered = threading.Event()

    async def encode_images(self, images):
        self.entered.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.005)
        return await super().encode_images(images)


class Serving:
    def __init__(self, url: str, app) -> None:
        self.url = url
        self.state = app.state.gateway

    def in_use(self, budget: str) -> int:
        return self.state.admission.in_use[budget]

    def metric(self, name: str, labels: dict | None = None) -> float:
        value = self.state.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@contextlib.contextmanager
def serving(provenance, backend, **overrides) -> Iterator[Serving]:
    """The gateway app under a real uvicorn on a free loopback port, in a thread."""
    app = create_app(Settings(**overrides), backend, provenance)
    (port,) = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Serving(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(15)


def post(url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, trust_env=False, **kwargs)


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def assert_overloaded(r: httpx.Response, cause: str, retry_after: int) -> dict:
    body = assert_error(r, 429, "overloaded")
    assert r.headers["retry-after"] == str(retry_after)
    assert body["error"]["details"][0]["cause"] == cause, body
    assert isinstance(body["error"]["limit"], int)
    return body


# -- the budgets -----------------------------------------------------------------------------------
def test_requests_in_flight_429_at_once_and_health_answers_meanwhile(provenance, onnx_backend):
    reference = post_reference(provenance, onnx_backend)
    backend = GatedBackend(onnx_backend)
    with serving(provenance, backend, max_requests_in_flight=2, overload_retry_after_s=3) as gw:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, gw.url, "/v1/score", {"items": [item(IMAGE)]})]
            held.append(pool.submit(post, gw.url, "/v1/score", {"items": [item(IMAGE)]}))
            wait_for(lambda: gw.in_use("requests") == 2, "two requests in flight")
            refused = post(gw.url, "/v1/score", {"items": [item(IMAGE)]})
            assert_overloaded(refused, "requests_in_flight", 3)
            group = {
                "prompt": TRUE_PROMPT,
                "images": [IMAGE],
                "textnorm": {"contrastive": SHORT_SET},
            }
            assert_overloaded(post(gw.url, "/v1/score/group", group), "requests_in_flight", 3)
            # the event loop is free: health, readiness, metrics and models answer meanwhile
            for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
                r = httpx.get(gw.url + path, timeout=10, trust_env=False)
                assert r.status_code == 200, (path, r.text)
            assert not any(f.done() for f in held), "the held requests finished early"
            text = httpx.get(gw.url + "/metrics", timeout=10, trust_env=False).text
            assert 'reward_gateway_admission_in_use{limit="requests"} 2.0' in text
            assert 'reward_gateway_refusals_total{cause="requests_in_flight"} 2.0' in text
            for budget in ("requests", "body_bytes", "images", "decoded_bytes", "backend_calls"):
                assert f'reward_gateway_admission_limit{{limit="{budget}"}}' in text, budget
                assert f'reward_gateway_admission_in_use{{limit="{budget}"}}' in text, budget
            for cause in REFUSAL_CAUSES:  # every cause is exported, at 0 until it happens
                assert f'reward_gateway_refusals_total{{cause="{cause}"}}' in text, cause
            backend.gate.set()
            answers = [f.result() for f in held]
        for r in answers:
            assert r.status_code == 200, r.text
            assert abs(r.json()["results"][0]["textnorm"] - reference) < 1e-6
        wait_for(lambda: gw.in_use("requests") == 0, "the budget released")
        assert all(gw.in_use(b) == 0 for b in ("body_bytes", "images", "decoded_bytes"))
        assert post(gw.url, "/v1/score", {"items": [item(IMAGE)]}).status_code == 200


def post_reference(provenance, backend) -> float:
    with gateway(provenance, backend) as c:
        r = c.post("/v1/score", json={"items": [item(IMAGE)]})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["textnorm"]


def _stall_after_headers(url: str, path: str, length: int) -> socket.socket:
    """A client that sends a POST's headers announcing `length` bytes, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def _read_answer(sock: socket.socket) -> bytes:
    """The raw answer on `sock`, up to the end of its headers at least."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed without an answer"
        data += chunk
    return data


def _send_headers_only(url: str, length: int) -> tuple[int, dict[str, str]]:
    """POST /v1/score announcing `length` body bytes and sending none: the status and headers
    of the answer (which can only come before the body is read)."""
    with _stall_after_headers(url, "/v1/score", length) as sock:
        data = _read_answer(sock)
    head = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), {k.lower(): v for k, v in headers.items()}


def test_body_bytes_refused_from_content_length_before_the_body_is_read(provenance, onnx_backend):
    backend = GatedBackend(onnx_backend)
    limits = {"max_request_bytes": 400_000, "max_body_bytes_in_flight": 400_000}
    with serving(provenance, backend, **limits) as gw:
        big = raw(np.full((280, 280, 3), 128, np.uint8))  # ~314 kB of base64
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(post, gw.url, "/v1/score", {"items": [item(big)]})
            wait_for(backend.entered.is_set, "the large request in the backend")
            assert gw.in_use("body_bytes") > 300_000
            status, headers = _send_headers_only(gw.url, 200_000)
            assert status == 429 and headers["retry-after"] == "1"
            # without Content-Length (chunked), the bytes are counted as they stream in
            chunks = (b'{"items": [' + b" " * 50_000 for _ in range(4))
            streamed = httpx.post(gw.url + "/v1/score", content=chunks, timeout=30, trust_env=False)
            assert_overloaded(streamed, "body_bytes_in_flight", 1)
            # a small body still fits: admitted beside the large one
            small = pool.submit(post, gw.url, "/v1/score", {"items": [item(IMAGE)]})
            wait_for(lambda: gw.in_use("requests") == 2, "the small request admitted")
            backend.gate.set()
            assert held.result().status_code == 200
            assert small.result().status_code == 200, small.result().text
        assert gw.metric("reward_gateway_refusals_total", {"cause": "body_bytes_in_flight"}) == 2
        wait_for(lambda: gw.in_use("body_bytes") == 0, "the body budget released")


def test_images_and_decoded_bytes_budgets(provenance, onnx_backend):
    backend = GatedBackend(onnx_backend)
    one = raw(np.asarray(world_image(size=96)))  # 96 × 96 × 3 = 27,648 decoded bytes
    limits = {
        "max_items_per_request": 4,
        "max_images_in_flight": 4,
        "max_request_pixels": 2 * 96 * 96,
        "max_decoded_bytes_in_flight": 1,  # raised to what one request may hold: 3 × 2 × 96²
    }
    with serving(provenance, backend, **limits) as gw:
        assert gw.state.admission.limits["decoded_bytes"] == 3 * 2 * 96 * 96
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(post, gw.url, "/v1/score", {"items": [item(one)]})
            wait_for(backend.entered.is_set, "a request in the backend")
            assert gw.in_use("images") == 1 and gw.in_use("decoded_bytes") == 96 * 96 * 3
            four = {"items": [item(IMAGE)] * 4}
            assert_overloaded(post(gw.url, "/v1/score", four), "images_in_flight", 1)
            two = {"items": [item(one), item(one)]}
            assert_overloaded(post(gw.url, "/v1/score", two), "decoded_bytes_in_flight", 1)
            assert gw.in_use("decoded_bytes") == 96 * 96 * 3  # the refused one gave its back
            backend.gate.set()
            assert held.result().status_code == 200
        wait_for(lambda: gw.in_use("images") == 0, "the image budget released")
        answer = post(gw.url, "/v1/score", two)
        assert answer.status_code == 200, answer.text
        assert gw.in_use("decoded_bytes") == 0 and gw.in_use("images") == 0


class ConcurrencyBackend(RecordingBackend):
    """The real backend, each inference call held 50 ms; records the most calls at once."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.now = self.most = 0

    @contextlib.asynccontextmanager
    async def _held(self):
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.05)
            yield
        finally:
            self.now -= 1

    async def encode_images(self, images):
        async with self._held():
            return await super().encode_images(images)

    async def encode_texts(self, ids):
        async with self._held():
            return await super().encode_texts(ids)

    async def rewards(self, *args):
        async with self._held():
            return await super().rewards(*args)


def test_backend_calls_bounded_per_request_and_overall(provenance, onnx_backend):
    sizes = (64, 80, 96)  # one encode call per size, sent concurrently unless bounded
    mixed = {"items": [item(b64(world_image(size=s))) for s in sizes]}
    with gateway(provenance, onnx_backend) as c:
        reference = [x["textnorm"] for x in c.post("/v1/score", json=mixed).json()["results"]]
    unbounded = ConcurrencyBackend(onnx_backend)
    with gateway(provenance, unbounded) as c:
        assert c.post("/v1/score", json=mixed).status_code == 200
    assert unbounded.most >= 3  # the three sizes and the text encode overlap
    backend = ConcurrencyBackend(onnx_backend)
    limits = {"max_backend_calls": 2, "max_backend_calls_per_request": 1}
    with serving(provenance, backend, **limits) as gw:
        r = post(gw.url, "/v1/score", mixed)
        assert r.status_code == 200 and backend.most == 1  # one request: one call at a time
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(gw.url, "/v1/score", mixed), range(4)))
        assert backend.most == 2  # four requests: never more than the overall bound
        for answer in [r, *answers]:
            assert answer.status_code == 200, answer.text
            got = [x["textnorm"] for x in answer.json()["results"]]
            assert np.allclose(got, reference, atol=1e-6)
        assert gw.metric("reward_gateway_admission_limit", {"limit": "backend_calls"}) == 2


# -- idempotency -----------------------------------------------------------------------------------
class FlakyBackend(RecordingBackend):
    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.down = False

    async def encode_images(self, images):
        if self.down:
            raise BackendUnavailable("image_encoder: connection refused")
        return await super().encode_images(images)


def test_retried_request_id_gets_the_same_result_and_a_reused_one_409(provenance, onnx_backend):
    backend = FlakyBackend(onnx_backend)
    body = {"items": [item(IMAGE)], "request_id": "step-1"}
    with gateway(provenance, backend, idempotency_cache_entries=2) as c:
        first = c.post("/v1/score", json=body)
        assert first.status_code == 200, first.text
        calls = len(backend.image_shapes)
        again = c.post("/v1/score", json=body)
        assert again.status_code == 200 and again.json() == first.json()
        assert len(backend.image_shapes) == calls  # answered from the cache, not recomputed
        assert (
            c.app_state.metrics.registry.get_sample_value("reward_gateway_idempotent_replays_total")
            == 1
        )
        result = first.json()["results"][0]
        assert result["export_sha256"] == provenance["export_sha256"]
        assert result["export_sha256"] == first.json()["provenance"]["export_sha256"]
        assert result["contrastive_sha256"]
        other = {**body, "items": [item(IMAGE, "two blue circles on a sand background")]}
        conflict = c.post("/v1/score", json=other)
        assert_error(conflict, 409, "request_id_conflict", "request_id")
        assert conflict.json()["request_id"] == "step-1"
        # the X-Request-ID header is a client id too
        headers = {"X-Request-ID": "hdr-1"}
        plain = {"items": [item(IMAGE)]}
        assert c.post("/v1/score", json=plain, headers=headers).status_code == 200
        assert_error(
            c.post("/v1/score", json=other | {"request_id": None}, headers=headers),
            409,
            "request_id_conflict",
            "request_id",
        )
        # an error is not a result: the retry of a 503 is scored
        backend.down = True
        retry = {"items": [item(IMAGE)], "request_id": "step-2"}
        assert_error(c.post("/v1/score", json=retry), 503, "backend_unavailable")
        backend.down = False
        assert c.post("/v1/score", json=retry).status_code == 200
        # bounded: two entries kept, the oldest ("step-1"'s, then "hdr-1"'s) forgotten
        assert len(c.app_state.idempotency) == 2
        assert c.post("/v1/score", json=other).status_code == 200
        registry = c.app_state.metrics.registry
        conflicts = {"cause": "request_id_conflict"}
        assert registry.get_sample_value("reward_gateway_refusals_total", conflicts) == 2


def test_concurrent_duplicates_are_scored_once(provenance, onnx_backend):
    backend = GatedBackend(onnx_backend)
    body = {"items": [item(IMAGE)], "request_id": "dup-1"}
    with serving(provenance, backend) as gw:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(post, gw.url, "/v1/score", body) for _ in range(2)]
            wait_for(lambda: gw.in_use("requests") == 2, "both in flight")
            backend.gate.set()
            first, second = (f.result() for f in futures)
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json()
        assert len(backend.image_shapes) == 1


# -- end to end: `reward-service gateway` against a real tritonserver -----------------------------
CAPACITY = 4  # max_requests_in_flight of the gateway process


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.fixture(scope="module")
def gateway_process(triton_server, triton_repo, tmp_path_factory):
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("gateway-process") / "gateway.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "REWARD_MAX_REQUESTS_IN_FLIGHT": str(CAPACITY),
        "REWARD_BACKEND_TIMEOUT_S": "2",
        "REWARD_OVERLOAD_RETRY_AFTER_S": "1",
        "REWARD_IDENTITY_CHECK_INTERVAL_S": "1",
    }
    cmd = [sys.executable, "-m", "service.cli", "gateway", "--triton-url", triton_server.grpc_url]
    cmd += ["--repository", str(triton_repo), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=5, trust_env=False).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, proc, triton_server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _metric_value(url: str, sample: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_burst_of_4x_capacity_gets_429s_no_5xx_and_right_answers(gateway_process):
    url, proc, _ = gateway_process
    scenes = [Scene(groups=(Group(n, "red", "triangle"),), background="grass") for n in (1, 2, 3)]
    images = [b64(world_image(scenes[i % 3], seed=i, size=224)) for i in range(16)]
    body = {"items": [item(image) for image in images]}
    reference = post(url, "/v1/score", body)
    assert reference.status_code == 200, reference.text
    expected = [x["textnorm"] for x in reference.json()["results"]]
    before = _rss_kib(proc.pid)
    start = threading.Barrier(4 * CAPACITY + 1)
    finished: list[float] = []

    def one(_: int) -> httpx.Response:
        start.wait()
        r = post(url, "/v1/score", body)
        finished.append(time.monotonic())
        return r

    with ThreadPoolExecutor(4 * CAPACITY) as pool:
        futures = [pool.submit(one, i) for i in range(4 * CAPACITY)]
        start.wait()
        # while scoring requests are in flight, /healthz and /readyz answer
        in_flight = 0.0
        deadline = time.monotonic() + 30
        while in_flight < 1 and time.monotonic() < deadline:
            in_flight = _metric_value(url, 'reward_gateway_admission_in_use{limit="requests"}')
        assert in_flight >= 1, "no scoring request seen in flight"
        t0 = time.monotonic()
        health = httpx.get(url + "/healthz", timeout=10, trust_env=False)
        t1 = time.monotonic()
        ready = httpx.get(url + "/readyz", timeout=10, trust_env=False)
        health_at = time.monotonic()
        answers = [f.result() for f in futures]
    assert health.status_code == 200 and ready.status_code == 200, ready.text
    assert health_at < max(finished), "health answered only after every scoring request"
    after = _rss_kib(proc.pid)
    statuses = [r.status_code for r in answers]
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in answers if r.status_code == 429]
    accepted = [r for r in answers if r.status_code == 200]
    assert refused and accepted, statuses
    for r in refused:
        assert_overloaded(r, "requests_in_flight", 1)
    for r in accepted:
        got = [x["textnorm"] for x in r.json()["results"]]
        assert np.allclose(got, expected, atol=1e-6)
    # the gateway's memory under the burst: far below what unbounded admission could reach
    # (16 requests × (body + decoded pixels)); the bound stated in the README
    peak_mib = after["VmHWM"] / 1024
    print(
        f"\nburst: {len(accepted)} × 200, {len(refused)} × 429; /healthz "
        f"{(t1 - t0) * 1000:.0f} ms, /readyz {(health_at - t1) * 1000:.0f} ms; gateway RSS "
        f"{before['VmRSS'] / 1024:.0f} MiB before, {after['VmRSS'] / 1024:.0f} MiB after, "
        f"peak {peak_mib:.0f} MiB"
    )
    assert peak_mib < 1024, f"gateway peak RSS {peak_mib:.0f} MiB"


def test_sigstopped_triton_gives_504_within_the_deadline_then_recovers(gateway_process):
    url, proc, triton = gateway_process
    body = {"items": [item(IMAGE)]}
    good = post(url, "/v1/score", body)
    assert good.status_code == 200, good.text
    os.kill(triton.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = httpx.post(url + "/v1/score", json=body, timeout=30, trust_env=False)
        took = time.monotonic() - start
        assert r.status_code == 504, r.text  # timeout 2 s: answered, not hung
        assert_error(r, 504, "backend_timeout")
        assert r.headers["retry-after"]
        assert took < 20, took
        assert httpx.get(url + "/healthz", timeout=10, trust_env=False).status_code == 200
        assert httpx.get(url + "/readyz", timeout=20, trust_env=False).status_code == 503
    finally:
        os.kill(triton.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while True:
        again = post(url, "/v1/score", body)
        if again.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert again.status_code == 200, again.text
    assert (
        abs(again.json()["results"][0]["textnorm"] - good.json()["results"][0]["textnorm"]) < 1e-6
    )
    assert _metric_value(url, 'reward_gateway_refusals_total{cause="backend_timeout"}') >= 1


def test_after_a_failed_owner_only_one_waiter_scores_anew_and_the_rest_wait_for_it():
    """A failure under overload must not multiply the work: 1 owner fails, 3 waiters → 1 more."""
    from service.gateway.idempotency import IdempotencyCache
    from service.gateway.metrics import GatewayMetrics

    cache = IdempotencyCache(16, GatewayMetrics())
    computes = []

    async def compute():
        computes.append(len(computes))
        await asyncio.sleep(0.05)
        if len(computes) == 1:
            raise RuntimeError("backend timeout")
        return {"rewards": [0.25]}

    async def run_all():
        owner = asyncio.ensure_future(cache.run("/v1/score", "rid", "sha", compute))
        await asyncio.sleep(0.01)
        waiters = [
            asyncio.ensure_future(cache.run("/v1/score", "rid", "sha", compute)) for _ in range(3)
        ]
        return await asyncio.gather(owner, *waiters, return_exceptions=True)

    outcomes = asyncio.run(run_all())
    assert isinstance(outcomes[0], RuntimeError)
    assert outcomes[1:] == [{"rewards": [0.25]}] * 3
    assert len(computes) == 2


def test_a_ticket_takes_nothing_once_released():
    """A decoding thread that reserves after its request ended must not leak the budget."""
    from service.gateway.admission import Admission, RequestFinished
    from service.gateway.metrics import GatewayMetrics

    budgets = {"requests": 4, "body_bytes": 100, "images": 10, "decoded_bytes": 1000}
    admission = Admission(budgets, GatewayMetrics(), retry_after_s=1)
    ticket = admission.admit(body_bytes=10)
    ticket.reserve("decoded_bytes", 300)
    ticket.release()
    with pytest.raises(RequestFinished):
        ticket.reserve("decoded_bytes", 300)
    assert admission.in_use == dict.fromkeys(budgets, 0)


def test_a_stalled_upload_gets_408_and_gives_back_what_it_reserved(provenance, onnx_backend):
    settings = {
        "body_read_timeout_s": 1.0,
        "max_request_bytes": 1_000_000,
        "max_body_bytes_in_flight": 1_000_000,
    }
    with serving(provenance, onnx_backend, **settings) as gw:
        sock = _stall_after_headers(gw.url, "/v1/score", 999_990)
        with sock:
            wait_for(lambda: gw.in_use("body_bytes") == 999_990, "the stalled body reserved")
            refused = post(gw.url, "/v1/score", {"items": [item(IMAGE)]})  # no room meanwhile
            assert_overloaded(refused, "body_bytes_in_flight", 1)
            answer = _read_answer(sock)
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.split()[1] == b"408", head
        assert b'"body_timeout"' in body and b'"field":"body"' in body
        wait_for(lambda: gw.in_use("body_bytes") == 0 and gw.in_use("requests") == 0, "release")
        assert post(gw.url, "/v1/score", {"items": [item(IMAGE)]}).status_code == 200


def test_prompt_set_uploads_share_the_admission_budgets(provenance, onnx_backend):
    with serving(provenance, onnx_backend, max_requests_in_flight=1) as gw:
        with _stall_after_headers(gw.url, "/v1/prompt-sets/import", 1000):
            wait_for(lambda: gw.in_use("requests") == 1, "the import admitted")
            for path, body in (
                ("/v1/prompt-sets/import", {TRUE_PROMPT: SHORT_SET}),
                ("/v1/prompt-sets", {"prompt": TRUE_PROMPT, "contrastive": SHORT_SET}),
                ("/v1/score", {"items": [item(IMAGE)]}),
            ):
                assert_overloaded(post(gw.url, path, body), "requests_in_flight", 1)
        wait_for(lambda: gw.in_use("requests") == 0, "the slot released at the disconnect")
        created = post(gw.url, "/v1/prompt-sets", {"prompt": TRUE_PROMPT, "contrastive": SHORT_SET})
        assert created.status_code == 201, created.text


def test_without_keys_a_new_bearer_token_per_request_shares_the_one_bucket(
    provenance, onnx_backend
):
    limits = {"rate_limit_per_key_rps": 0.01, "rate_limit_burst": 2}
    with gateway(provenance, onnx_backend, **limits) as c:
        statuses = [
            c.get("/v1/models", headers={"Authorization": f"Bearer random-{i}"}).status_code
            for i in range(4)
        ]
    assert statuses == [200, 200, 429, 429]


def test_request_ids_are_scoped_per_api_key(provenance, onnx_backend):
    keys = {"api_keys": ["key-a", "key-b"]}
    body = {"items": [item(IMAGE)], "request_id": "step-1-0"}
    other = {"items": [item(IMAGE, "a blue square")], "request_id": "step-1-0"}
    with gateway(provenance, onnx_backend, **keys) as c:
        b = c.post("/v1/score", json=other, headers={"Authorization": "Bearer key-b"})
        a = c.post("/v1/score", json=body, headers={"Authorization": "Bearer key-a"})
        again_b = c.post("/v1/score", json=body, headers={"Authorization": "Bearer key-b"})
    assert b.status_code == 200 and a.status_code == 200, (b.text, a.text)
    assert again_b.status_code == 409  # within one key, a re-used id is still a conflict


def test_a_waiter_gets_its_owners_answer_even_when_evicted_meanwhile():
    from service.gateway.idempotency import IdempotencyCache
    from service.gateway.metrics import GatewayMetrics

    cache = IdempotencyCache(1, GatewayMetrics())  # room for one answer
    runs = {"X": 0}

    async def run_all():
        go = asyncio.Event()

        async def compute_x():
            runs["X"] += 1
            n = runs["X"]
            await go.wait()
            return f"answer #{n} for X"

        async def compute_y():
            await go.wait()
            return "answer for Y"

        owner = asyncio.ensure_future(cache.run("/v1/score", "X", "sha", compute_x))
        await asyncio.sleep(0)
        retry = asyncio.ensure_future(cache.run("/v1/score", "X", "sha", compute_x))
        other = asyncio.ensure_future(cache.run("/v1/score", "Y", "sha-y", compute_y))
        await asyncio.sleep(0.01)
        go.set()  # X and Y finish together: Y's answer evicts X's before the retry wakes
        return await asyncio.gather(owner, retry, other)

    first, retried, _ = asyncio.run(run_all())
    assert retried == first == "answer #1 for X" and runs["X"] == 1


def test_a_trickled_upload_is_cut_at_the_whole_body_deadline(provenance, onnx_backend):
    """A byte every 0.3 s never stalls for body_read_timeout_s (1 s), and held its admission
    slot for as long as it liked; the whole body must now arrive within body_total_timeout_s."""
    settings = {"body_read_timeout_s": 1.0, "body_total_timeout_s": 2.0}
    with serving(provenance, onnx_backend, **settings) as gw:
        sock = _stall_after_headers(gw.url, "/v1/score", 1000)
        start = time.monotonic()
        with sock:
            wait_for(lambda: gw.in_use("requests") == 1, "the trickled upload admitted")
            sock.settimeout(0.3)
            answer = b""
            while b"\r\n\r\n" not in answer and time.monotonic() - start < 10:
                sock.sendall(b" ")
                with contextlib.suppress(TimeoutError):
                    answer += sock.recv(65536)
        took = time.monotonic() - start
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.split()[1] == b"408", head
        assert b"not all received within 2 s" in body
        assert 1.9 < took < 5, took
        wait_for(lambda: gw.in_use("requests") == 0, "the slot released")
