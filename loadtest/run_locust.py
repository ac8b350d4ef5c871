"""`python -m loadtest.run_locust`: the Locust suite (``loadtest/locust``) headless, per scenario.

    python -m loadtest.run_locust --start-stack --out loadtest-results
    python -m loadtest.run_locust --url http://127.0.0.1:8000 --triton-grpc 127.0.0.1:8001 \
        --tokenizer REPO/tokenizer.json --scenario rest --scenario trainer-grpc --out results

Scenarios (one Locust subprocess each, in order): ``rest`` and ``grpc`` — ``--users`` closed-loop
users for ``--run-time`` seconds; ``trainer-rest`` and ``trainer-grpc`` — the trainer shape
(``--ranks`` ranks × ``--images`` images every ``--step-s`` seconds, ``--steps`` steps).
``--start-stack`` starts ``reward-service serve`` (``--model`` or ``--repository``: what it
serves) on free loopback ports with a fresh API key (``loadtest.serving.Stack``), takes the gRPC
user's tokenizer from its repository, and stops it at the end (also on SIGTERM). Against
``--url``, gRPC scenarios need ``--triton-grpc`` and, for another model than the shipped one,
``--tokenizer``.

Per scenario, ``OUT/<scenario>/`` gets Locust's ``locust_stats.csv``, ``locust_stats_history.csv``,
``locust_failures.csv``, ``locust_exceptions.csv``, ``report.html``, the request log
``requests.csv``, ``plot.png`` and ``locust.log``; ``OUT/summary.json`` and ``OUT/summary.md``
sum them up. Exit status 1 when a scenario had a failure, sent no request or Locust failed;
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.locust import plot  # Locust itself only runs in the subprocesses (gevent)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUST_DIR = Path(__file__).resolve().parent / "locust"
LOCUSTFILE = LOCUST_DIR / "locustfile.py"
SHAPEFILE = LOCUST_DIR / "shapes.py"
GRACE_S = 90  # a Locust subprocess's time to start and stop, beyond its planned duration


@dataclass(frozen=True)
class Scenario:
    user_class: str
    trainer: bool
    grpc: bool


SCENARIOS = {
    "rest": Scenario("RestScoreUser", trainer=False, grpc=False),
    "grpc": Scenario("TritonGrpcUser", trainer=False, grpc=True),
    "trainer-rest": Scenario("RestScoreUser", trainer=True, grpc=False),
    "trainer-grpc": Scenario("TritonGrpcUser", trainer=True, grpc=True),
}
DEFAULT_SCENARIOS = ("rest", "grpc", "trainer-rest")


@dataclass(frozen=True)
class Target:
    url: str
    triton_grpc: str | None
    tokenizer: Path | None
    api_key: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run_locust",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the gateway's base URL")
    where.add_argument("--start-stack", action="store_true", help="start (and stop) the stack")
    p.add_argument("--model", help="--start-stack: serve this checkpoint (exported if needed)")
    p.add_argument("--repository", type=Path, help="--start-stack: serve this export as is")
    p.add_argument("--triton-grpc", help="Triton gRPC HOST:PORT (--start-stack: the stack's)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json of the served repository")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LOCUST_API_KEY", ""),
        help="gateway Bearer key (env LOCUST_API_KEY; --start-stack: a fresh one)",
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help=f"repeatable; default: {' '.join(DEFAULT_SCENARIOS)}",
    )
    p.add_argument("--out", type=Path, default=Path("loadtest-results"))
    p.add_argument("-u", "--users", type=int, default=4, help="closed-loop users")
    p.add_argument("-r", "--spawn-rate", type=float, help="users/s (default: all in 1 s)")
    p.add_argument("-t", "--run-time", type=int, default=20, help="seconds per scenario")
    p.add_argument("--images", type=int, default=8, help="images per request (a rank's burst)")
    p.add_argument("--rest-endpoint", choices=("score", "group"), default="score")
    p.add_argument("--prompt-pool", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--ranks", type=int, default=4, help="trainer ranks")
    p.add_argument("--step-s", type=float, default=5.0, help="trainer step period, seconds")
    p.add_argument("--steps", type=int, default=3, help="trainer steps")
    p.add_argument("--lead-s", type=float, default=2.0, help="spawn time before step 0")
    args = p.parse_args(argv)
    args.scenario = args.scenario or list(DEFAULT_SCENARIOS)
    if min(args.users, args.images, args.ranks, args.steps, args.prompt_pool) < 1:
        p.error("--users, --images, --ranks, --steps and --prompt-pool must be ≥ 1")
    if min(args.run_time, args.step_s, args.lead_s) <= 0:
        p.error("--run-time, --step-s and --lead-s must be > 0")
    if (args.model or args.repository) and not args.start_stack:
        p.error("--model and --repository go with --start-stack")
    needs_grpc = any(SCENARIOS[name].grpc for name in args.scenario)
    if needs_grpc and args.url and not args.triton_grpc:
        p.error("gRPC scenarios against --url need --triton-grpc HOST:PORT")
    return args


def locust_command(name: str, args: argparse.Namespace, target: Target, folder: Path) -> list[str]:
    scenario = SCENARIOS[name]
    files = f"{LOCUSTFILE},{SHAPEFILE}" if scenario.trainer else str(LOCUSTFILE)
    cmd = [
        sys.executable, "-m", "locust", "-f", files, "--headless", "--only-summary",
        "--host", target.url,
        "--csv", str(folder / "locust"), "--csv-full-history",
        "--html", str(folder / "report.html"),
        "--stop-timeout", "30", "--exit-code-on-error", "1",
        "--images-per-request", str(args.images), "--rest-endpoint", args.rest_endpoint,
        "--prompt-pool", str(args.prompt_pool), "--image-size", str(args.image_size),
        "--request-log", str(folder / "requests.csv"),
    ]  # fmt: skip
    if scenario.grpc:
        cmd += ["--triton-grpc", str(target.triton_grpc)]
        if target.tokenizer is not None:
            cmd += ["--tokenizer", str(target.tokenizer)]
    if scenario.trainer:
        cmd += [
            "--trainer-ranks", str(args.ranks), "--trainer-step-s", str(args.step_s),
            "--trainer-steps", str(args.steps), "--trainer-lead-s", str(args.lead_s),
        ]  # fmt: skip
    else:
        rate = args.spawn_rate or float(args.users)
        cmd += ["-u", str(args.users), "-r", str(rate), "-t", f"{args.run_time}s"]
    return [*cmd, scenario.user_class]


def planned_seconds(name: str, args: argparse.Namespace) -> float:
    if SCENARIOS[name].trainer:
        return args.lead_s + args.steps * args.step_s
    return args.run_time


def aggregated(stats_csv: Path) -> dict[str, float]:
    """The Aggregated row of Locust's ``*_stats.csv`` (zeros when there is none)."""
    keys = {
        "requests": "Request Count",
        "failures": "Failure Count",
        "rps": "Requests/s",
        "p50_ms": "50%",
        "p95_ms": "95%",
        "p99_ms": "99%",
        "mean_ms": "Average Response Time",
    }
    rows = []
    if stats_csv.is_file():
        with stats_csv.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if row["Name"] == "Aggregated"]
    out = dict.fromkeys(keys, 0.0)
    for key, column in keys.items():
        if rows and rows[0].get(column) not in (None, "", "N/A"):
            out[key] = float(rows[0][column])
    return out


