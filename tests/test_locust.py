"""Smoke of the Locust suite (`loadtest/locust`, issue 10): one `python -m loadtest.run_locust
--start-stack` run, as `make loadtest` does but shorter, against the real stack it starts and stops
(`reward-service serve`, Bearer key on): the REST user and the Triton gRPC user closed loop for a
few seconds each, then the trainer shape for two short steps. From the files it writes:

- both users scored (requests > 0) with no failure, under their own request types and names;
- Locust's HTML report and the PNG plot exist for every scenario;
- the trainer shape bursts: each step is exactly one request per rank, all started within a few
  tens of milliseconds after that step's boundary, boundaries one period apart — and the request
  log agrees with Locust's own count;
- the runner stopped the stack (its tritonserver is gone) and exits 1 when requests fail.

This process never imports Locust (it monkey-patches with gevent on import): Locust runs in the
runner's subprocesses.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.triton_server import pid_alive
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.serial]

IMAGES = 4
RANKS, STEP_S, STEPS = 3, 2.0, 2
BURST_WINDOW_S = 0.25  # every rank's request starts within this after the step boundary
CLOSED_LOOP = {"rest": ("POST", "/v1/score [4 img]"), "grpc": ("grpc", "score [4 img]")}
SCENARIOS = (*CLOSED_LOOP, "trainer-rest")


def _runner(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.run_locust", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _aggregated(folder: Path) -> dict[str, str]:
    (row,) = [r for r in _rows(folder / "locust_stats.csv") if r["Name"] == "Aggregated"]
    return row


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("locust")
    args = ["--start-stack", "--out", str(out), "-u", "2", "-t", "3", "--images", str(IMAGES)]
    args += ["--ranks", str(RANKS), "--step-s", str(STEP_S), "--steps", str(STEPS)]
    args += ["--lead-s", "1.5", *(f"--scenario={name}" for name in SCENARIOS)]
    run = _runner(*args, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def test_every_scenario_writes_csv_html_and_png(results: Path) -> None:
    for name in SCENARIOS:
        folder = results / name
        for csv_name in ("stats", "stats_history", "failures", "exceptions"):
            assert (folder / f"locust_{csv_name}.csv").is_file(), (name, csv_name)
        assert "<html" in (folder / "report.html").read_text().lower(), name
        png = (folder / "plot.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    assert (results / "summary.md").read_text().count("| yes |") == len(SCENARIOS)
    import json

    (trainer,) = [r for r in json.loads((results / "summary.json").read_text())
                  if r["scenario"] == "trainer-rest"]  # fmt: skip
    assert trainer["missed_bursts"] == 0 and trainer["ok"]


def test_a_trainer_run_that_skipped_bursts_is_not_ok() -> None:
    # A rank still waiting for its answer skips the step; the run said "ok" regardless, while
    # the README promises N ranks bursting at every step.
    from loadtest.run_locust import missed_bursts

    per_step = {"0": {"ranks": 4}, "1": {"ranks": 3}}  # step 1: one rank late; step 2: none
    assert missed_bursts(per_step, ranks=4, steps=3) == 1 + 4
    assert missed_bursts({str(s): {"ranks": 4} for s in range(3)}, ranks=4, steps=3) == 0


@pytest.mark.parametrize("name", CLOSED_LOOP)
def test_users_score_without_failures(results: Path, name: str) -> None:
    folder = results / name
    total = _aggregated(folder)
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    assert _rows(folder / "locust_failures.csv") == []
    request_type, request_name = CLOSED_LOOP[name]
    (entry,) = [r for r in _rows(folder / "locust_stats.csv") if r["Name"] != "Aggregated"]
    assert (entry["Type"], entry["Name"]) == (request_type, request_name)
    # the CSV holds the final totals (Locust alone would miss the run's last second)
    assert int(entry["Request Count"]) == len(_rows(folder / "requests.csv"))


def test_trainer_shape_bursts_at_step_boundaries(results: Path) -> None:
    folder = results / "trainer-rest"
    log = _rows(folder / "requests.csv")
    assert int(_aggregated(folder)["Request Count"]) == len(log) == RANKS * STEPS
    assert all(not row["failure"] for row in log)
    boundaries = []
    for step in range(STEPS):
        burst = [row for row in log if row["step"] == str(step)]
        assert sorted(row["rank"] for row in burst) == [str(rank) for rank in range(RANKS)]
        assert all(int(row["images"]) == IMAGES for row in burst)
        (boundary,) = {float(row["step_time"]) for row in burst}
        lags = [float(row["start_time"]) - boundary for row in burst]
        assert all(-0.005 <= lag <= BURST_WINDOW_S for lag in lags), (step, lags)
        boundaries.append(boundary)
    assert boundaries[1] - boundaries[0] == pytest.approx(STEP_S, abs=1e-3)
    # Locust's own per-second history holds the RANKS users
    history = [r for r in _rows(folder / "locust_stats_history.csv") if r["Name"] == "Aggregated"]
    assert max(int(r["User Count"]) for r in history) == RANKS


def test_the_runner_stopped_the_stack(results: Path) -> None:
    found = re.search(r"triton: gRPC \S+ .*\(pid (\d+),", (results / "serve.log").read_text())
    assert found, "no tritonserver line in serve.log"
    assert not pid_alive(int(found.group(1)))


def test_failed_requests_make_the_runner_exit_1(tmp_path: Path) -> None:
    # nothing listens on port 9 (discard): every request fails
    args = ["--url", "http://127.0.0.1:9", "--out", str(tmp_path), "--scenario", "rest"]
    run = _runner(*args, "-u", "1", "-t", "1", "--images", "1", "--prompt-pool", "1", timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "rest: FAILED" in run.stdout
    assert int(_aggregated(tmp_path / "rest")["Failure Count"]) > 0
