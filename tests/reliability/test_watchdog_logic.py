"""The supervisor's decisions, on a scripted stand-in for the server (fast; the real
tritonserver under SIGSTOP/SIGKILL is tests/reliability/test_supervision.py)."""

from __future__ import annotations

import threading
import time

import pytest

from service.launcher import TritonWatchdog
from service.settings import Settings

pytestmark = pytest.mark.serial


class ScriptedServer:
    """Answers `running()`/`is_ready()`/`python_stubs()` from flags; `start()` fails
    `fail_starts` times, and a started server has `stubs_at_start` stubs."""

    def __init__(self, fail_starts: int = 0, stubs: int | None = None) -> None:
        self.alive, self.ready, self.fail_starts = True, True, fail_starts
        self.stubs = self.stubs_at_start = stubs
        self.starts: list[float] = []
        self.kills = 0
        self.pid = 1
        self.lock = threading.Lock()

    def running(self) -> bool:
        return self.alive

    def is_ready(self, timeout: float) -> bool:
        return self.alive and self.ready

    def python_stubs(self) -> int | None:
        return self.stubs if self.alive else None

    def kill(self) -> None:
        self.kills += 1
        self.alive = False

    def start(self) -> None:
        self.starts.append(time.monotonic())
        if len(self.starts) <= self.fail_starts:
            raise RuntimeError("tritonserver exited with code 1 during startup\nlog tail")
        self.alive, self.ready = True, True
        self.stubs = self.stubs_at_start
        self.pid += 1

    def stop(self) -> None:
        self.alive = False


def _watch(server, **kw) -> tuple[TritonWatchdog, list[str]]:
    causes: list[str] = []

    def hook(cause: str) -> None:
        causes.append(cause)
        raise ValueError("a broken metrics hook must not stop the supervision")

    dog = TritonWatchdog(server, interval_s=0.02, on_restart=hook, **kw)
    dog.start()
    return dog, causes


def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


def test_hang_needs_n_consecutive_failed_probes_then_kill_and_restart():
    server = ScriptedServer()
    dog, causes = _watch(server, failures_before_restart=3, backoff_s=0.02)
    try:
        server.ready = False
        _until(lambda: causes == ["hung"])
        assert server.kills == 1
        assert dog.restarts_by_cause == {"exited": 0, "hung": 1, "stub_died": 0}
        server.alive = False  # then it dies: the other cause
        _until(lambda: causes == ["hung", "exited"])
        assert server.kills == 1  # nothing to kill when it already exited
    finally:
        dog.stop()
    assert dog.restarts == 2 and not server.alive  # stop() stops the server too


def test_a_ready_server_that_lost_a_python_backend_stub_is_restarted():
    server = ScriptedServer(stubs=3)
    dog, causes = _watch(server, backoff_s=0.02)
    try:
        _until(lambda: dog.stubs == 3)  # seen while healthy
        server.stubs = 2  # one model instance died; Triton still answers ready
        _until(lambda: causes == ["stub_died"])
        assert server.kills == 1 and len(server.starts) == 1
        _until(lambda: dog.stubs == 3)  # the new server's stubs, counted afresh
        time.sleep(0.2)
        assert causes == ["stub_died"]  # and no restart while they all live
    finally:
        dog.stop()


def test_a_stub_triton_calls_not_healthy_n_times_in_the_window_is_a_restart(monkeypatch):
    # A stuck stub (alive, not stopped) keeps its process: only Triton's answers say so. Before,
    # every score was a 503 indefinitely while the stub count, /readyz and the probe said fine.
    from service import launcher

    server = ScriptedServer(stubs=3)
    dog, causes = _watch(server, failures_before_restart=3, backoff_s=0.02)
    try:
        _until(lambda: dog.stubs == 3)
        dog.report_unhealthy_stub()
        dog.report_unhealthy_stub()
        time.sleep(0.2)  # two answers: not yet (one flaky check must not cost a restart)
        assert causes == [] and server.kills == 0
        dog.report_unhealthy_stub()
        _until(lambda: causes == ["stub_died"])
        assert server.kills == 1
        time.sleep(0.2)
        assert causes == ["stub_died"]  # the old server's answers do not count against the new
        monkeypatch.setattr(launcher, "STUB_REPORT_WINDOW_S", 0.05)
        for _ in range(3):  # spread over more than the window: no restart
            dog.report_unhealthy_stub()
            time.sleep(0.1)
        time.sleep(0.1)
        assert causes == ["stub_died"]
    finally:
        dog.stop()


def test_without_a_stub_count_only_exits_and_hangs_restart():
    server = ScriptedServer(stubs=None)  # no psutil, or a server without Python models
    dog, causes = _watch(server, backoff_s=0.02)
    try:
        time.sleep(0.2)
        assert causes == [] and dog.stubs is None and server.kills == 0
    finally:
        dog.stop()


def test_a_probe_that_recovers_resets_the_count():
    server = ScriptedServer()
    dog, causes = _watch(server, failures_before_restart=1000, backoff_s=0.02)
    try:
        server.ready = False
        _until(lambda: dog.failed_probes >= 3)
        server.ready = True
        _until(lambda: dog.failed_probes == 0)
        assert causes == [] and server.kills == 0
    finally:
        dog.stop()


def test_failed_restarts_back_off_doubling_up_to_the_maximum():
    server = ScriptedServer(fail_starts=4)
    dog, causes = _watch(server, backoff_s=0.05, max_backoff_s=0.2)
    try:
        server.alive = False
        _until(lambda: causes == ["exited"], timeout=10)
    finally:
        dog.stop()
    assert len(server.starts) == 5 and dog.restarts_by_cause["exited"] == 1
    assert dog.restart_waits == [0.05, 0.1, 0.2, 0.2]  # doubling, capped at the maximum
    gaps = [b - a for a, b in zip(server.starts, server.starts[1:], strict=False)]
    assert all(gap >= wait * 0.9 for gap, wait in zip(gaps, dog.restart_waits, strict=True))


def test_settings_configure_the_supervisor():
    settings = Settings(
        triton_probe_interval_s=0.7,
        triton_probe_timeout_s=0.3,
        triton_probe_failures=5,
        triton_restart_backoff_s=2,
        triton_restart_backoff_max_s=9,
    )
    dog = TritonWatchdog.from_settings(ScriptedServer(), settings)
    assert (dog.interval_s, dog.probe_timeout_s, dog.failures_before_restart) == (0.7, 0.3, 5)
    assert (dog.backoff_s, dog.max_backoff_s) == (2, 9)


def test_a_dead_stubs_error_is_a_503_not_a_502():
    """Triton's message for a call to a model whose stub died: worth a retry once Triton is
    restarted (BackendUnavailable, 503 with Retry-After), not a BackendError (502)."""
    from tritonclient.utils import InferenceServerException

    from service.gateway.backend import BackendError, BackendUnavailable
    from service.gateway.triton_backend import _translate

    dead = InferenceServerException(
        "[StatusCode.INTERNAL] Stub process 'image_encoder_0_0' is not healthy.",
        status="StatusCode.INTERNAL",
    )
    assert isinstance(_translate(dead, "image_encoder inference"), BackendUnavailable)
    other = InferenceServerException("shape mismatch", status="StatusCode.INTERNAL")
    assert type(_translate(other, "image_encoder inference")) is BackendError
