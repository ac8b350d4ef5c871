"""Final totals in Locust's CSVs. Locust 2.47 rewrites ``*_stats.csv``, ``*_failures.csv`` and
``*_exceptions.csv`` once a second and not at exit, so a run's last second is missing from them
(locustio/locust#1806, #2299: the terminal summary and the HTML report have it). At exit, after
Locust has closed its files, this rewrites the three from the final statistics.
"""

from __future__ import annotations

import atexit
import csv
from typing import Any

from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV


def rewrite(environment: Environment, prefix: str) -> None:
    table = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("_stats.csv", table.requests_csv),
        ("_failures.csv", table.failures_csv),
        ("_exceptions.csv", table.exceptions_csv),
    ):
        with open(prefix + suffix, "w", newline="") as f:
            write(csv.writer(f))


@events.init.add_listener
def _at_exit(environment: Environment, **_: Any) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix and not isinstance(environment.runner, WorkerRunner):
        atexit.register(rewrite, environment, prefix)
