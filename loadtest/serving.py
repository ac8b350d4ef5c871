"""`reward-service bench serving`: the product against a naive wrapper, LitServe and the ceiling.

One run, one model, one machine. Every server is started once (in parallel, each in its own
process group, stopped by PID at the end — also on errors, Ctrl-C and SIGTERM) and reused for
every point:
- ``gateway``: the real stack (`reward-service serve --repository R`: Triton + the FastAPI
  gateway), ``POST /v1/score`` with base64 PNGs;
- ``grpc``: the same Triton's ``score`` model (KServe v2 gRPC): decoded uint8 images and the
  token ids of [prompt, contrastive prompts] (the client tokenises, as a trainer without the
  gateway would);
- ``naive``: `loadtest.baselines.naive_server` (FastAPI + eager `transformers`, one request at a
  time, raw cosine only);
- ``litserve``: `loadtest.baselines.litserve_server` (same model, LitServe dynamic batching,
  max batch 32, 10 ms);
- ``ceiling``: in this process, the exported image and text ONNX towers (preprocessing in the
  image graph) under ONNX Runtime with intra-op threads = cores, at batch = each concurrency
  level (and images × C up to the largest level); PNG decode and tokenisation included. Its
  unit is (image, prompt) pairs/s: per pair one image encode and one text encode (``pair``).
  Also measured: ``image`` (image encode only: what a server with every prompt cached can
  reach) and ``pair_textnorm`` (the prompt plus the counting rule's contrastive prompts
  encoded per pair: the work of a cold TextNorm request).
  Its windows are split between a pass before the points and one after them, so drift over a
  long run moves the ceiling and the systems alike.

Workloads (every item of a request carries its own prompt):
- ``rl``: prompts drawn from a pool of 16 shapes-world prompts, each item with its prompt's
  rendered image (caches warm: every cache-capable path is primed with the pool first); TextNorm
  on uses the default rule (``auto``, up to 18 contrastive prompts);
- ``cold``: every item a prompt never sent before in this run (a fresh count/colour/shape/
  background combination with a unique ``#n`` suffix: the counting rule still finds the count,
  and no prompt equals another's contrastive prompt); TextNorm on uses the counting rule.
TextNorm off: ``{"contrastive": [], "allow_missing": true}`` for the gateway (the prompt alone;
TextNorm fields null), only the prompt row for gRPC. The baselines ignore TextNorm (they never
compute it), so they are measured once per point and shown under both settings.

Measurement, per (system, point): C closed-loop clients back to back. Warm-up until every
client has had ``warmup_answers`` answers (default 3: at C = 32 on a ViT-B/32 one request takes
≈ 2 s, and after a single round the gateway's first window ran 10–40 % slow in 2 runs of 3) and
``warmup_s`` passed; then ``runs`` consecutive windows of
``seconds``; then the clients finish their last request (drain, not counted). Images/s of a
window credits each request by the fraction of its own duration inside the window (for closed
loops this is completions/s without the edge error of short windows or of batch bursts);
the point's figure is the median over windows. p50/p95/p99 latencies pool every request that
started inside the windows. Errors (non-2xx, wrong result count, exceptions) are counted over
the whole point, warm-up and drain included, and never dropped. Ratios: img/s ÷ naive's and ÷
LitServe's at the same point, and ÷ the best ``pair`` ceiling. CPU: the server processes' CPU
seconds over the windows (`loadtest.cpu_time`), per image answered in them and as cores kept
busy, by role: ``gateway`` and ``triton`` for the stack (``triton`` alone for gRPC), ``server``
for a baseline, the ``idle servers`` (those not measured) and the ``load generator`` itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.metadata
import io
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from textnorm_reward_client.clip_tokenizer import ClipTokenizer

from loadtest.baselines import LITSERVE_MODULE, NAIVE_MODULE
from loadtest.cpu_time import STACK_SYSTEMS, CpuReader, point_reader, used_s
from loadtest.processes import in_tree, listener
from service.cli_support import integer_list
from service.contrastive import contrastive_prompts
from service.model_contract import CONTEXT_LENGTH, MAX_PROMPTS, RAW_TOLERANCE
from service.triton_server import free_ports
from shapes_world.grammar import describe
from shapes_world.render import render
from shapes_world.sampling import random_scene
from shapes_world.scene import Caption, Group, Scene
from shapes_world.vocab import BACKGROUNDS, COLOURS, MAX_COUNT, MIN_COUNT, SHAPES

SYSTEMS = ("gateway", "grpc", "naive", "litserve", "ceiling")
SERVED_EXPORT = ("gateway", "grpc", "ceiling")  # the systems that run the exported ONNX files
PRECISIONS = tuple(RAW_TOLERANCE)  # of the export's CPU towers (`export --precision`)
# The same export batched differently: fp32 is batch-invariant (≤ 1e-7 measured); int8
# quantizes a batch's activations with one scale, so batch-mates move a raw reward (9.5e-4
# between the ceiling's batch of 4 and the gateway's calls on ViT-B/32); OpenVINO's bf16 is
# batch-, thread- and sequence-length-invariant (0.0 measured on ViT-B/32).
SAME_EXPORT_TOLERANCE = {"fp32": 1e-4, "int8": 5e-3, "bf16": 1e-4}
SERVED = ("gateway", "grpc", "naive", "litserve")  # measured by the load generator
BASELINES = ("naive", "litserve")  # ratios are taken against these and the ceiling
WORKLOADS = ("rl", "cold")
TEXTNORM = ("on", "off")
CEILING_VARIANTS = ("pair", "image", "pair_textnorm")
LABELS = {
    "gateway": "gateway REST /v1/score",
    "grpc": "Triton gRPC `score`",
    "naive": "naive FastAPI + eager HF",
    "litserve": "LitServe (batch 32, 10 ms)",
    "ceiling": "ceiling: image + prompt",
    "ceiling:pair": "ceiling: image + prompt",
    "ceiling:image": "ceiling: image only",
    "ceiling:pair_textnorm": "ceiling: image + prompt + counting set",
}
POOL_SIZE = 16
RULE = {"rl": "auto", "cold": "counting"}  # the contrastive rule of TextNorm on, per workload


def all_cores() -> int:
    return len(os.sched_getaffinity(0))


_HANDED_OUT: set[int] = set()  # every port given to a server of this process


def fresh_ports(count: int) -> list[int]:
    """`count` loopback ports free now and never given to another server of this run (the
    OS may hand a just-closed port out again, to the next server that asks)."""
    for _ in range(100):
        ports = free_ports(count, "127.0.0.1")
        if not _HANDED_OUT.intersection(ports):
            _HANDED_OUT.update(ports)
            return ports
    raise RuntimeError(f"no {count} fresh loopback ports after 100 tries")


# -- servers ---------------------------------------------------------------------------------------
class _Process:
    """A server subprocess in its own session (process group): stopped by PID, group included."""

    name = "server"

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_http(self, url: str, timeout_s: float) -> None:
        """Until `url` answers 200 from this server's own process tree: a port picked free
        may be taken by the time the server binds it (once, LitServe's port was Triton's
        metrics port; LitServe failed to bind and the run measured Triton's 405s)."""
        deadline = time.monotonic() + timeout_s
        port = httpx.URL(url).port
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    owner = listener(port) if port is not None else None
                    if owner is None or in_tree(owner, self.proc.pid):
                        return
                    raise RuntimeError(
                        f"{self.name}: port {port} answers from pid {owner}, not from "
                        f"{self.name} (pid {self.proc.pid}): {self.log_tail()}"
                    )
            time.sleep(0.5)
        raise RuntimeError(
            f"{self.name} did not become ready in {timeout_s:.0f} s: {self.log_tail()}"
        )

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _stop(self, first: signal.Signals, group_first: bool, grace_s: float) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if group_first:
                    os.killpg(self.proc.pid, first)
                else:
                    self.proc.send_signal(first)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        # Whatever is left of its group (workers, the process itself after the grace time).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class Stack(_Process):
    """`reward-service serve` in a subprocess on free loopback ports (Triton + gateway).

    `repository`: serve that export as is; else `model` (None: the configured one) is exported
    by `serve` if needed. `env`: extra environment for the stack. With `wait` (the default) the
    constructor returns once `/readyz` is 200; else call `wait_ready()`."""

    name = "reward-service serve"

    def __init__(
        self,
        workdir: Path,
        ready_timeout_s: float = 240,
        *,
        model: str | None = None,
        repository: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.gateway_port, self.grpc_port, http, metrics = fresh_ports(4)
        full_env = dict(
            os.environ,
            REWARD_PORT=str(self.gateway_port),
            REWARD_TRITON_GRPC_PORT=str(self.grpc_port),
            REWARD_TRITON_HTTP_PORT=str(http),
            REWARD_TRITON_METRICS_PORT=str(metrics),
            **(env or {}),
        )
        cmd = [sys.executable, "-m", "service.cli", "serve"]
        if repository is not None:
            cmd += ["--repository", str(repository)]
        elif model is not None:
            cmd += ["--model", model]
        self.repository = repository
        self.triton_pid: int | None = None
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.ready_timeout_s = ready_timeout_s
        self._spawn(cmd, workdir / "serve.log", full_env)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        try:
            self._wait_http(self.url + "/readyz", self.ready_timeout_s)
        except RuntimeError:
            self.stop()
            raise
        text = self.log.read_text(errors="replace")
        if self.repository is None:
            found = re.search(r"repository (\S+)\)", text)
            self.repository = Path(found.group(1)) if found else None
        found = re.search(r"\(pid (\d+),", text)
        self.triton_pid = int(found.group(1)) if found else None

    def stop(self) -> None:
        # SIGTERM to the launcher alone: it stops Triton by PID (gracefully) before exiting.
        self._stop(signal.SIGTERM, group_first=False, grace_s=60)


class BaselineServer(_Process):
    """One of `loadtest.baselines` (`module`) serving `model` on a free loopback port."""

    def __init__(
        self,
        name: str,
        module: str,
        health: str,
        model: str,
        workdir: Path,
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.name = name
        (self.port,) = fresh_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.health = health
        cmd = [sys.executable, "-m", module, "--model", model, "--port", str(self.port)]
        if threads:
            cmd += ["--threads", str(threads)]
        if precision != "fp32":
            cmd += ["--precision", precision]
        self._spawn(cmd, workdir / f"{name}.log")

    def wait_ready(self, timeout_s: float) -> None:
        self._wait_http(self.url + self.health, timeout_s)

    def pause(self) -> None:
        """Freeze the server and its workers (SIGSTOP to its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process would not act on SIGTERM
        self._stop(signal.SIGTERM, group_first=True, grace_s=20)


@contextlib.contextmanager
def others_paused(servers: dict[str, Any], measured: str | None) -> Iterator[None]:
    """Every baseline server but `measured` frozen for the block (None: all of them).

    Idle, LitServe's workers poll their queues and kept 0.12 of a core busy (0.17 under
    load), taken from whichever system was measured beside it; an idle naive server used
    0.004. The stack is never paused: Triton's Python backend watches its stubs' heartbeats,
    and idle it used 0.014 (`cpu_time`'s ``idle servers`` role shows what is left)."""
    paused = [s for name, s in servers.items() if name in BASELINES and name != measured]
    for server in paused:
        server.pause()
    try:
        yield
    finally:
        for server in paused:
            server.resume()


# -- the workloads ---------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The images (224 px by default, encoded once) and prompts every system is sent."""

    prompts: list[str]  # the RL pool; image i shows prompt i's scene
    pngs: list[bytes]
    b64: list[str]
    arrays: list[np.ndarray]  # decoded uint8 [H, W, 3], for gRPC (a trainer sends tensors)

    @classmethod
    def build(cls, size: int = 224, n: int = POOL_SIZE, seed: int = 0) -> Corpus:
        from PIL import Image

        rng = np.random.default_rng(seed)
        scenes: dict[str, Scene] = {}
        while len(scenes) < n:
            scene = random_scene(rng, 1)
            scenes.setdefault(describe(Caption.of(scene)), scene)
        pngs = []
        for i, scene in enumerate(scenes.values()):
            buf = io.BytesIO()
            render(scene, seed=i, size=size).image.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        arrays = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]
        return cls(list(scenes), pngs, [base64.b64encode(p).decode() for p in pngs], arrays)


class ColdPrompts:
    """Prompts never seen before: each (colour, shape, background) triple once per suffix ``#n``
    with a random count, so no prompt repeats and none is another's counting-rule neighbour."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = np.random.default_rng(seed)
        triples = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))
        self.triples = [triples[i] for i in self.rng.permutation(len(triples))]
        self.issued = 0

    def next(self) -> str:
        n, k = divmod(self.issued, len(self.triples))
        self.issued += 1
        colour, shape, background = self.triples[k]
        count = int(self.rng.integers(MIN_COUNT, MAX_COUNT + 1))
        return f"{describe(Caption((Group(count, colour, shape),), background))} #{n}"


class Workload:
    """Which (image, prompt) items the next request carries."""

    def __init__(self, name: str, corpus: Corpus, cold: ColdPrompts, seed: int = 0) -> None:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
        self.name, self.corpus, self.cold = name, corpus, cold
        self.rng = np.random.default_rng(seed)
        self.repeats = name == "rl"  # prompts recur (client-side tokenisation may be cached)

    def items(self, n: int) -> list[tuple[int, str]]:
        if self.name == "rl":
            picks = self.rng.integers(len(self.corpus.prompts), size=n)
            return [(int(i), self.corpus.prompts[i]) for i in picks]
        return [(int(self.rng.integers(len(self.corpus.pngs))), self.cold.next()) for _ in range(n)]


@dataclass(frozen=True)
class Mode:
    """TextNorm for a request: off, or on with a contrastive rule."""

    textnorm: str  # "on" | "off"
    rule: str

    def gateway_json(self) -> str:
        if self.textnorm == "off":
            return '{"contrastive":[],"allow_missing":true}'
        return json.dumps({"rule": self.rule})

    def texts(self, prompt: str) -> list[str]:
        if self.textnorm == "off":
            return [prompt]
        return [prompt, *contrastive_prompts(prompt, self.rule)][:MAX_PROMPTS]


class RequestFailed(RuntimeError):
    pass


# -- load generator targets ------------------------------------------------------------------------
IDLE_CLOSE_S = 3.0  # the load generator's keep-alive: below every server's (uvicorn: 5 s)


class HttpTarget:
    """`POST /v1/score` of the gateway or a baseline (same JSON either way).

    aiohttp, not httpx: the load generator shares the machine with the servers, and httpx cost
    3.2 ms of CPU per 224-px request here against aiohttp's 0.44 ms (loadtest/README.md) — a
    quarter of two cores taken from whichever server was measured."""

    def __init__(self, name: str, url: str, corpus: Corpus, connections: int, timeout_s: float):
        import aiohttp

        self.name, self.url, self.corpus = name, url, corpus
        self.session = aiohttp.ClientSession(
            base_url=url,
            # Idle connections are dropped before uvicorn's default 5 s keep-alive (the
            # baselines keep it) can close one just as it is reused ("Server disconnected").
            connector=aiohttp.TCPConnector(limit=connections, keepalive_timeout=IDLE_CLOSE_S),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    def prepare(self, items: list[tuple[int, str]], mode: Mode, repeats: bool) -> tuple[bytes, int]:
        parts = ",".join(
            f'{{"image":"{self.corpus.b64[i]}","prompt":{json.dumps(p)}}}' for i, p in items
        )
        body = f'{{"items":[{parts}],"textnorm":{mode.gateway_json()}}}'
        return body.encode(), len(items)

    async def send(self, prepared: tuple[bytes, int]) -> list[float]:
        body, n = prepared
        async with self.session.post(
            "/v1/score", data=body, headers={"content-type": "application/json"}
        ) as response:
            text = await response.read()
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {text[:300].decode(errors='replace')}")
        results = json.loads(text)["results"]
        if len(results) != n:
            raise RequestFailed(f"{len(results)} results for {n} items")
        return [float(r["raw"]) for r in results]

    async def aclose(self) -> None:
        await self.session.close()


class GrpcTarget:
    """Triton's `score` model over KServe v2 gRPC (one channel, calls multiplexed)."""

    DTYPES = {
        "IMAGE": "UINT8",
        "INPUT_IDS": "INT64",
        "PROMPT_MASK": "BOOL",
        "TEXTNORM_SCALE": "FP32",
        "ENSEMBLE_LAMBDA": "FP32",
    }

    def __init__(self, url: str, tokenizer_file: Path, corpus: Corpus, timeout_s: float) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.grpcclient = grpcclient
        self.name, self.corpus, self.timeout_s = "grpc", corpus, timeout_s
        self.client = grpcclient.InferenceServerClient(url)
        self.tokenizer = ClipTokenizer(tokenizer_file)
        self._rows: dict[tuple[str, Mode], tuple[np.ndarray, int]] = {}

    def _prompt_rows(self, prompt: str, mode: Mode, repeats: bool) -> tuple[np.ndarray, int]:
        key = (prompt, mode)
        if key in self._rows:
            return self._rows[key]
        texts = mode.texts(prompt)
        rows = (self.tokenizer.encode(texts).ids, len(texts))
        if repeats:  # a trainer with a fixed prompt pool tokenises each prompt once
            self._rows[key] = rows
        return rows

    def prepare(self, items: list[tuple[int, str]], mode: Mode, repeats: bool) -> tuple[list, int]:
        n = len(items)
        ids = np.zeros((n, MAX_PROMPTS, CONTEXT_LENGTH), np.int64)
        mask = np.zeros((n, MAX_PROMPTS), bool)
        for row, (_, prompt) in enumerate(items):
            tokens, k = self._prompt_rows(prompt, mode, repeats)
            ids[row, :k] = tokens
            mask[row, :k] = True
        arrays = {
            "IMAGE": np.stack([self.corpus.arrays[i] for i, _ in items]),
            "INPUT_IDS": ids,
            "PROMPT_MASK": mask,
            "TEXTNORM_SCALE": np.full((n, 1), 5.0, np.float32),
            "ENSEMBLE_LAMBDA": np.ones((n, 1), np.float32),
        }
        inputs = []
        for name, value in arrays.items():
            tensor = self.grpcclient.InferInput(name, list(value.shape), self.DTYPES[name])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return inputs, n

    async def send(self, prepared: tuple[list, int]) -> list[float]:
        inputs, n = prepared
        result = await self.client.infer(
            "score",
            inputs,
            outputs=[self.grpcclient.InferRequestedOutput("RAW")],
            client_timeout=self.timeout_s,
        )
        raw = result.as_numpy("RAW").reshape(-1)
        if raw.shape[0] != n:
            raise RequestFailed(f"{raw.shape[0]} results for {n} items")
        return [float(x) for x in raw]

    async def aclose(self) -> None:
        await self.client.close()


# -- closed loops ----------------------------------------------------------------------------------
@dataclass
class _Record:
    start: float
    end: float
    ok: bool


@dataclass
class LoopResult:
    records: list[_Record]
    t0: float  # start of the first window
    t1: float  # end of the last window
    error_samples: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per role in the windows


async def closed_loop(
    target: HttpTarget | GrpcTarget,
    workload: Workload,
    mode: Mode,
    images: int,
    concurrency: int,
    seconds: float,
    runs: int,
    warmup_s: float,
    max_warmup_s: float,
    warmup_answers: int,
    cpu: CpuReader | None = None,
) -> LoopResult:
    """`concurrency` clients back to back: warm-up (`warmup_s` and `warmup_answers` answers per
    client, or `max_warmup_s`), `runs` windows of `seconds`, drain. `cpu`: read at the start and
    the end of the windows (the CPU seconds each role used in them are returned)."""
    records: list[_Record] = []
    samples: list[str] = []
    answered = [0] * concurrency
    stopping = False

    async def client(k: int) -> None:
        while not stopping:
            try:  # the harness's own work: a failure ends the point (no C - 1 measurement)
                prepared = target.prepare(workload.items(images), mode, workload.repeats)
            except Exception as exc:
                raise RuntimeError(f"client {k} could not prepare a request: {exc!r}") from exc
            start, ok = time.perf_counter(), True
            try:
                await target.send(prepared)
            except Exception as exc:  # every failure is counted (and a few kept), never dropped
                ok = False
                if len(samples) < 5:
                    samples.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            records.append(_Record(start, time.perf_counter(), ok))
            answered[k] += 1

    began = time.perf_counter()
    tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
    try:
        while True:
            elapsed = time.perf_counter() - began
            warm = min(answered) >= warmup_answers
            if elapsed >= warmup_s and (warm or elapsed >= max_warmup_s):
                break
            _raise_if_a_client_died(tasks)
            await asyncio.sleep(0.02)
        cpu_before = cpu() if cpu else {}
        t0 = time.perf_counter()
        await asyncio.sleep(seconds * runs)
        t1 = time.perf_counter()
        cpu_s = used_s(cpu_before, cpu()) if cpu else {}
    finally:
        stopping = True
        await asyncio.gather(*tasks, return_exceptions=True)  # drain: in-flight calls finish
    _raise_if_a_client_died(tasks)  # measured at fewer clients than C: no result
    return LoopResult(records, t0, t1, samples, cpu_s)


def _raise_if_a_client_died(tasks: Sequence[asyncio.Task]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"a load-generator client died: {task.exception()}")


def _percentiles(latencies_s: Sequence[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(latencies_s) * 1000, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def summarise(loop: LoopResult, runs: int, images: int) -> dict[str, Any]:
    """Per-window rates (fractional credit), their medians, pooled latencies, all errors."""
    edges = np.linspace(loop.t0, loop.t1, runs + 1)
    windows = []
    for a, b in itertools.pairwise(edges):
        credit = 0.0
        completed = errors = 0
        for r in loop.records:
            if a < r.end <= b:
                completed += r.ok
                errors += not r.ok
            if r.ok:
                overlap = min(r.end, b) - max(r.start, a)
                if overlap > 0:
                    credit += overlap / max(r.end - r.start, 1e-9)
        span = float(b - a)
        windows.append(
            {
                "seconds": span,
                "img_s": credit * images / span,
                "req_s": credit / span,
                "completed": completed,
                "errors": errors,
            }
        )
    measured = [r.end - r.start for r in loop.records if r.ok and loop.t0 <= r.start < loop.t1]
    return {
        "img_s": statistics.median(w["img_s"] for w in windows),
        "req_s": statistics.median(w["req_s"] for w in windows),
        **_percentiles(measured),
        "requests": len(measured),
        "errors": sum(not r.ok for r in loop.records),
        "error_samples": loop.error_samples,
        "windows": windows,
        **_cpu_summary(loop, sum(w["img_s"] * w["seconds"] for w in windows)),
    }


def _cpu_summary(loop: LoopResult, images_in_windows: float) -> dict[str, Any]:
    """Per role: CPU milliseconds per image answered in the windows, and cores kept busy."""
    if not loop.cpu_s or images_in_windows <= 0:
        return {"cpu_ms_per_img": {}, "cpu_cores": {}}
    span = loop.t1 - loop.t0
    return {
        "cpu_ms_per_img": {r: s * 1000 / images_in_windows for r, s in loop.cpu_s.items()},
        "cpu_cores": {r: s / span for r, s in loop.cpu_s.items()},
    }


# -- the in-process ceiling ------------------------------------------------------------------------
class Ceiling:
    """The exported image and text ONNX towers in this process, `threads` threads, under the
    runtime the export serves them with (ONNX Runtime, or OpenVINO for bf16 towers)."""

    def __init__(self, repository: Path, threads: int) -> None:
        from service.onnx_models import open_served_model

        self.threads = threads
        self.image = open_served_model(repository, "image_encoder", threads)
        self.text = open_served_model(repository, "text_encoder", threads)
        self.tokenizer = ClipTokenizer(repository / "tokenizer.json")
        self.image_input = self.image.input_names[0]
        self.text_input = self.text.input_names[0]

    def embed_images(self, pngs: Sequence[bytes]) -> np.ndarray:
        from PIL import Image

        batch = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs])
        return self.image.run({self.image_input: batch})[0]

    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer.encode(list(prompts))
        # the text graph's sequence length is symbolic: the batch's longest prompt only
        ids = tokens.ids[:, : int(min(tokens.lengths.max(), tokens.ids.shape[1]))]
        return self.text.run({self.text_input: ids})[0]

    def raw(self, pngs: Sequence[bytes], prompts: Sequence[str]) -> list[float]:
        return [float(x) for x in (self.embed_images(pngs) * self.embed_texts(prompts)).sum(-1)]

    def measure(
        self,
        variant: str,
        batch: int,
        corpus: Corpus,
        seconds: float,
        runs: int,
        earlier: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """pairs/s of `variant` at `batch` (median of `runs` windows, plus those of `earlier`,
        a previous pass), and per-call latency."""
        picks = itertools.cycle(range(len(corpus.pngs)))

        def call() -> None:
            idx = [next(picks) for _ in range(batch)]
            pngs = [corpus.pngs[i] for i in idx]
            if variant == "image":
                self.embed_images(pngs)
                return
            prompts = [corpus.prompts[i] for i in idx]
            if variant == "pair_textnorm":
                prompts = [t for p in prompts for t in Mode("on", "counting").texts(p)]
            self.embed_images(pngs)
            self.embed_texts(prompts)

        call()  # warm-up
        windows = list(earlier["windows"]) if earlier else []
        latencies = list(earlier["latencies_s"]) if earlier else []
        for _ in range(runs):
            n, start = 0, time.perf_counter()
            while True:
                t = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - t)
                n += batch
                if time.perf_counter() - start >= seconds:
                    break
            windows.append(n / (time.perf_counter() - start))
        return {
            "variant": variant,
            "batch": batch,
            "pairs_s": statistics.median(windows),
            **_percentiles(latencies),
            "windows": windows,
            "latencies_s": latencies,
        }


def texts_per_pair_textnorm(corpus: Corpus) -> float:
    """Mean prompts encoded per pair by the `pair_textnorm` ceiling (prompt + counting set)."""
    return statistics.mean(len(Mode("on", "counting").texts(p)) for p in corpus.prompts)


# -- ratios ----------------------------------------------------------------------------------------
def best_ceiling(ceiling: Sequence[dict[str, Any]], variant: str = "pair") -> float | None:
    rates = [c["pairs_s"] for c in ceiling if c["variant"] == variant]
    return max(rates) if rates else None


def same_work_variant(system: str, workload: str, textnorm: str) -> str:
    """The ceiling variant that does what `system` does per image at such a point: the stack
    has every rl prompt cached (images only) and encodes a cold prompt's counting set with
    TextNorm on; the baselines encode one prompt per image, always."""
    if system in BASELINES or system == "ceiling":
        return "pair"
    if workload == "rl":
        return "image"
    return "pair_textnorm" if textnorm == "on" else "pair"


def compute_ratios(
    points: Sequence[dict[str, Any]], ceiling: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """img/s of every system ÷ each baseline's at the same point, ÷ the best pair ceiling (the
    issue's reference), and ÷ the best ceiling doing the same work (`same_work_variant`)."""
    key = ("workload", "images", "textnorm", "concurrency")
    at = {(p["system"], *(p[k] for k in key)): p for p in points}
    best = best_ceiling(ceiling)
    out = []
    for p in points:
        where = tuple(p[k] for k in key)
        for baseline in BASELINES:
            base = at.get((baseline, *where))
            if baseline == p["system"] or base is None or not base["img_s"]:
                continue
            out.append(
                {
                    "system": p["system"],
                    **dict(zip(key, where, strict=True)),
                    "baseline": baseline,
                    "ratio": p["img_s"] / base["img_s"],
                }
            )
        if best:
            out.append(
                {
                    "system": p["system"],
                    **dict(zip(key, where, strict=True)),
                    "baseline": "ceiling",
                    "ratio": p["img_s"] / best,
                }
            )
        variant = same_work_variant(p["system"], p["workload"], p["textnorm"])
        if same := best_ceiling(ceiling, variant):
            out.append(
                {
                    "system": p["system"],
                    **dict(zip(key, where, strict=True)),
                    "baseline": "ceiling_same_work",
                    "variant": variant,
                    "ratio": p["img_s"] / same,
                }
            )
    # The ceiling at batch = images × C against the baselines at the same point.
    for c in ceiling:
        if c["variant"] != "pair":
            continue
        for p in points:
            if (
                p["system"] in BASELINES
                and p["images"] * p["concurrency"] == c["batch"]
                and p["img_s"]
            ):
                out.append(
                    {
                        "system": "ceiling",
                        **{k: p[k] for k in key},
                        "baseline": p["system"],
                        "ratio": c["pairs_s"] / p["img_s"],
                    }
                )
    return out


# -- the run ---------------------------------------------------------------------------------------
Progress = Callable[[str, int, int], None]  # (what is running, steps done, steps in all)


@dataclass(frozen=True)
class Point:
    workload: str
    images: int
    textnorm: str
    concurrency: int


def _points(workloads, images, textnorm, concurrency) -> list[Point]:
    return [
        Point(w, i, t, c) for w in workloads for i in images for t in textnorm for c in concurrency
    ]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "onnxruntime",
        "torch",
        "transformers",
        "litserve",
        "fastapi",
        "uvicorn",
        "httpx",
        "tritonclient",
        "nvidia-pytriton",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _resolve_model(model: str | None):
    """The settings `serve` would use for `model` (None: the configured default, with its head)."""
    from service.settings import get_settings

    settings = get_settings()
    if model is None:
        return settings
    same = Path(model).expanduser().resolve() == Path(settings.model).expanduser().resolve()
    if same:
        return settings
    return settings.model_copy(update={"model": model, "head": None})


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit here, so `finally` stops every server."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check(values: Sequence, allowed: Sequence, what: str) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"--{what}: {bad or 'nothing'} not in {', '.join(map(str, allowed))}")


def bench_serving(
    workdir: Path,
    *,
    model: str | None = None,
    systems: Sequence[str] = SYSTEMS,
    workloads: Sequence[str] = ("rl", "cold"),
    images: Sequence[int] = (1,),
    concurrency: Sequence[int] = (1, 8, 32),
    textnorm: Sequence[str] = ("on",),
    seconds: float = 5.0,
    runs: int = 3,
    warmup_s: float = 2.0,
    warmup_answers: int = 3,
    image_px: int = 224,
    request_timeout_s: float = 900.0,
    ready_timeout_s: float = 900.0,
    baseline_threads: int | None = None,
    precision: str | None = None,
    baseline_precision: str = "fp32",
    pause_idle: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every system at every point; the results as a JSON-ready dict (see module doc).

    `workdir` receives the servers' logs. Servers are started once, in parallel, and always
    stopped before returning (or raising). `baseline_threads`: torch threads of the baselines
    (None: every core). `precision`: the export's towers, fp32, int8 or bf16 (None: the settings');
    `baseline_precision`: the baselines' PyTorch model, fp32, int8 (torch dynamic
    quantization of its Linear layers) or bf16 (CPU autocast). `pause_idle`: freeze the
    baselines not measured at a point, and all of them while the ceiling is (`others_paused`)."""
    _check(systems, SYSTEMS, "systems")
    _check(workloads, WORKLOADS, "workloads")
    _check(textnorm, TEXTNORM, "textnorm")
    if not images or min(images) < 1 or not concurrency or min(concurrency) < 1:
        raise ValueError("--images and --concurrency take positive integers")
    if seconds <= 0 or runs < 1:
        raise ValueError("--seconds must be positive and --runs at least 1")
    textnorm = [t for t in TEXTNORM if t in textnorm]  # "on" first: baselines reuse it for "off"
    workdir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda *_: None)
    settings = _resolve_model(model)
    if precision is not None:
        _check([precision], PRECISIONS, "precision")
        settings = _exporting(settings, precision)
    _check([baseline_precision], PRECISIONS, "baseline-precision")
    points = _points(workloads, images, textnorm, concurrency)
    served = [s for s in SERVED if s in systems]
    # Baselines ignore TextNorm: one measurement per point serves both settings.
    steps = sum(
        1
        for p in points
        for s in served
        if not (s in BASELINES and p.textnorm == "off" and "on" in textnorm)
    )
    plan = _ceiling_plan(systems, concurrency, workloads, textnorm, images)
    ceiling_steps = len(plan) * min(runs, 2)
    total = steps + ceiling_steps
    meta: dict[str, Any] = {
        "model": settings.model,
        "head": settings.head,
        "precision": settings.precision,
        "baseline_precision": baseline_precision,
        "systems": list(systems),
        "workloads": list(workloads),
        "images": list(images),
        "concurrency": list(concurrency),
        "textnorm": list(textnorm),
        "seconds": seconds,
        "runs": runs,
        "warmup_s": warmup_s,
        "warmup_answers": warmup_answers,
        "pause_idle": pause_idle,
        "image_px": image_px,
        "rules": dict(RULE),
        "cores": all_cores(),
        "baseline_threads": baseline_threads or all_cores(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    servers: dict[str, Any] = {}
    with _sigterm_unwinds():
        try:
            repository = None
            if set(SERVED_EXPORT) & set(systems):
                from service.launcher import ensure_repository, export_precision

                report("exporting the model (cached by content)", 0, total)
                repository = ensure_repository(settings)
                meta["repository"] = str(repository)
                meta["precision"] = export_precision(repository)  # what is served
                prov = json.loads((repository / "provenance.json").read_text())
                meta["cache_key"] = prov.get("cache_key")
                # what is served (REWARD_REPOSITORY may hold another model than the settings')
                meta["model"] = prov["model"]["source"]
                meta["head"] = (prov.get("head") or {}).get("source")
            report("starting servers", 0, total)
            if set(STACK_SYSTEMS) & set(systems):
                servers["stack"] = Stack(
                    workdir,
                    ready_timeout_s,
                    repository=repository,
                    env={"REWARD_API_KEYS": "[]"},
                    wait=False,
                )
            if "naive" in systems:
                servers["naive"] = BaselineServer(
                    "naive",
                    NAIVE_MODULE,
                    "/healthz",
                    settings.model,
                    workdir,
                    baseline_threads,
                    precision=baseline_precision,
                )
            if "litserve" in systems:
                servers["litserve"] = BaselineServer(
                    "litserve",
                    LITSERVE_MODULE,
                    "/health",
                    settings.model,
                    workdir,
                    baseline_threads,
                    precision=baseline_precision,
                )
            for name, server in servers.items():
                report(f"waiting for {name}", 0, total)
                if name == "stack":
                    server.wait_ready()
                else:
                    server.wait_ready(ready_timeout_s)
            meta["pids"] = {name: server.proc.pid for name, server in servers.items()}
            if "stack" in servers and servers["stack"].triton_pid:
                meta["pids"]["tritonserver"] = servers["stack"].triton_pid
            corpus = Corpus.build(image_px)
            meta["pool_prompts"] = corpus.prompts
            meta["png_bytes_mean"] = statistics.mean(len(p) for p in corpus.pngs)
            result = asyncio.run(
                _measure(
                    servers=servers,
                    systems=systems,
                    repository=repository,
                    corpus=corpus,
                    points=points,
                    textnorm=textnorm,
                    seconds=seconds,
                    runs=runs,
                    warmup_s=warmup_s,
                    warmup_answers=warmup_answers,
                    pause_idle=pause_idle,
                    request_timeout_s=request_timeout_s,
                    report=report,
                    total=total,
                )
            )
        finally:
            for server in reversed(list(servers.values())):
                server.stop()
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["meta"] = meta
    reference = result["parity"]["reference"]
    result["parity"]["tolerance"] = {
        name: parity_tolerance(name, reference, meta["precision"], baseline_precision)
        for name in result["parity"]["raw"]
    }
    result["ratios"] = compute_ratios(result["points"], result["ceiling"])
    return result


def _exporting(settings: Any, precision: str) -> Any:
    """The settings that export `precision` towers. A repository (REWARD_REPOSITORY) is served
    as it is: a precision other than its own is refused before anything starts."""
    if not settings.repository:
        return settings.model_copy(update={"precision": precision})
    from service.launcher import export_precision

    repo = Path(settings.repository)
    served = export_precision(repo) if (repo / "provenance.json").is_file() else precision
    if served != precision:
        raise ValueError(
            f"--precision {precision}: the repository {repo} (REWARD_REPOSITORY) serves "
            f"{served} towers; export one with --precision {precision} or leave --precision out"
        )
    return settings


def parity_tolerance(
    system: str, reference: str, precision: str, baseline_precision: str = "fp32"
) -> float:
    """How far a system's raw reward may be from the parity reference's (the gateway when it
    runs): two systems running the export (gateway, gRPC, the ceiling) by its precision's batch
    effect; the two PyTorch baselines by their precision's tolerance to fp32 (torch's dynamic
    int8 moves a reward by 7.0e-3 with its batch-mates on the shipped model: more than ONNX
    Runtime's); the export against a baseline by the coarser of the two precisions'."""
    if system in SERVED_EXPORT and reference in SERVED_EXPORT:
        return SAME_EXPORT_TOLERANCE[precision]
    if system in BASELINES and reference in BASELINES:
        return RAW_TOLERANCE[baseline_precision]
    return max(RAW_TOLERANCE[precision], RAW_TOLERANCE[baseline_precision])


def _ceiling_plan(systems, concurrency, workloads, textnorm, images=(1,)) -> list[tuple[str, int]]:
    """(variant, batch) of the ceiling: batch = every concurrency level, and images × C up to
    the largest level (the images in flight at a multi-image point)."""
    if "ceiling" not in systems:
        return []
    variants = ["pair", "image"]
    if "cold" in workloads and "on" in textnorm:
        variants.append("pair_textnorm")
    top = max(concurrency)
    batches = set(concurrency) | {i * c for i in images for c in concurrency if i * c <= top}
    return [(v, b) for v in variants for b in sorted(batches)]


async def _measure(
    *,
    servers: dict[str, Any],
    systems: Sequence[str],
    repository: Path | None,
    corpus: Corpus,
    points: list[Point],
    textnorm: Sequence[str],
    seconds: float,
    runs: int,
    warmup_s: float,
    warmup_answers: int,
    pause_idle: bool,
    request_timeout_s: float,
    report: Progress,
    total: int,
) -> dict[str, Any]:
    connections = max(p.concurrency for p in points) + 4
    targets: dict[str, HttpTarget | GrpcTarget] = {}
    if "gateway" in systems:
        targets["gateway"] = HttpTarget(
            "gateway", servers["stack"].url, corpus, connections, request_timeout_s
        )
    if "grpc" in systems:
        assert repository is not None
        targets["grpc"] = GrpcTarget(
            servers["stack"].grpc_url, repository / "tokenizer.json", corpus, request_timeout_s
        )
    for name in BASELINES:
        if name in systems:
            targets[name] = HttpTarget(
                name, servers[name].url, corpus, connections, request_timeout_s
            )
    ceiling = Ceiling(repository, all_cores()) if "ceiling" in systems and repository else None
    pids = {name: server.proc.pid for name, server in servers.items()}
    cpu_readers: dict[str, CpuReader] = {name: point_reader(name, pids) for name in targets}

    def paused(measured: str | None) -> contextlib.AbstractContextManager:
        return others_paused(servers, measured) if pause_idle else contextlib.nullcontext()

    done = 0
    try:
        parity = await _parity(targets, ceiling, corpus)
        # The ceiling's windows are split between a pass before the points and one after
        # (drift over a long run then moves the ceiling and the systems alike).
        plan = _ceiling_plan(
            systems,
            sorted({p.concurrency for p in points}),
            sorted({p.workload for p in points}),
            textnorm,
            sorted({p.images for p in points}),
        )
        before = (runs + 1) // 2
        ceiling_results: list[dict[str, Any]] = []
        if ceiling is not None:
            for variant, batch in plan:
                report(f"ceiling {variant} batch {batch}", done, total)
                with paused(None):
                    measure = ceiling.measure(variant, batch, corpus, seconds, before)
                ceiling_results.append(measure)
                done += 1
        cold = ColdPrompts()
        measured: list[dict[str, Any]] = []
        for point in points:
            mode = Mode(point.textnorm, RULE[point.workload])
            for name, target in targets.items():
                shared = name in BASELINES and point.textnorm == "off" and "on" in textnorm
                if shared:
                    source = next(
                        m
                        for m in measured
                        if m["system"] == name
                        and (m["workload"], m["images"], m["concurrency"])
                        == (point.workload, point.images, point.concurrency)
                    )
                    measured.append({**source, "textnorm": "off", "measured_under": "on"})
                    continue
                report(
                    f"{name} · {point.workload} · {point.images} img · TextNorm "
                    f"{point.textnorm} · C={point.concurrency}",
                    done,
                    total,
                )
                workload = Workload(point.workload, corpus, cold, seed=point.concurrency)
                primed_errors: list[str] = []
                with paused(name):
                    if point.workload == "rl" and name in STACK_SYSTEMS:
                        primed_errors = await _prime(target, corpus, mode)
                    loop = await closed_loop(
                        target,
                        workload,
                        mode,
                        point.images,
                        point.concurrency,
                        seconds,
                        runs,
                        warmup_s,
                        max_warmup_s=request_timeout_s,
                        warmup_answers=warmup_answers,
                        cpu=cpu_readers[name],
                    )
                summary = summarise(loop, runs, point.images)
                summary["errors"] += len(primed_errors)
                summary["error_samples"] = [*primed_errors, *summary["error_samples"]][:5]
                measured.append(
                    {
                        "system": name,
                        "workload": point.workload,
                        "images": point.images,
                        "textnorm": point.textnorm,
                        "concurrency": point.concurrency,
                        "rule": mode.rule if point.textnorm == "on" else None,
                        "measured_under": point.textnorm,
                        **summary,
                    }
                )
                done += 1
        if ceiling is not None and runs > before:
            for k, (variant, batch) in enumerate(plan):
                report(f"ceiling {variant} batch {batch} (second pass)", done, total)
                with paused(None):
                    ceiling_results[k] = ceiling.measure(
                        variant, batch, corpus, seconds, runs - before, ceiling_results[k]
                    )
                done += 1
        for c in ceiling_results:
            del c["latencies_s"]
        report("done", done, total)
        return {
            "parity": parity,
            "ceiling": ceiling_results,
            "ceiling_threads": ceiling.threads if ceiling else None,
            "texts_per_pair_textnorm": texts_per_pair_textnorm(corpus),
            "cold_prompts_issued": cold.issued,
            "points": measured,
        }
    finally:
        for target in targets.values():
            await target.aclose()


async def _prime(target: HttpTarget | GrpcTarget, corpus: Corpus, mode: Mode) -> list[str]:
    """Send every pool prompt once (RL steady state: caches hold the pool); one line per
    failed request returned (counted as the point's errors, like the measured ones)."""
    errors: list[str] = []
    for i, prompt in enumerate(corpus.prompts):
        try:
            await target.send(target.prepare([(i, prompt)], mode, True))
        except Exception as exc:
            errors.append(f"priming: {type(exc).__name__}: {str(exc)[:300]}")
    return errors


async def _parity(
    targets: dict[str, HttpTarget | GrpcTarget], ceiling: Ceiling | None, corpus: Corpus
) -> dict[str, Any]:
    """The raw rewards of the same 4 (image, prompt) items from every system."""
    items = [(i, corpus.prompts[i]) for i in range(min(4, len(corpus.prompts)))]
    mode = Mode("on", "auto")
    raws: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for name, target in targets.items():
        try:
            raws[name] = await target.send(target.prepare(items, mode, False))
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if ceiling is not None:
        raws["ceiling"] = ceiling.raw([corpus.pngs[i] for i, _ in items], [p for _, p in items])
    reference = "gateway" if "gateway" in raws else next(iter(raws), None)
    diffs = {}
    if reference is not None:
        ref = np.asarray(raws[reference])
        diffs = {n: float(np.abs(np.asarray(v) - ref).max()) for n, v in raws.items()}
    return {
        "items": [p for _, p in items],
        "reference": reference,
        "raw": raws,
        "max_abs_diff": diffs,
        "errors": errors,
    }


def parse_csv(
    text: str, what: str, *, integers: bool = False, allowed: Sequence[str] | None = None
) -> list:
    """A comma-separated option value as a list (of positive ints with `integers`; of words
    from `allowed` when given)."""
    if integers:
        return integer_list(text, f"--{what}", minimum=1)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--{what}: give at least one value")
    if allowed is not None:
        _check(parts, allowed, what)
    return parts