def missed_bursts(per_step: dict[str, Any], ranks: int, steps: int) -> int:
    """Ranks × steps that sent no burst: a rank still waiting on its last answer skips the
    step (it cannot start the next one early), as a trainer that fell behind would."""
    return sum(max(ranks - per_step.get(str(s), {}).get("ranks", 0), 0) for s in range(steps))


def bursts(request_log: Path) -> dict[str, Any]:
    """Per trainer step of the request log: requests, ranks, start spread and lag (ms)."""
    rows = (
        [r for r in plot.read_requests(request_log) if r["step"]] if request_log.is_file() else []
    )
    per_step: dict[str, Any] = {}
    for step in sorted({int(r["step"]) for r in rows}):
        group = [r for r in rows if int(r["step"]) == step]
        starts = [float(r["start_time"]) for r in group]
        boundary = float(group[0]["step_time"])
        per_step[str(step)] = {
            "requests": len(group),
            "ranks": len({r["rank"] for r in group}),
            "spread_ms": round((max(starts) - min(starts)) * 1000, 1),
            "lag_ms": round((max(starts) - boundary) * 1000, 1),
        }
    return per_step


def run_scenario(name: str, args: argparse.Namespace, target: Target) -> dict[str, Any]:
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():  # a previous run's files must not pass for this run's
        if stale.is_file():
            stale.unlink()
    cmd = locust_command(name, args, target, folder)
    env = dict(os.environ, LOCUST_API_KEY=target.api_key)  # not on the command line
    timeout = planned_seconds(name, args) + GRACE_S
    with (folder / "locust.log").open("w") as log:
        try:
            rc = subprocess.run(
                cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    summary: dict[str, Any] = {"scenario": name, "locust_rc": rc}
    summary.update(aggregated(folder / "locust_stats.csv"))
    history = folder / "locust_stats_history.csv"
    if history.is_file():
        title = f"{name}: {SCENARIOS[name].user_class}, {args.images} images/request"
        plot.plot_run(history, folder / "plot.png", title, folder / "requests.csv")
    summary["ok"] = rc == 0 and summary["requests"] > 0 and summary["failures"] == 0
    if SCENARIOS[name].trainer:  # every rank bursts at every step, or the scenario fails
        summary["steps"] = bursts(folder / "requests.csv")
        summary["missed_bursts"] = missed_bursts(summary["steps"], args.ranks, args.steps)
        summary["ok"] = summary["ok"] and summary["missed_bursts"] == 0
    return summary


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | requests | failures | missed bursts | req/s | p50 ms | p95 ms | p99 ms "
        "| ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        missed = r.get("missed_bursts")
        lines.append(
            f"| {r['scenario']} | {r['requests']:.0f} | {r['failures']:.0f} "
            f"| {'–' if missed is None else missed} | {r['rps']:.2f} "
            f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: the stack is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    stack = None
    results: list[dict[str, Any]] = []
    try:
        if args.start_stack:
            from loadtest.serving import Stack

            api_key = args.api_key or secrets.token_urlsafe(24)
            os.environ["REWARD_API_KEYS"] = json.dumps([api_key])  # inherited by the stack
            print(f"starting the stack (log: {args.out / 'serve.log'})", flush=True)
            try:
                chosen = {"model": args.model, "repository": args.repository}
                stack = Stack(args.out, **{k: v for k, v in chosen.items() if v is not None})
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            tokenizer = stack.repository / "tokenizer.json" if stack.repository else None
            target = Target(stack.url, f"127.0.0.1:{stack.grpc_port}", tokenizer, api_key)
        else:
            target = Target(args.url, args.triton_grpc, args.tokenizer, args.api_key)
        for name in args.scenario:
            print(f"{name}: running ({planned_seconds(name, args):g} s)", flush=True)
            results.append(run_scenario(name, args, target))
    finally:
        if stack is not None:
            stack.stop()
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "summary.md").write_text(table)
    print(table, end="")
    for r in results:
        if not r["ok"]:
            print(f"{r['scenario']}: FAILED, see {args.out / r['scenario'] / 'locust.log'}")
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
