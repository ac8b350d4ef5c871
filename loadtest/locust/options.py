"""The suite's command-line arguments; each also reads an env var (``LOCUST_<NAME>``).

Registered on import through ``events.init_command_line_parser``; :func:`get` reads them from an
environment, with the defaults when Locust is used as a library (no parsed options).
"""

from __future__ import annotations

import argparse
from typing import Any

from locust import events
from locust.env import Environment

from models import SHIPPED_MODEL_DIR

# name, type, default, help
ARGUMENTS: tuple[tuple[str, type, Any, str], ...] = (
    ("images-per-request", int, 8, "images per request (a rank's burst: B images, one prompt)"),
    ("rest-endpoint", str, "score", "REST user: 'score' (/v1/score) or 'group' (/v1/score/group)"),
    ("prompt-pool", int, 16, "distinct prompts, each with its own pre-rendered images"),
    ("image-size", int, 128, "side of the rendered shapes-world images, in pixels"),
    ("api-key", str, "", "Bearer key for the gateway (REWARD_API_KEYS of the service)"),
    ("triton-grpc", str, "", "gRPC user: Triton's KServe v2 gRPC endpoint HOST:PORT"),
    (
        "tokenizer",
        str,
        str(SHIPPED_MODEL_DIR / "tokenizer.json"),
        "gRPC user: tokenizer.json of the served repository",
    ),
    ("textnorm-scale", float, 5.0, "gRPC user: TextNorm scale c sent to the score model"),
    ("trainer-ranks", int, 4, "trainer shape: ranks (one Locust user each)"),
    ("trainer-step-s", float, 5.0, "trainer shape: step period (burst + sampling), seconds"),
    ("trainer-steps", int, 3, "trainer shape: steps before the run stops"),
    ("trainer-lead-s", float, 2.0, "trainer shape: time to spawn every rank before step 0"),
    ("request-log", str, "", "CSV of every request (start time, latency, rank, step)"),
)
REST_ENDPOINTS = {"score": "/v1/score", "group": "/v1/score/group"}


def env_var(name: str) -> str:
    return "LOCUST_" + name.upper().replace("-", "_")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    for name, kind, default, help_text in ARGUMENTS:
        extra = {"choices": sorted(REST_ENDPOINTS)} if name == "rest-endpoint" else {}
        parser.add_argument(
            f"--{name}",
            type=kind,
            default=default,
            env_var=env_var(name),
            help=help_text,
            is_secret=name == "api-key",
            **extra,
        )


def get(environment: Environment) -> argparse.Namespace:
    """Parsed options of `environment`, completed with the defaults of this suite."""
    values = {name.replace("-", "_"): default for name, _, default, _ in ARGUMENTS}
    if environment.parsed_options is not None:
        for key in values:
            if hasattr(environment.parsed_options, key):
                values[key] = getattr(environment.parsed_options, key)
    return argparse.Namespace(**values)
