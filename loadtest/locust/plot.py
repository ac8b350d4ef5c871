"""The PNG of a Locust run: requests/s and p50/p95 latency over time, from Locust's
``*_stats_history.csv`` (its "Aggregated" rows, one a second), plus, when a request log is given,
every request as a point (start time × latency), where trainer bursts show as columns.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global backend, headless (Agg) by default


def read_requests(path: Path) -> list[dict[str, str]]:
    """The rows of a request log (``requestlog``); this module never imports Locust."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "N/A" before the first response
        return math.nan


def history(path: Path) -> tuple[float, dict[str, list[float]]]:
    """(Unix time of the first Aggregated row, its columns: t (s from t0), users, rps, fps, p50,
    p95)."""
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Name"] == "Aggregated"]
    t0 = float(rows[0]["Timestamp"]) if rows else 0.0

    def latency(column: str) -> list[float]:  # 0 (or N/A) until a response is in the window
        return [_number(row[column]) or math.nan for row in rows]

    return t0, {
        "t": [float(row["Timestamp"]) - t0 for row in rows],
        "users": [_number(row["User Count"]) for row in rows],
        "rps": [_number(row["Requests/s"]) for row in rows],
        "fps": [_number(row["Failures/s"]) for row in rows],
        "p50": latency("50%"),
        "p95": latency("95%"),
    }


def plot_run(history_csv: Path, out_png: Path, title: str, request_log: Path | None = None) -> Path:
    t0, data = history(history_csv)
    requests = read_requests(request_log) if request_log and request_log.is_file() else []
    panels = 3 if requests else 2
    fig = Figure(figsize=(9, 2.6 * panels + 0.6))
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(data["t"], data["rps"], label="requests/s", color="tab:blue")
    ax.plot(data["t"], data["fps"], label="failures/s", color="tab:red")
    ax.set_ylabel("per second")
    users = ax.twinx()
    users.step(data["t"], data["users"], where="post", color="tab:gray", alpha=0.5)
    users.set_ylabel("users", color="tab:gray")
    ax.legend(loc="upper left")
    ax.set_title(title)
    ax = axes[1]
    ax.plot(data["t"], data["p50"], label="p50", color="tab:green")
    ax.plot(data["t"], data["p95"], label="p95", color="tab:orange")
    ax.set_ylabel("latency, ms (last 10 s)")
    ax.legend(loc="upper left")
    if requests:
        ax = axes[2]
        ok = [r for r in requests if not r["failure"]]
        bad = [r for r in requests if r["failure"]]
        for rows, colour, label in ((ok, "tab:blue", "request"), (bad, "tab:red", "failure")):
            if rows:
                x = [float(r["start_time"]) - t0 for r in rows]
                y = [float(r["response_time_ms"]) for r in rows]
                ax.scatter(x, y, s=8, c=colour, label=label)
        for t in sorted({float(r["step_time"]) for r in requests if r["step_time"]}):
            ax.axvline(t - t0, color="tab:gray", lw=0.8, ls=":")
        ax.set_ylabel("latency, ms (each request)")
        ax.legend(loc="upper left")
    axes[-1].set_xlabel("seconds since the first statistics row")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
