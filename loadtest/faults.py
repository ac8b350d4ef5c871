"""Faults under load: `python -m loadtest.faults` (about 6 minutes on 2 cores).

Starts a real stack on loopback (bundled Triton; a TCP delay proxy in front of its gRPC port;
the torch-free gateway process, `python -m service.cli gateway`), computes the undisturbed
rewards of a fixed corpus, then, one scenario at a time, drives open-loop load with
`AsyncRewardClient` (retries on, a deadline per call) while injecting a fault:

- `triton-sigkill`: SIGKILL of Triton's process group, restarted `--down-s` later on the same
  ports (what the `serve` supervisor does; here the harness restarts it);
- `triton-sigstop`: SIGSTOP of tritonserver for `--stop-s` (longer than the gateway's backend
  timeout: a hung server), then SIGCONT;
- `gateway-restart`: SIGKILL of the gateway process (requests in flight cut off), started again
  on the same port;
- `slow-network`: the proxy delays every chunk by `--latency-s` + uniform(0, `--jitter-s`), in
  both directions, for `--slow-s`;
- `serve-sigstop`: against `reward-service serve` instead (started here, its own Triton):
  tritonserver SIGSTOPped and left stopped; the supervisor must notice the failed readiness
  probes, kill it and start a new one (`SERVE_SETTINGS`).

Every call ends as ok (every item's rewards equal the reference's within 1e-6), an explicit
error (`RewardServiceError`), wrong, lost (no answer nor error by its deadline, or items
missing) or unexpected (any other exception). Per scenario: the counts, the errors by status and
code, and the time to recover (fault injected → first success of a call started after it).
Writes results.json and results.md into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from loadtest.fault_stack import (
    FAULT_GATEWAY_SETTINGS,
    Corpus,
    FaultStack,
    LoadRun,
    Reference,
    ServeProcess,
    fault_stack,
    machine_note,
    make_client,
    mismatch,
    open_loop,
    percentile,
    reference_rewards,
    serve_stack,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "reliability"
SCENARIOS = ("triton-sigkill", "triton-sigstop", "gateway-restart", "slow-network", "serve-sigstop")
SERVE_SCENARIOS = ("serve-sigstop",)  # run against `serve` (its supervisor), not FaultStack
# `serve-sigstop`: the supervisor's readiness probes (each `probe_timeout_s`, every
# `probe_interval_s`) must fail `probe_failures` times before it kills and restarts Triton.
SERVE_SETTINGS = {
    "triton_probe_interval_s": "1",
    "triton_probe_timeout_s": "1",
    "triton_probe_failures": "3",
    "triton_restart_backoff_s": "0.5",
}


@dataclass(frozen=True)
class FaultParams:
    down_s: float = 2.0  # Triton SIGKILL → restart issued
    stop_s: float = 6.0  # SIGSTOP → SIGCONT
    latency_s: float = 0.2  # slow network: per chunk, each direction
    jitter_s: float = 0.2
    slow_s: float = 15.0


async def _sigkill_triton(stack: FaultStack, p: FaultParams, mark: Callable[[str], None]) -> dict:
    pid = stack.triton.pid
    assert pid is not None, "Triton is not running"
    os.killpg(pid, signal.SIGKILL)
    mark("fault")
    await asyncio.sleep(p.down_s)
    began = time.monotonic()
    await asyncio.to_thread(stack.triton.start)
    mark("healed")
    return {"killed_pid": pid, "new_pid": stack.triton.pid, "restart_s": time.monotonic() - began}


async def _sigstop_triton(stack: FaultStack, p: FaultParams, mark: Callable[[str], None]) -> dict:
    pid = stack.triton.pid
    assert pid is not None, "Triton is not running"
    os.kill(pid, signal.SIGSTOP)
    mark("fault")
    try:
        await asyncio.sleep(p.stop_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    mark("healed")
    return {"stopped_pid": pid, "stopped_s": p.stop_s}


async def _restart_gateway(stack: FaultStack, p: FaultParams, mark: Callable[[str], None]) -> dict:
    pid = stack.gateway.pid
    await asyncio.to_thread(stack.gateway.kill)
    mark("fault")
    began = time.monotonic()
    await asyncio.to_thread(stack.gateway.start)
    mark("healed")
    return {"killed_pid": pid, "new_pid": stack.gateway.pid, "restart_s": time.monotonic() - began}


async def _slow_network(stack: FaultStack, p: FaultParams, mark: Callable[[str], None]) -> dict:
    stack.proxy.set_delay(p.latency_s, p.jitter_s)
    mark("fault")
    try:
        await asyncio.sleep(p.slow_s)
    finally:
        stack.proxy.set_delay(0.0, 0.0)
    mark("healed")
    return {"latency_s": p.latency_s, "jitter_s": p.jitter_s, "slowed_s": p.slow_s}


async def _sigstop_supervised(
    serve: ServeProcess, p: FaultParams, mark: Callable[[str], None]
) -> dict:
    """SIGSTOP tritonserver under `serve` and leave it stopped: the supervisor must notice."""
    pid = serve.triton_pid()
    assert pid is not None, "`serve` runs no tritonserver"
    os.kill(pid, signal.SIGSTOP)
    mark("fault")
    began = time.monotonic()
    new = None
    try:
        while new is None or new == pid:
            if time.monotonic() - began > 120:
                raise RuntimeError("the supervisor did not replace the stopped tritonserver")
            await asyncio.sleep(0.1)
            new = serve.triton_pid()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a no-op once the supervisor has killed it
    mark("healed")  # a new tritonserver runs (it may still be loading its models)
    return {"stopped_pid": pid, "new_pid": new, "replaced_after_s": time.monotonic() - began}


FAULTS: dict[str, Callable[[FaultStack, FaultParams, Callable[[str], None]], Awaitable[dict]]] = {
    "triton-sigkill": _sigkill_triton,
    "triton-sigstop": _sigstop_triton,
    "gateway-restart": _restart_gateway,
    "slow-network": _slow_network,
    "serve-sigstop": _sigstop_supervised,
}


def wait_healthy(url: str, timeout_s: float = 120.0) -> float:
    """Seconds until the gateway at `url` is ready again (Triton serving the export behind it)."""
    began = time.monotonic()
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as http:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if http.get("/readyz").status_code == 200:
                    return time.monotonic() - began
            if time.monotonic() - began > timeout_s:
                raise RuntimeError(f"not ready {timeout_s:g} s after the scenario")
            time.sleep(0.2)


async def run_scenario(
    name: str,
    stack: FaultStack | ServeProcess,
    client: Any,
    corpus: Corpus,
    reference: Reference,
    *,
    params: FaultParams,
    rate_per_s: float,
    warm_s: float,
    recover_s: float,
    items_per_call: int,
    deadline_s: float,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Load for `warm_s`, inject fault `name`, heal it, load `recover_s` more; the summary."""
    run = LoadRun()
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = run.now()

    bar = tqdm(desc=name, total=None, unit="s", disable=not progress, leave=True)

    def tick(now: float, in_flight: int) -> None:
        counts = run.counts()
        bar.n = int(now)
        bar.set_postfix(
            in_flight=in_flight, fault="on" if "fault" in marks and "healed" not in marks else "",
            **{k: v for k, v in counts.items() if v}, refresh=True,
        )  # fmt: skip

    async def inject() -> dict:
        await asyncio.sleep(warm_s)
        info = await FAULTS[name](stack, params, mark)
        return info

    stop = asyncio.Event()
    fault_task = asyncio.create_task(inject())
    # the load runs until recover_s after the heal (a restart's length is not known ahead)
    load_task = asyncio.create_task(
        open_loop(
            client,
            corpus,
            reference,
            run,
            rate_per_s=rate_per_s,
            duration_s=1e9,
            items_per_call=items_per_call,
            deadline_s=deadline_s,
            seed=seed,
            on_tick=tick,
            stop=stop,
        )  # fmt: skip
    )
    info = await fault_task
    await asyncio.sleep(recover_s)
    stop.set()  # no new calls; wait for those in flight
    await load_task
    bar.close()
    return summarise(name, run, marks, info)


