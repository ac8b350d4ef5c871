"""A real `reward-service serve` stack (gateway + bundled Triton) per test module.

It reuses the launcher helpers of tests/test_serving.py; the export is shared across modules
through one session-wide repositories folder (the export is content-addressed, so the second
stack starts without exporting again).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from loadtest.processes import children
from service.triton_server import free_ports
from tests.conftest import REPO_ROOT
from tests.test_serving import (
    _TRITON_LINE,
    Stack,
    _kill_group,
    _serve_env,
    _stop,
    _wait_ready,
)

# The settings every reliability stack exports with (CLIP rewards only: a smaller, faster export).
EXPORT_SETTINGS = {"head": ""}
API_KEY = "test-key"  # the key tests/test_serving.py's _serve_env configures
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@contextlib.contextmanager
def serve_stack(tmp: Path, repositories: Path, **settings: str) -> Iterator[Stack]:
    """`serve` on free loopback ports with `REWARD_<NAME>=value` settings; stopped by SIGTERM,
    and nothing may outlive it."""
    gateway_port, *triton_ports = free_ports(4)
    env = _serve_env(tmp, gateway_port, triton_ports)
    env["REWARD_REPOSITORIES_DIR"] = str(repositories)
    env.update({f"REWARD_{k.upper()}": v for k, v in settings.items()})
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        _wait_ready(proc, url, log_path)
        found = _TRITON_LINE.search(log_path.read_text())
        assert found, f"no `triton: gRPC ...` line:\n{log_path.read_text()[-4000:]}"
        stack = Stack(proc, url, found.group(1), Path(found.group(3)), log_path, set())
        assert stack.triton_pid() == int(found.group(2))
    except BaseException:
        for pid in [*children(proc.pid), proc.pid]:
            _kill_group(pid)
        proc.wait()
        raise
    try:
        yield stack
    finally:
        problems = _stop(stack)
        assert not problems, "\n".join(problems) + "\n" + stack.output()


def client_for(stack: Stack, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers=AUTH, trust_env=False, timeout=timeout)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.M)
    return float(found.group(1)) if found else None


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> float:
    """Seconds until `predicate()` holds; AssertionError naming `what` after `timeout`."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - began
