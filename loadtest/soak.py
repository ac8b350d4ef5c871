"""Soak: `python -m loadtest.soak --minutes 10` (`make soak`; not in CI, a 60 s version is).

Starts the real stack (bundled Triton + the gateway process, as `loadtest.faults` does, with the
gateway's default settings), measures its capacity closed loop (`--concurrency` callers back to
back), then drives it open loop (Poisson arrivals) at `--fraction` of that capacity for
`--minutes`. Every call is checked item by item against the undisturbed reference rewards, and
the client does not retry (`attempts=1`): an error is an error. Per bucket (`--bucket-s`, a
minute by default): calls, errors, p50/p99 latency, gateway and Triton RSS (Triton: its whole
process group, the Python-backend stubs included).

Pass: 0 errors (wrong, lost and unexpected included); p99 stable (the median p99 of the second
half of the buckets at most `P99_GROWTH` × that of the first half, from bucket 2 on); RSS drift
of the gateway and of Triton below `RSS_DRIFT` from bucket 2 to the last. Writes soak.json,
soak.md and soak.png (p99 and RSS over time) into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadtest.fault_stack import (
    Corpus,
    FaultStack,
    LoadRun,
    Reference,
    closed_loop,
    fault_stack,
    machine_note,
    make_client,
    open_loop,
    percentile,
    reference_rewards,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "reliability"
RSS_DRIFT = 0.10  # |RSS(last bucket) / RSS(bucket 2) − 1| must stay below this
P99_GROWTH = 1.5  # median p99 of the second half of the buckets / that of the first half
# The gateway's defaults (not the fault runs' short timeouts): the soak measures the product.
SOAK_GATEWAY_SETTINGS = {"backend_timeout_s": "30", "retry_after_s": "5"}


async def measure_capacity(
    client: Any,
    corpus: Corpus,
    reference: Reference,
    *,
    concurrency: int,
    warmup_s: float,
    seconds: float,
    items_per_call: int,
) -> dict[str, Any]:
    """Closed loop: calls per second completed by `concurrency` back-to-back callers."""
    warm = LoadRun()
    await closed_loop(
        client, corpus, reference, warm, concurrency=concurrency, duration_s=warmup_s,
        items_per_call=items_per_call, deadline_s=60,
    )  # fmt: skip
    run = LoadRun()
    rate = await closed_loop(
        client, corpus, reference, run, concurrency=concurrency, duration_s=seconds,
        items_per_call=items_per_call, deadline_s=60,
    )  # fmt: skip
    return {
        "calls_per_s": rate,
        "concurrency": concurrency,
        "seconds": seconds,
        "counts": run.counts(),
        "p50_s": percentile([c.latency_s for c in run.calls], 50),
    }


async def soak(
    stack: FaultStack,
    client: Any,
    corpus: Corpus,
    reference: Reference,
    *,
    rate_per_s: float,
    duration_s: float,
    bucket_s: float,
    items_per_call: int,
    sample_s: float = 2.0,
    deadline_s: float = 60.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Open loop at `rate_per_s` for `duration_s`; per-bucket statistics and the verdict."""
    run = LoadRun()
    samples: list[dict[str, float]] = []
    done = asyncio.Event()
    bar = tqdm(total=int(duration_s), desc="soak", unit="s", disable=not progress)

    async def sampler() -> None:
        while not done.is_set():
            samples.append(
                {"t": run.now(), "gateway": stack.gateway_rss(), "triton": stack.triton_rss()}
            )
            bar.n = min(int(run.now()), int(duration_s))
            counts = run.counts()
            bar.set_postfix(ok=counts["ok"], errors=len(run.calls) - counts["ok"], refresh=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), sample_s)

    sampling = asyncio.create_task(sampler())
    await open_loop(
        client, corpus, reference, run, rate_per_s=rate_per_s, duration_s=duration_s,
        items_per_call=items_per_call, deadline_s=deadline_s,
    )  # fmt: skip
    done.set()
    await sampling
    bar.close()
    return summarise(run, samples, rate_per_s, duration_s, bucket_s)


