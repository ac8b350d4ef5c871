"""The `serve` supervisor notices a hung Triton, not only a dead one (issue 13, item 2).

One real stack (gateway + bundled tritonserver) with small supervision settings:
- SIGSTOP on tritonserver's PID: scoring answers 503/504 within the backend deadline (never
  hangs), the supervisor kills the stopped server after `triton_probe_failures` failed readiness
  probes and starts a new one; the same gateway process then scores the same numbers again;
- SIGKILL: restarted too, counted under the other cause;
- `/metrics` counts the restarts by cause.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import time

import pytest
from PIL import Image

from tests.serve_stack import (
    EXPORT_SETTINGS,
    client_for,
    metric_value,
    serve_stack,
    wait_until,
)
from tests.test_serving import _wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.serial]

BACKEND_TIMEOUT_S = 3.0
PROBE_INTERVAL_S = 0.5
PROBE_FAILURES = 2
SETTINGS = {
    "backend_timeout_s": str(BACKEND_TIMEOUT_S),
    "triton_probe_interval_s": str(PROBE_INTERVAL_S),
    "triton_probe_timeout_s": "0.5",
    "triton_probe_failures": str(PROBE_FAILURES),
    "triton_restart_backoff_s": "0.5",
    **EXPORT_SETTINGS,
}
PROMPT = "three red triangles on a grass background"
CONTRASTIVE = [
    "two red triangles on a grass background",
    "three blue triangles on a grass background",
]


def _image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 160, 40)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


ITEM = {"image": _image(), "prompt": PROMPT, "contrastive": CONTRASTIVE}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, repositories):
    with serve_stack(tmp_path_factory.mktemp("supervision"), repositories, **SETTINGS) as s:
        yield s


def _restarts(client, cause: str) -> float | None:
    return metric_value(
        client.get("/metrics").text, "reward_gateway_triton_restarts_total", cause=cause
    )


def test_hung_then_killed_triton_is_restarted(stack):
    with client_for(stack, timeout=4 * BACKEND_TIMEOUT_S) as client:
        before = client.post("/v1/score", json={"items": [ITEM]})
        assert before.status_code == 200, before.text
        reference = before.json()["results"][0]
        assert _restarts(client, "hung") == 0 and _restarts(client, "exited") == 0

        # -- hung: SIGSTOP the server process (its stubs keep running) ---------------------
        hung = stack.triton_pid()
        assert hung is not None
        stack.triton_pids.add(hung)
        stopped = time.monotonic()
        os.kill(hung, signal.SIGSTOP)
        try:
            r = client.post("/v1/score", json={"items": [ITEM]})
            answered = time.monotonic() - stopped
            assert r.status_code in (503, 504), r.text
            assert r.json()["error"]["code"], r.text
            assert answered < BACKEND_TIMEOUT_S + 2, f"answered after {answered:.1f} s"
            assert client.get("/healthz").status_code == 200  # the gateway itself never hangs

            def replaced() -> bool:
                pid = stack.triton_pid()
                return pid is not None and pid != hung

            wait_until(replaced, 30, "a new tritonserver after the hang")
        finally:  # never leave a stopped process behind, whatever failed
            if os.path.exists(f"/proc/{hung}"):
                os.kill(hung, signal.SIGCONT)
        assert _wait_gone(hung, 10), "the hung tritonserver (or its stubs) is still there"
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "ready after the hang")
        recovered = time.monotonic() - stopped
        after = client.post("/v1/score", json={"items": [ITEM]})
        assert after.status_code == 200, after.text
        for name in ("raw", "textnorm"):
            assert abs(after.json()["results"][0][name] - reference[name]) <= 1e-6
        # the watchdog logs and counts the restart once its own readiness poll sees the new
        # server, which may be after the gateway's /readyz did: wait for the count
        wait_until(lambda: _restarts(client, "hung") == 1, 30, "the hung restart counted")
        output = stack.output(20000)
        assert "is hung" in output and "cause: hung" in output, output
        assert _restarts(client, "hung") == 1 and _restarts(client, "exited") == 0

        # -- exited: SIGKILL the server and its group ---------------------------------------
        dead = stack.triton_pid()
        assert dead is not None
        stack.triton_pids.add(dead)
        os.killpg(dead, signal.SIGKILL)
        wait_until(lambda: _restarts(client, "exited") == 1, 60, "restart after SIGKILL")
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "ready after SIGKILL")
        again = client.post("/v1/score", json={"items": [ITEM]})
        assert again.status_code == 200, again.text
        assert abs(again.json()["results"][0]["raw"] - reference["raw"]) <= 1e-6
        assert _restarts(client, "hung") == 1
        assert stack.output(200000).count("Started server process") == 1  # one gateway throughout
        print(
            f"SIGSTOP: error answer after {answered:.2f} s, scoring again after {recovered:.1f} s"
        )


def test_a_dead_python_backend_stub_is_a_503_then_a_restart(stack):
    """Triton keeps answering ready when a model's stub process dies, and fails every call to
    that model: the gateway answers 503 with Retry-After (a retry can succeed once Triton is
    restarted, not a 502), and the watchdog, counting the stubs, restarts it."""
    import psutil

    with client_for(stack, timeout=4 * BACKEND_TIMEOUT_S) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "ready")
        before = client.post("/v1/score", json={"items": [ITEM]})
        assert before.status_code == 200, before.text
        triton = stack.triton_pid()
        assert triton is not None
        stack.triton_pids.add(triton)
        stubs = {
            p.cmdline()[1].split("/")[-3]: p
            for p in psutil.Process(triton).children(recursive=True)
            if p.name() == "triton_python_backend_stub"
        }
        assert "image_encoder" in stubs, stubs  # every request calls it (prompts are cached)
        stubs["image_encoder"].kill()
        r = client.post("/v1/score", json={"items": [ITEM]})
        if r.status_code != 200:  # unless the watchdog was faster than this request
            assert r.status_code == 503 and r.headers["retry-after"], r.text
        wait_until(lambda: _restarts(client, "stub_died") == 1, 30, "a restart for the stub")
        assert stack.triton_pid() != triton
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "ready after it")
        after = client.post("/v1/score", json={"items": [ITEM]})
        assert after.status_code == 200, after.text
        assert abs(after.json()["results"][0]["raw"] - before.json()["results"][0]["raw"]) <= 1e-6
        assert "missing a healthy Python-backend stub" in stack.output(200000)

        # A stopped stub keeps its process: before, it was counted alive, and every score was
        # a 503 indefinitely with /readyz at 200 and no restart.
        triton = stack.triton_pid()
        stack.triton_pids.add(triton)
        stopped = next(
            p
            for p in psutil.Process(triton).children(recursive=True)
            if p.name() == "triton_python_backend_stub" and "image_encoder" in p.cmdline()[1]
        )
        stopped.suspend()
        wait_until(
            lambda: _restarts(client, "stub_died") == 2, 30, "a restart for the stopped stub"
        )
        assert not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "ready after it")
        assert client.post("/v1/score", json={"items": [ITEM]}).status_code == 200
