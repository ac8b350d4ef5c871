"""schemathesis (every check but the EXCLUDED_CHECKS of run_schemathesis) on a live stack, ~50 s.

0 server errors and 0 schema violations: every status, header, content type and body the
gateway answers is the one its OpenAPI document declares. The full 3-minute run:
`make schemathesis` (tests/reliability/run_schemathesis.py).
"""

from __future__ import annotations

import pytest

from tests.reliability.run_schemathesis import run
from tests.serve_stack import API_KEY, EXPORT_SETTINGS, serve_stack

pytestmark = [pytest.mark.slow, pytest.mark.serial]

MAX_TIME_S = 50


def test_schemathesis_finds_nothing(tmp_path_factory, repositories):
    tmp = tmp_path_factory.mktemp("schemathesis")
    with serve_stack(tmp / "stack", repositories, **EXPORT_SETTINGS) as stack:
        result = run(stack, API_KEY, MAX_TIME_S, tmp / "report")
        assert stack.proc.poll() is None, "the stack died under schemathesis"
    output = result.stdout[-15000:] + result.stderr[-3000:]
    print(output[-3000:])
    assert "Server error" not in output, output
    assert result.returncode == 0, output
