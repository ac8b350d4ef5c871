"""What `loadtest.faults`, `loadtest.soak` and tests/reliability share: a stack whose parts can
be faulted one at a time, a fixed corpus with its undisturbed reference rewards, and an
open-loop load driver that classifies every call.

The stack, all on loopback:

    AsyncRewardClient → gateway process (`python -m service.cli gateway`) → DelayProxy → Triton

- `TritonServer` (the bundled tritonserver) is started here, not by `serve`, so it can be
  SIGKILLed, SIGSTOPped and restarted on the same ports without touching the gateway;
- the gateway is its own process (torch-free), so it can be killed and restarted alone;
- the gateway reaches Triton's gRPC port through `DelayProxy` (zero delay unless a scenario
  slows it), so the network can be slowed without restarting anything.

Every call ends in exactly one outcome:
- `ok`: every item's rewards equal the reference's (each reward field, within `TOLERANCE`);
- `error`: an explicit `RewardServiceError` (with its status and code);
- `wrong`: a result whose rewards differ from the reference (or the wrong number of items);
- `lost`: neither a result nor an error by the call's deadline (+ a grace), or a result with
  items missing;
- `unexpected`: any other exception (a client bug: neither a result nor the documented error).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.processes import group_pids, named_child, rss_bytes
from loadtest.serving import Corpus  # the benchmark's corpus: item i is image i, prompt i
from loadtest.tcp_delay_proxy import DelayProxy
from service.triton_server import TritonServer, free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
REWARD_FIELDS = ("raw", "textnorm", "head", "textnorm_head", "ensemble_mean", "ensemble_uw")
OUTCOMES = ("ok", "error", "wrong", "lost", "unexpected")

# Gateway settings of every fault stack: a short backend timeout, so a hung Triton is a 504
# within seconds, and a short Retry-After, so the clients' retries come back soon.
FAULT_GATEWAY_SETTINGS = {
    "backend_timeout_s": "3",
    "retry_after_s": "1",
}


# -- the corpus and its reference --------------------------------------------------------------

Reference = list[dict[str, float | None]]  # per corpus item: reward field → value


def rewards_of(item: Any) -> dict[str, float | None]:
    return {name: item.reward(name) for name in REWARD_FIELDS}


async def reference_rewards(client: Any, corpus: Corpus) -> Reference:
    """The undisturbed rewards of every corpus item (one call; the stack must be healthy)."""
    result = await client.score(corpus.pngs, corpus.prompts, deadline_s=120)
    return [rewards_of(item) for item in result.results]


def mismatch(got: dict[str, float | None], want: dict[str, float | None]) -> str | None:
    """Why `got` is not `want` (None when every field agrees within TOLERANCE)."""
    for name in REWARD_FIELDS:
        a, b = got.get(name), want.get(name)
        if a is None or b is None:
            if a is not b:
                return f"{name}: {a} vs reference {b}"
            continue
        if not (math.isfinite(a) and abs(a - b) <= TOLERANCE):
            return f"{name}: {a!r} vs reference {b!r}"
    return None


def _gateway_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARD_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    env.update({f"REWARD_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class GatewayProcess:
    """`python -m service.cli gateway` on a fixed loopback port; kill() and start() again."""

    def __init__(
        self, triton_url: str, repository: Path, port: int, log_path: Path, settings: dict
    ) -> None:
        self.triton_url, self.repository, self.port = triton_url, repository, port
        self.log_path, self.settings = log_path, dict(settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, ready_timeout_s: float = 120.0) -> float:
        """Start it and wait for /readyz 200; the seconds that took."""
        began = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "gateway",
            "--triton-url",
            self.triton_url,
            "--repository",
            str(self.repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=_gateway_env(self.settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        self.wait_ready(began + ready_timeout_s)
        return time.monotonic() - began

    def wait_ready(self, deadline: float) -> None:
        with httpx.Client(base_url=self.url, trust_env=False, timeout=5) as http:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited before ready:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway is not ready in time:\n{self.log_tail()}")
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL (no graceful shutdown: requests in flight are cut off)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


@dataclass
class FaultStack:
    triton: TritonServer
    proxy: DelayProxy
    gateway: GatewayProcess

    def triton_rss(self) -> int:
        pid = self.triton.pid
        return rss_bytes(group_pids(pid)) if pid is not None else 0

    def gateway_rss(self) -> int:
        pid = self.gateway.pid
        return rss_bytes([pid]) if pid is not None else 0


@contextlib.contextmanager
def fault_stack(
    repository: Path, workdir: Path, gateway_settings: dict[str, str] | None = None
) -> Iterator[FaultStack]:
    """Triton (bundled), the delay proxy and a gateway process; everything stopped after."""
    workdir.mkdir(parents=True, exist_ok=True)
    triton = TritonServer(
        repository,
        log_file=workdir / "tritonserver.log",
        startup_timeout=180,
        stop_timeout=20,
        die_with_parent=False,  # restarted from other threads than the one that started it
    )
    settings = {**FAULT_GATEWAY_SETTINGS, **(gateway_settings or {})}
    proxy: DelayProxy | None = None
    gateway: GatewayProcess | None = None
    try:
        triton.start()
        host, port = triton.grpc_url.rsplit(":", 1)
        proxy = DelayProxy((host, int(port))).start()
        (gateway_port,) = free_ports(1)
        gateway = GatewayProcess(
            proxy.address, repository, gateway_port, workdir / "gateway.log", settings
        )
        gateway.start()
        yield FaultStack(triton, proxy, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        if proxy is not None:
            proxy.stop()
        pid = triton.pid
        if pid is not None:  # a stopped server ignores SIGTERM until continued
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        triton.stop()


# -- the load driver ---------------------------------------------------------------------------
@dataclass
class Call:
    started: float  # seconds since the load began
    ended: float
    outcome: str  # one of OUTCOMES
    detail: str = ""
    items: int = 0

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


@dataclass
class LoadRun:
    calls: list[Call] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)  # time.monotonic() when the load began

    def now(self) -> float:
        return time.monotonic() - self.t0

    def counts(self, since: float = -math.inf, until: float = math.inf) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for c in self.calls:
            if since <= c.started < until:
                out[c.outcome] += 1
        return out

    def details(self, outcome: str) -> dict[str, int]:
        """How many calls of `outcome` ended with each detail (error status and code)."""
        out: dict[str, int] = {}
        for c in self.calls:
            if c.outcome == outcome:
                out[c.detail] = out.get(c.detail, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def first_ok_after(self, t: float) -> float | None:
        """When the first call started at or after `t` succeeded (seconds since the load began)."""
        ends = [c.ended for c in self.calls if c.outcome == "ok" and c.started >= t]
        return min(ends) if ends else None

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.calls]


async def one_call(
    client: Any,
    corpus: Corpus,
    reference: Reference,
    indices: list[int],
    run: LoadRun,
    deadline_s: float,
    grace_s: float,
) -> Call:
    """Score corpus items `indices` in one call and classify the outcome."""
    from textnorm_reward_client import RewardServiceError

    started = run.now()
    images = [corpus.pngs[i] for i in indices]
    prompts = [corpus.prompts[i] for i in indices]
    try:
        result = await asyncio.wait_for(
            client.score(images, prompts, deadline_s=deadline_s), deadline_s + grace_s
        )
    except TimeoutError:
        call = Call(started, run.now(), "lost", "no answer by the deadline", len(indices))
    except RewardServiceError as exc:
        detail = f"{exc.status if exc.status is not None else '-'} {exc.code}"
        call = Call(started, run.now(), "error", detail, len(indices))
    except Exception as exc:  # neither a result nor the documented error: a client bug
        call = Call(started, run.now(), "unexpected", f"{type(exc).__name__}: {exc}"[:300])
    else:
        ended = run.now()
        got = list(result.results)
        if len(got) < len(indices):
            call = Call(started, ended, "lost", f"{len(got)} of {len(indices)} items", len(got))
        elif len(got) > len(indices):
            call = Call(started, ended, "wrong", f"{len(got)} results for {len(indices)} items")
        else:
            why = None
            for i, item in zip(indices, got, strict=True):
                why = mismatch(rewards_of(item), reference[i])
                if why:
                    why = f"item {i}: {why}"
                    break
            call = Call(started, ended, "wrong" if why else "ok", why or "", len(indices))
    run.calls.append(call)
    return call


async def open_loop(
    client: Any,
    corpus: Corpus,
    reference: Reference,
    run: LoadRun,
    *,
    rate_per_s: float,
    duration_s: float,
    items_per_call: int,
    deadline_s: float,
    grace_s: float = 5.0,
    seed: int = 0,
    on_tick: Any = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start one call every 1/rate s (Poisson arrivals) for `duration_s` (or until `stop` is
    set), then wait for every call started."""
    rng = random.Random(seed)
    pending: set[asyncio.Task] = set()
    end = run.now() + duration_s
    next_at = run.now()
    last_tick = -1
    while True:
        now = run.now()
        if now >= end or (stop is not None and stop.is_set()):
            break
        if now < next_at:
            await asyncio.sleep(min(next_at - now, 0.25))
        else:
            indices = rng.sample(range(len(corpus.prompts)), items_per_call)
            task = asyncio.create_task(
                one_call(client, corpus, reference, indices, run, deadline_s, grace_s)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += rng.expovariate(rate_per_s)
        if on_tick is not None and int(now) != last_tick:
            last_tick = int(now)
            on_tick(now, len(pending))
    if pending:
        await asyncio.gather(*pending)


async def closed_loop(
    client: Any,
    corpus: Corpus,
    reference: Reference,
    run: LoadRun,
    *,
    concurrency: int,
    duration_s: float,
    items_per_call: int,
    deadline_s: float,
    seed: int = 0,
) -> float:
    """`concurrency` callers back to back for `duration_s`: completed calls per second."""
    rng = random.Random(seed)
    began = run.now()
    end = began + duration_s
    done = 0

    async def caller() -> None:
        nonlocal done
        while run.now() < end:
            indices = rng.sample(range(len(corpus.prompts)), items_per_call)
            call = await one_call(client, corpus, reference, indices, run, deadline_s, 5.0)
            if call.outcome == "ok" and call.ended <= end:
                done += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / duration_s


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def machine_note() -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    return {"cores": os.cpu_count(), "loadavg": [load1, load5, load15]}


def make_client(
    urls: str | list[str],
    *,
    attempts: int = 10,
    timeout_s: float = 10.0,
    max_concurrency: int = 32,
) -> Any:
    """The trainer's client as a fault run uses it: retries on (429/503/504 and connection
    errors, honouring Retry-After), exponential backoff capped at 2 s."""
    from textnorm_reward_client import AsyncRewardClient, RetryPolicy

    retry = RetryPolicy(
        attempts=attempts, backoff_base_s=0.25, backoff_max_s=2.0, max_retry_after_s=5.0
    )
    return AsyncRewardClient(
        urls, timeout_s=timeout_s, retry=retry, max_concurrency=max_concurrency
    )


def default_repository() -> Path:
    """The CLIP-only export of the shipped model (exported once, then reused: content-addressed)."""
    from service.launcher import ensure_repository
    from service.settings import Settings

    return ensure_repository(Settings(head=""))  # type: ignore[arg-type]


class ServeProcess:
    """`python -m service.cli serve --repository`: gateway and bundled Triton in one launcher,
    whose supervisor (TritonWatchdog) restarts a Triton that exits or stops answering."""

    def __init__(self, repository: Path, port: int, log_path: Path, settings: dict) -> None:
        self.repository, self.port, self.log_path = repository, port, log_path
        self.settings = {**settings, "repository": str(repository), "port": str(port)}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 180.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve"],
                cwd=REPO_ROOT,
                env=_gateway_env({"host": "127.0.0.1", **self.settings}),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_timeout_s
        with httpx.Client(base_url=self.url, trust_env=False, timeout=5) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"`serve` exited before ready:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"`serve` is not ready in time:\n{self.log_tail()}")
                time.sleep(0.2)

    def triton_pid(self) -> int | None:
        """The launcher's running tritonserver child (None while there is none)."""
        if self.proc is None:
            return None
        return named_child(self.proc.pid, "tritonserver")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


@contextlib.contextmanager
def serve_stack(
    repository: Path, workdir: Path, settings: dict[str, str] | None = None
) -> Iterator[ServeProcess]:
    (port,) = free_ports(1)
    serve = ServeProcess(
        repository, port, workdir / "serve.log", {**FAULT_GATEWAY_SETTINGS, **(settings or {})}
    )
    try:
        serve.start()
        yield serve
    finally:
        pid = serve.triton_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        serve.stop()
