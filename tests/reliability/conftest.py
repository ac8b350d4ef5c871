"""Fixtures of the reliability suite: one export shared by every stack and in-process app."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.launcher import ensure_repository
from service.settings import Settings
from tests.serve_stack import EXPORT_SETTINGS


@pytest.fixture(scope="session")
def repositories(tmp_path_factory) -> Path:
    """One repositories folder for every reliability stack: `serve` exports into it once."""
    return tmp_path_factory.mktemp("reliability-repositories")


@pytest.fixture(scope="session")
def exported_repo(repositories) -> Path:
    """The repository `serve` uses for EXPORT_SETTINGS (exported here first if needed)."""
    return ensure_repository(
        Settings(repositories_dir=str(repositories), **EXPORT_SETTINGS)  # type: ignore[arg-type]
    )