def summarise(
    run: LoadRun, samples: list[dict[str, float]], rate: float, duration_s: float, bucket_s: float
) -> dict[str, Any]:
    n = max(1, round(duration_s / bucket_s))
    buckets = []
    for b in range(n):
        lo, hi = b * bucket_s, (b + 1) * bucket_s
        calls = [c for c in run.calls if lo <= c.started < hi]
        lat = [c.latency_s for c in calls if c.outcome == "ok"]
        # the samples of the bucket (the last one also takes those of the drain after it)
        ss = [s for s in samples if lo <= s["t"] < hi or (b == n - 1 and s["t"] >= hi)]
        buckets.append(
            {
                "bucket": b + 1,
                "start_s": lo,
                "calls": len(calls),
                "errors": sum(c.outcome != "ok" for c in calls),
                "p50_s": percentile(lat, 50),
                "p99_s": percentile(lat, 99),
                "gateway_rss_mb": _median_mb(ss, "gateway"),
                "triton_rss_mb": _median_mb(ss, "triton"),
            }
        )
    counts = run.counts()
    errors = len(run.calls) - counts["ok"]
    steady = buckets[1:] if len(buckets) > 2 else buckets  # from bucket 2 on
    half = len(steady) // 2
    p99s = [b["p99_s"] for b in steady if b["p99_s"] is not None]
    first, second = p99s[: max(1, half)], p99s[max(1, half) :] or p99s[-1:]
    p99_growth = statistics.median(second) / statistics.median(first) if p99s else None
    drift = {
        name: _drift(steady[0][f"{name}_rss_mb"], steady[-1][f"{name}_rss_mb"])
        for name in ("gateway", "triton")
    }
    verdict = {
        "zero_errors": errors == 0,
        "p99_stable": p99_growth is not None and p99_growth <= P99_GROWTH,
        "rss_drift_below_bound": all(d is not None and abs(d) < RSS_DRIFT for d in drift.values()),
    }
    all_lat = [c.latency_s for c in run.calls if c.outcome == "ok"]
    return {
        "rate_per_s": rate,
        "duration_s": duration_s,
        "bucket_s": bucket_s,
        "calls": len(run.calls),
        "counts": counts,
        "errors": errors,
        "error_details": {k: run.details(k) for k in ("error", "wrong", "lost", "unexpected")},
        "achieved_calls_per_s": len(run.calls) / duration_s,
        "p50_s": percentile(all_lat, 50),
        "p99_s": percentile(all_lat, 99),
        "p99_growth": p99_growth,
        "rss_drift": drift,
        "buckets": buckets,
        "samples": samples,
        "verdict": verdict,
        "passed": all(verdict.values()),
    }


def _median_mb(samples: list[dict[str, float]], key: str) -> float | None:
    values = [s[key] for s in samples if s[key] > 0]
    return statistics.median(values) / 1e6 if values else None


def _drift(start: float | None, end: float | None) -> float | None:
    if not start or end is None:
        return None
    return end / start - 1