def summarise(name: str, run: LoadRun, marks: dict[str, float], info: dict) -> dict[str, Any]:
    fault_at, healed_at = marks.get("fault"), marks.get("healed")
    first_ok = run.first_ok_after(fault_at) if fault_at is not None else None
    recovered_at = first_ok
    ok_latencies = [c.latency_s for c in run.calls if c.outcome == "ok"]
    errors_after = [c for c in run.calls if c.outcome == "error" and fault_at is not None]
    after = run.counts(since=recovered_at) if recovered_at is not None else None
    return {
        "scenario": name,
        "calls": len(run.calls),
        "counts": run.counts(),
        "errors": run.details("error"),
        "wrong": run.details("wrong"),
        "lost": run.details("lost"),
        "unexpected": run.details("unexpected"),
        "fault_at_s": fault_at,
        "healed_at_s": healed_at,
        "fault_length_s": None if fault_at is None or healed_at is None else healed_at - fault_at,
        "recover_s": None if first_ok is None or fault_at is None else first_ok - fault_at,
        "last_error_end_s": max((c.ended for c in errors_after), default=None),
        "counts_after_recovery": after,
        "ok_latency_p50_s": percentile(ok_latencies, 50),
        "ok_latency_p99_s": percentile(ok_latencies, 99),
        "ok_latency_max_s": max(ok_latencies, default=None),
        "fault": info,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | calls | ok | explicit errors | wrong | lost | unexpected | fault length | "
        "time to recover | ok p50 / p99 / max latency |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in results["scenarios"]:
        c = s["counts"]
        errors = c["error"]
        detail = ", ".join(f"{k} × {v}" for k, v in s["errors"].items())
        fmt = lambda v: "–" if v is None else f"{v:.1f} s"  # noqa: E731
        lat = " / ".join(
            "–" if s[k] is None else f"{s[k]:.2f}"
            for k in ("ok_latency_p50_s", "ok_latency_p99_s", "ok_latency_max_s")
        )
        lines.append(
            f"| {s['scenario']} | {s['calls']} | {c['ok']} | {errors}"
            + (f" ({detail})" if detail else "")
            + f" | {c['wrong']} | {c['lost']} | {c['unexpected']} | {fmt(s['fault_length_s'])} | "
            f"{fmt(s['recover_s'])} | {lat} s |"
        )
    m = results["machine"]
    lines += [
        "",
        f"{results['rate_per_s']:g} calls/s open loop, {results['items_per_call']} items per call, "
        f"deadline {results['deadline_s']:g} s per call, client attempts {results['attempts']}; "
        f"gateway settings {results['gateway_settings']}; {m['cores']} cores, load average "
        f"{m['loadavg'][0]:.1f} at the start and {results['loadavg_end'][0]:.1f} at the end.",
    ]
    return "\n".join(lines) + "\n"


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest.fault_stack import default_repository

    repository = Path(args.repository) if args.repository else default_repository()
    params = FaultParams(args.down_s, args.stop_s, args.latency_s, args.jitter_s, args.slow_s)
    machine = machine_note()
    workdir = Path(tempfile.mkdtemp(prefix="faults-"))
    print(f"repository {repository}; logs in {workdir}", flush=True)
    names = args.scenario or list(SCENARIOS)
    corpus = Corpus.build(size=96, n=args.corpus, seed=7)
    scenarios: list[dict[str, Any]] = []
    references: list[Reference] = []

    async def run_on(stack: Any, url: str, todo: list[str]) -> None:
        client = make_client(url, attempts=args.attempts)
        try:
            reference = await reference_rewards(client, corpus)
            print(f"reference: {len(reference)} items scored undisturbed at {url}", flush=True)
            references.append(reference)
            for name in todo:
                summary = await run_scenario(
                    name, stack, client, corpus, reference, params=params,
                    rate_per_s=args.rate, warm_s=args.warm_s, recover_s=args.recover_s,
                    items_per_call=args.items, deadline_s=args.deadline_s,
                    seed=SCENARIOS.index(name),
                )  # fmt: skip
                summary["ready_again_s"] = await asyncio.to_thread(wait_healthy, url)
                scenarios.append(summary)
                c = summary["counts"]
                print(
                    f"{name}: {c} recover {summary['recover_s']} s; errors {summary['errors']}",
                    flush=True,
                )
        finally:
            await client.aclose()

    plain = [n for n in names if n not in SERVE_SCENARIOS]
    supervised = [n for n in names if n in SERVE_SCENARIOS]
    if plain:
        with fault_stack(repository, workdir) as stack:
            await run_on(stack, stack.gateway.url, plain)
    if supervised:
        with serve_stack(repository, workdir, SERVE_SETTINGS) as serve:
            await run_on(serve, serve.url, supervised)
    # both stacks serve the same export: their undisturbed rewards must agree too
    same = all(
        mismatch(a, b) is None
        for ref in references[1:]
        for a, b in zip(references[0], ref, strict=True)
    )
    return {
        "scenarios": scenarios,
        "rate_per_s": args.rate,
        "items_per_call": args.items,
        "deadline_s": args.deadline_s,
        "attempts": args.attempts,
        "params": params.__dict__,
        "gateway_settings": FAULT_GATEWAY_SETTINGS,
        "serve_settings": SERVE_SETTINGS if supervised else None,
        "references_agree": same,
        "machine": machine,
        "loadavg_end": list(os.getloadavg()),
        "repository": str(repository),
        "logs": str(workdir),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.faults", description=__doc__.split("\n")[0]
    )
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default all")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument(
        "--repository", help="an exported repository (default: export the shipped model)"
    )
    p.add_argument("--rate", type=float, default=10.0, help="calls per second (open loop)")
    p.add_argument("--items", type=int, default=4, help="items (image, prompt) per call")
    p.add_argument("--corpus", type=int, default=16, help="distinct corpus items")
    p.add_argument("--deadline-s", type=float, default=30.0, help="each call's deadline")
    p.add_argument("--attempts", type=int, default=10, help="client tries per request")
    p.add_argument("--warm-s", type=float, default=10.0, help="load before the fault")
    p.add_argument("--recover-s", type=float, default=20.0, help="load after the fault is healed")
    p.add_argument("--down-s", type=float, default=2.0, help="Triton SIGKILL → restart")
    p.add_argument("--stop-s", type=float, default=6.0, help="Triton SIGSTOP → SIGCONT")
    p.add_argument("--latency-s", type=float, default=0.2, help="slow network: delay per chunk")
    p.add_argument("--jitter-s", type=float, default=0.2, help="slow network: + uniform(0, this)")
    p.add_argument("--slow-s", type=float, default=15.0, help="slow network: how long")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(run_all(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "faults.md").write_text(table)
    print(table)
    print(f"written: {args.out / 'faults.json'}, {args.out / 'faults.md'}")
    bad = sum(s["counts"][k] for s in results["scenarios"] for k in ("wrong", "lost", "unexpected"))
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
