"""Shared test helpers."""

import subprocess
import sys

import pytest

from service.settings import SHIPPED_MODEL_DIR


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
