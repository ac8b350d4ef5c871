"""What every `reward-service` command module shares: one-line user errors, AUROC tables.

Torch-free: the torch side's command modules (`export/commands.py`, `evaluation/commands.py`)
import it as the runtime's CLI does, so no module needs another's commands.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

F = TypeVar("F", bound=Callable)

# A command of the torch side run where the `export` extra is not installed (the gateway image).
_EXTRA_OF = {"torch": "export", "transformers": "export", "onnx": "export", "tensorrt": "gpu"}


def user_errors(fn: F) -> F:
    """Turn domain errors (ValueError and subclasses, missing files, a missing extra) into
    one-line exits with status 2, and a reward-service call the client gave up on into one
    line: status 2 when the service refused the request (a 4xx other than 408/429: a bad key
    or bad input, the caller's to fix), 1 when it failed (unreachable, deadline, 5xx, 408/429
    after the retries)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as exc:
            extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            typer.echo(
                f"error: this command needs {exc.name}, which is not installed: "
                f"pip install 'textnorm-reward-service[{extra}]'",
                err=True,
            )
            raise typer.Exit(2) from None
        except Exception as exc:
            if not _is_reward_service_error(exc):
                raise
            refused = _refused(exc.status)
            what = "refused the request" if refused else "failed"
            typer.echo(f"error: the reward service {what}: {exc}", err=True)
            raise typer.Exit(2 if refused else 1) from None

    return wrapper  # type: ignore[return-value]


def integer_list(text: str, option: str, *, minimum: int | None = None) -> list[int]:
    """A comma-separated option value as integers, blank parts skipped (`--seeds 0,1,2`)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"{option}: give at least one integer")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if minimum is not None and min(values) < minimum:
        raise ValueError(f"{option}: values must be at least {minimum}, got {text!r}")
    return values


def _refused(status: int | None) -> bool:
    """An answer that says the request itself is wrong (retrying it would not help)."""
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _is_reward_service_error(exc: Exception) -> bool:
    """A `textnorm_reward_client.RewardServiceError` (a call the client gave up on), looked up
    without importing the client: if it was never imported, nothing raised one."""
    errors = sys.modules.get("textnorm_reward_client.errors")
    return errors is not None and isinstance(exc, errors.RewardServiceError)


def print_auroc_report(report: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    categories = list(next(iter(report.values())))
    table = Table(title="mean per-prompt AUROC (held-out shapes-world benchmark)")
    table.add_column("reward")
    for cat in categories:
        table.add_column(cat, justify="right")
    for name, row in report.items():
        table.add_row(name, *(f"{row[c]:.3f}" for c in categories))
    Console(file=sys.stdout).print(table)
