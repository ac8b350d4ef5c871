"""Shared test helpers."""

import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import SHIPPED_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `reward-service ARGS...` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def shipped_model() -> str:
    assert (SHIPPED_MODEL_DIR / "model.safetensors").is_file(), "the shipped model is missing"
    return str(SHIPPED_MODEL_DIR)


def assert_error(response, status: int, code: str, field: str | None = None, limit=None) -> dict:
    """The gateway's error shape: status, code, echoed request id, the field and the limit."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    if field is not None:
        assert body["error"]["field"] == field, body
        assert field in body["error"]["message"], body
    if limit is not None:
        assert body["error"]["limit"] == limit, body
    return body