def bucket_table(s: dict[str, Any]) -> str:
    """The per-bucket table and the totals of one `soak()` result (markdown)."""
    ms = lambda v: "–" if v is None else f"{1000 * v:.0f}"  # noqa: E731
    mb = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
    pct = lambda v: "–" if v is None else f"{100 * v:+.1f} %"  # noqa: E731
    lines = [
        "| bucket | from | calls | errors | p50 ms | p99 ms | gateway RSS MB | Triton RSS MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in s["buckets"]:
        lines.append(
            f"| {b['bucket']} | {b['start_s']:.0f} s | {b['calls']} | {b['errors']} | "
            f"{ms(b['p50_s'])} | {ms(b['p99_s'])} | {mb(b['gateway_rss_mb'])} | "
            f"{mb(b['triton_rss_mb'])} |"
        )
    d = s["rss_drift"]
    growth = "–" if s["p99_growth"] is None else f"{s['p99_growth']:.2f}"
    lines += [
        "",
        f"Total: {s['calls']} calls, {s['errors']} errors; p50 {ms(s['p50_s'])} ms, p99 "
        f"{ms(s['p99_s'])} ms; p99 growth (2nd half / 1st half, from bucket 2) {growth} "
        f"(bound {P99_GROWTH}); RSS drift from bucket 2 to the last: gateway {pct(d['gateway'])}, "
        f"Triton {pct(d['triton'])} (bound ±{RSS_DRIFT:.0%}). Verdict: "
        f"{'PASS' if s['passed'] else 'FAIL'} {s['verdict']}.",
    ]
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    s, cap, m = results["soak"], results["capacity"], results["machine"]
    return (
        f"Capacity (closed loop, {cap['concurrency']} callers, {cap['seconds']:g} s): "
        f"{cap['calls_per_s']:.1f} calls/s of {results['items_per_call']} items; soak at "
        f"{s['rate_per_s']:.1f} calls/s ({results['fraction']:.0%}) for {s['duration_s'] / 60:g} "
        f"min, client without retries.\n\n"
        + bucket_table(s)
        + f"\n{m['cores']} cores, load average {m['loadavg'][0]:.1f} at the start, "
        f"{results['loadavg_end'][0]:.1f} at the end.\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["soak"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    mids = [(b["start_s"] + s["bucket_s"] / 2) / 60 for b in s["buckets"]]
    ax1.plot(mids, [1000 * (b["p99_s"] or 0) for b in s["buckets"]], "o-", label="p99")
    ax1.plot(mids, [1000 * (b["p50_s"] or 0) for b in s["buckets"]], "s--", label="p50")
    ax1.set_ylabel("latency per call (ms)")
    ax1.set_title(f"soak at {s['rate_per_s']:.1f} calls/s ({results['fraction']:.0%} of capacity)")
    ax1.legend(loc="upper right")
    t = [x["t"] / 60 for x in s["samples"]]
    ax2.plot(t, [x["gateway"] / 1e6 for x in s["samples"]], label="gateway RSS")
    ax2.plot(t, [x["triton"] / 1e6 for x in s["samples"]], label="Triton RSS (process group)")
    ax2.set_ylabel("MB")
    ax2.set_xlabel("minutes")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest.fault_stack import default_repository

    repository = Path(args.repository) if args.repository else default_repository()
    machine = machine_note()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    print(f"repository {repository}; logs in {workdir}", flush=True)
    with fault_stack(repository, workdir, SOAK_GATEWAY_SETTINGS) as stack:
        client = make_client(stack.gateway.url, attempts=1, timeout_s=60)
        try:
            corpus = Corpus.build(size=96, n=args.corpus, seed=7)
            reference = await reference_rewards(client, corpus)
            print("measuring capacity ...", flush=True)
            capacity = await measure_capacity(
                client, corpus, reference, concurrency=args.concurrency,
                warmup_s=args.warmup_s, seconds=args.capacity_s, items_per_call=args.items,
            )  # fmt: skip
            rate = args.fraction * capacity["calls_per_s"]
            print(f"capacity {capacity['calls_per_s']:.1f} calls/s; soak at {rate:.1f}", flush=True)
            result = await soak(
                stack, client, corpus, reference, rate_per_s=rate,
                duration_s=args.minutes * 60, bucket_s=args.bucket_s, items_per_call=args.items,
            )  # fmt: skip
        finally:
            await client.aclose()
    return {
        "capacity": capacity,
        "fraction": args.fraction,
        "items_per_call": args.items,
        "soak": result,
        "machine": machine,
        "loadavg_end": list(os.getloadavg()),
        "repository": str(repository),
        "logs": str(workdir),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the open-loop soak")
    p.add_argument("--fraction", type=float, default=0.7, help="share of the measured capacity")
    p.add_argument("--bucket-s", type=float, default=60.0, help="statistics per bucket")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop callers (capacity)")
    p.add_argument("--capacity-s", type=float, default=20.0, help="capacity measurement length")
    p.add_argument("--warmup-s", type=float, default=5.0, help="closed-loop warm-up")
    p.add_argument("--items", type=int, default=4, help="items (image, prompt) per call")
    p.add_argument("--corpus", type=int, default=16, help="distinct corpus items")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument(
        "--repository", help="an exported repository (default: export the shipped model)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(run_all(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "soak.md").write_text(table)
    plot(results, args.out / "soak.png")
    print(table)
    print(f"written: {args.out}/soak.json, soak.md, soak.png")
    raise SystemExit(0 if results["soak"]["passed"] else 1)


if __name__ == "__main__":
    main()
