"""Session fixtures for tests against a real `tritonserver` (the one bundled with nvidia-pytriton).

Load them in a test module with `pytest_plugins = ("tests.conftest_triton",)`.
The repository is exported once per session through the CLI, in a subprocess, so the test
process stays torch-free.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import get_settings
from service.triton_server import TritonServer, group_alive, pid_alive
from tests.conftest import run_cli


def export_model() -> Path:
    shipped = Path(get_settings().model)
    assert (shipped / "model.safetensors").is_file(), f"the shipped model is missing: {shipped}"
    return shipped


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory) -> Path:
    """A CPU Triton repository (CLIP rewards only, max batch 16), exported once per session."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    args = ("export", "--model", str(export_model()), "--no-head", "--out", str(out))
    result = run_cli(*args, "--max-batch", "16", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="session")
def triton_server(triton_repo, tmp_path_factory):
    """A running tritonserver on loopback; stopped by PID at the end, with nothing left behind."""
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(triton_repo, log_file=log, startup_timeout=90, stop_timeout=20)
    server.start()
    try:
        yield server
    finally:
        pid = server.pid
        server.stop()
        if pid is not None:
            assert not pid_alive(pid), f"tritonserver {pid} still running"
            assert not group_alive(pid), f"processes left in tritonserver's group {pid}"
