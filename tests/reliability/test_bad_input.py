"""The bad-input corpus (tests/reliability/corpus.py, > 100 cases) against a real stack.

Every case gets a 4xx JSON error in the gateway's one shape, naming the offending field (and
the limit, where there is one) — or, for inputs the README documents as accepted (CMYK,
16-bit, palette, alpha, animated first frame, trailing bytes, EXIF orientation not applied…),
the documented behaviour. After each case the service is still up and a good request scores
exactly the reference computed before the corpus ran. At the end, the stack's log (uvicorn's
access log on) holds neither the API key nor any image data.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from tests.reliability.corpus import (
    GOOD,
    STACK_SETTINGS,
    Case,
    b64,
    build_cases,
    item,
    raw_item,
    score,
)
from tests.serve_stack import API_KEY, AUTH, EXPORT_SETTINGS, client_for, serve_stack

pytestmark = pytest.mark.slow

CASES = build_cases()
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def stack(tmp_path_factory, repositories):
    settings = {**EXPORT_SETTINGS, **STACK_SETTINGS}
    with serve_stack(tmp_path_factory.mktemp("bad-input"), repositories, **settings) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    with client_for(stack) as c:
        yield c


@pytest.fixture(scope="module")
def reference(client) -> dict:
    r = client.post("/v1/score", json=score(item()))
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def scores_of(client: httpx.Client, image: str) -> dict:
    r = client.post("/v1/score", json=score(item(image)))
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def raw_request(url: str, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request written by hand (headers httpx would not send as given)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def send(client: httpx.Client, stack, case: Case) -> httpx.Response:
    headers = {"Content-Type": "application/json", **case.headers}
    if case.raw is None:
        if case.body is None:
            return client.request(case.method, case.path)
        return client.request(case.method, case.path, json=case.body)
    body = case.raw.replace(b"ITEM", raw_item())
    if "Content-Length" in case.headers:  # a header value httpx would replace
        head = (
            f"{case.method} {case.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {case.headers['Content-Length']}"
            "\r\nConnection: close\r\n\r\n"
        ).encode()
        status, content = raw_request(stack.url, head, body)
        return httpx.Response(status, content=content, headers={"content-type": "application/json"})
    if case.chunked:

        def chunks():
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        return client.request(case.method, case.path, content=chunks(), headers=headers)
    return client.request(case.method, case.path, content=body, headers=headers)


def check_error(case: Case, r: httpx.Response) -> None:
    """The gateway's error shape: the code, the field (also in the message), the limit."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert error["message"] and r.json()["request_id"], r.text
    if case.code is not None:
        assert error["code"] == case.code, (case.name, error)
    if case.field is not None:
        assert error["field"] == case.field, (case.name, error)
        if case.field != "body":
            assert case.field in error["message"], (case.name, error)
    limit = error.get("limit")
    if isinstance(limit, int | float) and not isinstance(limit, bool):
        assert f"{limit:g}" in error["message"] or str(limit) in error["message"], error


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, client, stack, reference):
    r = send(client, stack, case)
    if case.status == 200:
        assert r.status_code == 200, f"{case.name}: documented as accepted, got {r.text[:300]}"
        got = r.json()["results"][0]
        assert -1 <= got["raw"] <= 1 and 0 <= got["textnorm"] <= 1
        if case.equals is not None:
            want = scores_of(client, b64(case.equals))
            for name in ("raw", "textnorm"):
                assert abs(got[name] - want[name]) <= TOLERANCE, (case.name, name, got, want)
    else:
        allowed = case.status if isinstance(case.status, tuple) else (case.status,)
        assert 400 <= r.status_code < 500, f"{case.name}: {r.status_code} {r.text[:300]}"
        assert r.status_code in allowed, f"{case.name}: {r.status_code} {r.text[:300]}"
        if not case.http_layer:
            check_error(case, r)
    # The service is up, and a good request right after still scores the reference exactly.
    after = scores_of(client, GOOD)
    for name in ("raw", "textnorm"):
        assert abs(after[name] - reference[name]) <= TOLERANCE, (case.name, name)


def test_corpus_size_and_logs_clean(client, stack):
    assert len(CASES) >= 50
    assert len({c.name for c in CASES}) == len(CASES)
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    log = stack.output(50_000_000)
    assert "POST /v1/score" in log, "the access log is on: requests must appear (paths only)"
    assert API_KEY not in log, "the API key appears in the log"
    for marker in (GOOD[:48], GOOD[-48:]):
        assert marker not in log, "image data appears in the log"
    assert AUTH["Authorization"] not in log
