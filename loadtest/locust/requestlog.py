"""Every request of a run as one CSV row: when it started, how long it took, which rank sent it
and at which trainer step. Locust's own CSVs aggregate per second; this log shows the bursts.

Rows are kept in memory and written when the test stops, to ``--request-log`` (a worker of a
distributed run appends ``.worker<index>`` to the name). Columns: :data:`COLUMNS`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.locust import options

COLUMNS = (
    "start_time",
    "response_time_ms",
    "request_type",
    "name",
    "images",
    "rank",
    "step",
    "step_time",
    "failure",
)
_rows: list[tuple[Any, ...]] = []


@events.request.add_listener
def _record(
    request_type: str,
    name: str,
    response_time: float,
    context: dict | None = None,
    exception: BaseException | None = None,
    start_time: float | None = None,
    **_: Any,
) -> None:
    context = context or {}
    _rows.append(
        (
            f"{start_time:.6f}" if start_time is not None else "",
            f"{response_time:.3f}",
            request_type,
            name,
            context.get("images", ""),
            context.get("rank", ""),
            "" if context.get("step") is None else context["step"],
            "" if context.get("step_time") is None else f"{context['step_time']:.6f}",
            "" if exception is None else str(exception).replace("\n", " ")[:300],
        )
    )


@events.test_stop.add_listener
def _write(environment: Environment, **_: Any) -> None:
    target = options.get(environment).request_log
    if not target or isinstance(environment.runner, MasterRunner):
        return  # a master sees no requests, only its workers' statistics
    path = Path(target)
    if isinstance(environment.runner, WorkerRunner):
        path = path.with_name(f"{path.name}.worker{environment.runner.worker_index}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(_rows)
    _rows.clear()
