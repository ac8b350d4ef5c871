"""The runtime roles: `reward-service gateway` and `reward-service serve` (torch-free).

`run_gateway(settings)`: the gateway against a Triton it did not start (`triton_url`), for the
export in `repository` (its provenance.json and tokenizer.json). Triton may come up later: the
gateway starts anyway and `/readyz` stays 503, with the reason, until Triton serves exactly the
export the provenance names. `run_gateway(settings, onnx=True)`: the same gateway over the
export's ONNX files under ONNX Runtime in process (`OnnxBackend`), where no tritonserver runs.

`serve(settings)`, the one-host default (`make serve`):
1. With `repository` set, use it as is (the exporter never runs). Otherwise export the
   configured checkpoint (+ head) into `repositories_dir/<name>` in a subprocess — a no-op when
   the content-addressed cache key is unchanged, and it keeps torch out of this process.
2. Start the bundled `tritonserver` on loopback ports (`TritonServer`), wait until it is ready.
3. Serve the gateway with uvicorn; uvicorn turns SIGINT/SIGTERM into a graceful shutdown, after
   which Triton is stopped by PID (its whole process group: no orphans).
A watchdog thread restarts Triton on the same ports if it dies, if it hangs (N consecutive
failed readiness probes: `triton_probe_*` settings), or if one of its Python-backend stubs
died (Triton still reports ready then, and fails every call to that model), with a backoff;
meanwhile the gateway answers 503/504 with Retry-After and `/readyz` is false, and service
resumes without restarting the gateway. Restarts are counted in `/metrics` by cause
(`reward_gateway_triton_restarts_total`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("reward_service.launcher")


def repository_dir(settings: Settings) -> Path:
    """One folder per (model, head, batch) configuration; export keeps it up to date."""
    tag = json.dumps(
        [
            settings.model,
            settings.head,
            settings.calibration,
            *settings.members,
            settings.max_batch,
            settings.textnorm_scale,
            settings.ensemble_lambda,
            settings.triton_queue_delay_us,
            settings.triton_onnx_threads,
            settings.triton_instances,
            # fp32 adds nothing: folders exported before the setting existed keep their names
            *([settings.precision] if settings.precision != "fp32" else []),
        ]
    )
    name = Path(settings.model.rstrip("/")).name or "model"
    return (
        Path(settings.repositories_dir) / f"{name}-{hashlib.sha256(tag.encode()).hexdigest()[:12]}"
    )


def export_precision(repo: Path) -> str:
    """The precision of an export's towers, as its provenance.json records it (`export
    --precision`; exports from before the option are fp32)."""
    prov = json.loads((Path(repo) / "provenance.json").read_text())
    return (prov.get("options") or {}).get("precision", "fp32")


def warn_ignored_env(settings: Settings) -> None:
    """Say which REWARD_* variables the server ignores: a typo must not pass silently (a
    misspelt REWARD_API_KEYS would serve without auth)."""
    from service.settings import unknown_env

    for name in unknown_env():
        log.warning("%s is not a setting and is ignored (README: settings)", name)
    if os.environ.get("REWARD_API_KEY") and not settings.api_keys:
        log.warning(
            "REWARD_API_KEY is the key client commands send; the gateway's keys are "
            "REWARD_API_KEYS, and none is set: /v1 needs no key"
        )


def warn_ignored_export_settings(settings: Settings, repo: Path) -> None:
    """Say which export settings a given repository overrides: an existing export serves the
    members and the tower precision it was exported with, whatever REWARD_MEMBERS and
    REWARD_PRECISION say."""
    if settings.members:
        log.warning(
            "REWARD_MEMBERS is ignored with a repository: %s serves the members it was "
            "exported with (provenance.json)",
            repo,
        )
    served = export_precision(repo)
    if "precision" in settings.model_fields_set and settings.precision != served:
        log.warning(
            "REWARD_PRECISION=%s is ignored with a repository: %s serves %s towers "
            "(provenance.json options.precision); export with --precision %s to serve those",
            settings.precision,
            repo,
            served,
            settings.precision,
        )


def ensure_repository(settings: Settings) -> Path:
    """The repository to serve: `settings.repository` as is, else an export (if needed)."""
    if settings.repository:
        repo = Path(settings.repository)
        if not (repo / "provenance.json").is_file():
            raise ValueError(f"not an exported repository (no provenance.json): {repo}")
        target = (json.loads((repo / "provenance.json").read_text()).get("options") or {}).get(
            "target"
        )
        if target == "gpu":
            raise ValueError(
                f"{repo} is a GPU-flavour export: serve it with the NGC tritonserver on a GPU "
                "node after `reward-service build-engines` (the bundled server runs CPU exports)"
            )
        warn_ignored_export_settings(settings, repo)
        return repo
    if importlib.util.find_spec("torch") is None:
        raise ValueError(
            "exporting needs torch, which is not installed: pip install "
            "'textnorm-reward-service[export]', or serve an exported one with --repository DIR"
        )
    out = repository_dir(settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-P",  # not the current directory first on sys.path: a user's own `models/` must not win
        "-m",
        "service.cli",
        "export",
        "--out",
        str(out),
        "--model",
        settings.model,
        "--max-batch",
        str(settings.max_batch),
        "--queue-delay-us",
        str(settings.triton_queue_delay_us),
        "--threads",
        str(settings.triton_onnx_threads),
        "--instances",
        str(settings.triton_instances),
        "--precision",
        settings.precision,
    ]
    cmd += ["--head", settings.head] if settings.head else ["--no-head"]
    if not settings.calibration:
        cmd.append("--no-calibration")  # else export reads the setting (the shipped default
        # applies to the checkpoint it was calibrated for only)
    for member in settings.members:
        cmd += ["--member", member]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:  # the export's own one-line "error: ..." becomes ours
        last = (result.stderr.strip().splitlines() or ["export failed"])[-1]
        raise ValueError(last.removeprefix("error: "))
    log.info(result.stdout.strip())
    return out


def curl_example(settings: Settings) -> str:
    auth = ' -H "Authorization: Bearer $REWARD_API_KEY"' if settings.api_keys else ""
    return (
        f"curl -s http://{settings.host}:{settings.port}/v1/score{auth} -H 'Content-Type: "
        'application/json\' -d "{\\"items\\": [{\\"image\\": \\"$(base64 -w0 image.png)\\", '
        '\\"prompt\\": \\"three blue triangles on a grass background\\"}]}"'
    )


RESTART_CAUSES = ("exited", "hung", "stub_died")
# Triton's "stub not healthy" answers, counted over this many seconds: a stuck stub keeps
# failing every call to its model, so a trainer's retries bring reports well within it.
STUB_REPORT_WINDOW_S = 60.0


class TritonWatchdog(threading.Thread):
    """Supervise the bundled Triton: restart it when it exits or hangs; stop() before stopping
    Triton.

    Every `interval_s` it checks the process; a running process must also answer
    `GET /v2/health/ready` within `probe_timeout_s`. After `failures_before_restart`
    consecutive failed probes (a SIGSTOP-ed or deadlocked server: the process is there, the
    answers are not) it is killed (SIGKILL of its process group: a stopped process ignores
    SIGTERM) and started again on the same ports. A ready server must also keep every
    Python-backend stub it started (counted with psutil): Triton 2.51 does not restart a stub
    that died (killed for memory, a crash) and keeps answering ready while every call to that
    model fails, so fewer stubs than before is a restart too; a stopped stub counts as gone,
    and so does a stub Triton calls "not healthy" (a stuck one) `failures_before_restart`
    times within `STUB_REPORT_WINDOW_S` (the gateway reports each such answer through
    `report_unhealthy_stub`). A failed restart is retried after
    `backoff_s`, doubling up to `max_backoff_s`. Each restart calls `on_restart(cause)` with
    cause "exited", "hung" or "stub_died" (the launcher counts them in /metrics).

    It must stay alive as long as Triton runs: the server gets SIGKILL when the thread that
    started it ends (`TritonServer(die_with_parent=True)`)."""

    def __init__(
        self,
        server,
        interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        *,
        probe_timeout_s: float = 2.0,
        failures_before_restart: int = 3,
        backoff_s: float | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="triton-watchdog", daemon=True)
        self.server, self.interval_s, self.max_backoff_s = server, interval_s, max_backoff_s
        self.probe_timeout_s = probe_timeout_s
        self.failures_before_restart = failures_before_restart
        self.backoff_s = interval_s if backoff_s is None else backoff_s
        self.on_restart = on_restart
        self._stopping = threading.Event()
        self.restarts = 0
        self.restarts_by_cause = dict.fromkeys(RESTART_CAUSES, 0)
        self.failed_probes = 0  # consecutive, of the running server
        self.stubs: int | None = None  # Python-backend stubs the running server has had
        self.restart_waits: list[float] = []  # the backoff after each failed restart
        self._stub_reports: collections.deque[float] = collections.deque()  # monotonic times

    @classmethod
    def from_settings(
        cls, server, settings: Settings, on_restart: Callable[[str], None] | None = None
    ) -> TritonWatchdog:
        return cls(
            server,
            interval_s=settings.triton_probe_interval_s,
            max_backoff_s=settings.triton_restart_backoff_max_s,
            probe_timeout_s=settings.triton_probe_timeout_s,
            failures_before_restart=settings.triton_probe_failures,
            backoff_s=settings.triton_restart_backoff_s,
            on_restart=on_restart,
        )

    def run(self) -> None:
        try:
            self._watch()
        finally:
            if self._stopping.is_set():
                self.server.stop()  # from the thread that (re)started it, before it exits

    def _cause(self) -> str | None:
        """Why Triton needs a restart now ("exited", "hung"), or None while it is healthy."""
        if not self.server.running():
            return "exited"
        if self.server.is_ready(timeout=self.probe_timeout_s):
            self.failed_probes = 0
            return self._stub_cause()
        self.failed_probes += 1
        log.warning(
            "tritonserver (pid %s) failed readiness probe %d of %d",
            self.server.pid,
            self.failed_probes,
            self.failures_before_restart,
        )
        if self.failed_probes < self.failures_before_restart:
            return None
        return "hung"

    def report_unhealthy_stub(self) -> None:
        """Triton answered a call with "stub process … is not healthy" (any thread)."""
        self._stub_reports.append(time.monotonic())

    def _stub_cause(self) -> str | None:
        """ "stub_died" when the ready server has fewer live stubs than it has had, or Triton
        called a stub not healthy `failures_before_restart` times in the window."""
        now, reports = time.monotonic(), self._stub_reports
        while reports and reports[0] < now - STUB_REPORT_WINDOW_S:
            reports.popleft()
        if len(reports) >= self.failures_before_restart:
            log.warning(
                "tritonserver (pid %s) answered %d calls in %.0f s with a Python-backend stub "
                "not healthy: a stub is stuck and Triton does not recover it",
                self.server.pid,
                len(reports),
                STUB_REPORT_WINDOW_S,
            )
            return "stub_died"
        live = self.server.python_stubs()
        if live is None or self.stubs is None or live >= self.stubs:
            self.stubs = live if self.stubs is None or live is None else max(live, self.stubs)
            return None
        log.warning(
            "tritonserver (pid %s) has %d of its %d Python-backend stubs left: a model "
            "instance died and Triton does not restart it",
            self.server.pid,
            live,
            self.stubs,
        )
        return "stub_died"

    def _watch(self) -> None:
        wait = self.interval_s
        backoff = self.backoff_s
        pending: str | None = None  # the cause of a restart that has not succeeded yet
        self.stubs = self.server.python_stubs()  # the started server's, ready: all of them
        while not self._stopping.wait(wait):
            wait = self.interval_s
            cause = pending or self._cause()
            if cause is None:
                continue
            if cause in ("hung", "stub_died") and self.server.running():
                log.warning(
                    "tritonserver (pid %s) is %s: killing it",
                    self.server.pid,
                    f"hung ({self.failed_probes} failed readiness probes)"
                    if cause == "hung"
                    else "missing a healthy Python-backend stub",
                )
                self.server.kill()
            elif pending is None:
                log.warning("tritonserver is not running; restarting it")
            try:
                self.server.start()
            except Exception as exc:  # keep watching; the gateway answers 503 meanwhile
                log.error("tritonserver restart failed: %s", str(exc).splitlines()[0])
                pending, wait = cause, backoff
                self.restart_waits.append(wait)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            pending, self.failed_probes, backoff = None, 0, self.backoff_s
            self._stub_reports.clear()  # answers of the server just replaced
            self.stubs = self.server.python_stubs()  # start() returned: it is ready
            self.restarts += 1
            self.restarts_by_cause[cause] += 1
            log.info("tritonserver restarted (pid %s); cause: %s", self.server.pid, cause)
            if self.on_restart is not None:
                try:
                    self.on_restart(cause)
                except Exception:  # a metrics hook must never stop the supervision
                    log.exception("on_restart hook failed")

    def stop(self) -> None:
        self._stopping.set()
        self.join()  # a restart in progress finishes (bounded by Triton's startup timeout)


async def _discover(backend) -> None:
    """Read the reward outputs from Triton, then drop the channel: gRPC aio channels belong to
    the event loop that made them, and uvicorn runs its own (the next call reopens one)."""
    try:
        await backend.connect()
    finally:
        await backend.close()


def _gateway_app(
    settings: Settings,
    repo: Path,
    triton_url: str | None,
    *,
    required: bool,
    on_stub_unhealthy: Callable[[], None] | None = None,
):
    """The gateway app for `repo`'s export, backed by Triton at `triton_url`, or, with
    `triton_url` None, by the export's ONNX files under ONNX Runtime in this process.

    `required`: Triton must answer now (one host: we just started it); otherwise a Triton that
    is not up yet only delays readiness. `on_stub_unhealthy`: called on each Triton answer
    that a Python-backend stub is not healthy."""
    from service.gateway.app import create_app
    from service.gateway.provenance import load_provenance

    provenance = load_provenance(repo)
    if not settings.tokenizer_file and (repo / "tokenizer.json").is_file():
        settings = settings.model_copy(update={"tokenizer_file": str(repo / "tokenizer.json")})
    if triton_url is None:
        backends = _onnx_backends(settings, repo, provenance)
    else:
        backends = _triton_backends(
            settings, provenance, triton_url, required=required, on_stub_unhealthy=on_stub_unhealthy
        )
    return create_app(
        settings,
        backends[0],
        provenance,
        members=backends[1:],
        close_backend_on_shutdown=True,
    )


def _triton_backends(
    settings: Settings,
    provenance: dict,
    triton_url: str,
    *,
    required: bool,
    on_stub_unhealthy: Callable[[], None] | None = None,
):
    """One Triton gRPC backend per model of the export (the first model, then each member)."""
    from service.gateway.backend import BackendError, BackendUnavailable
    from service.gateway.triton_backend import RewardBackend
    from service.model_contract import MEMBER_ROLES, member_model

    backends = [
        RewardBackend(
            triton_url,
            timeout=settings.backend_timeout_s,
            model_version=provenance.get("model_version"),
            image_model=names["image_encoder"],
            text_model=names["text_encoder"],
            reward_model=names["reward_head"],
            on_stub_unhealthy=on_stub_unhealthy,
            channel_max_age_s=settings.triton_channel_max_age_s,
        )
        for names in [
            {role: member_model(role, 0) for role in MEMBER_ROLES},
            *(m["models"] for m in provenance.get("members") or []),
        ]
    ]
    try:
        for backend in backends:
            asyncio.run(_discover(backend))
    except (BackendUnavailable, BackendError) as exc:
        if required:
            raise
        log.warning("Triton at %s cannot serve yet (%s): /readyz stays 503", triton_url, exc)
    return backends


def _onnx_backends(settings: Settings, repo: Path, provenance: dict):
    """One in-process ONNX Runtime backend per model of the export (CPU; no Triton)."""
    from service.gateway.onnx_backend import OnnxBackend

    if importlib.util.find_spec("onnxruntime") is None:
        raise ValueError("--onnx runs the models in this process: pip install onnxruntime")
    members = len(provenance.get("members") or [])
    threads = settings.onnx_backend_threads
    return [OnnxBackend(repo, intra_op_threads=threads, member=k) for k in range(members + 1)]


def _exit_on_sigterm() -> None:
    """SIGTERM → SystemExit, so every `finally` runs: the export subprocess is killed
    (`subprocess.run` kills its child on any exception) and Triton stopped. The default
    handler would end this process at once, leaving an export running for half a minute."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))


def _run_uvicorn(app, settings: Settings) -> None:
    import uvicorn

    # uvicorn shuts down on SIGTERM, then re-raises it with the handler it found: ours, so the
    # caller's `finally` (stopping Triton) runs.
    _exit_on_sigterm()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
        timeout_keep_alive=settings.keep_alive_s,
    )


def run_gateway(settings: Settings, *, onnx: bool = False) -> None:
    """`reward-service gateway`: the REST API against a running Triton, or (`onnx`) against the
    export's ONNX files under ONNX Runtime in this process (no Triton: development, or a node
    without tritonserver; no dynamic batching across requests)."""
    from service.gateway.auth import check_bind

    check_bind(settings.host, settings)
    if onnx and settings.triton_url:
        raise ValueError("give --triton-url (a running Triton) or --onnx (no Triton), not both")
    if not onnx and not settings.triton_url:
        raise ValueError(
            "no Triton to talk to: --triton-url HOST:PORT (or REWARD_TRITON_URL), or --onnx to "
            "run the export's ONNX files in this process"
        )
    if not settings.repository:
        raise ValueError(
            "no export to serve: --repository DIR (or REWARD_REPOSITORY), the repository Triton "
            "serves (its provenance.json and tokenizer.json are enough; --onnx also reads its "
            "model.onnx files)"
        )
    repo = Path(settings.repository)
    backend = "ONNX Runtime in process" if onnx else f"Triton {settings.triton_url}"
    app = _gateway_app(settings, repo, None if onnx else settings.triton_url, required=False)
    warn_ignored_env(settings)
    warn_ignored_export_settings(settings, repo)
    print(f"gateway: http://{settings.host}:{settings.port} → {backend}")
    print(f"serving the export in {settings.repository}", flush=True)
    _run_uvicorn(app, settings)


def serve(settings: Settings) -> None:
    """`reward-service serve`: the bundled Triton and the gateway on one host."""
    from service.gateway.auth import check_bind
    from service.triton_server import TritonServer

    check_bind(settings.host, settings)
    warn_ignored_env(settings)
    _exit_on_sigterm()  # from here on an export or a Triton may run
    repo = ensure_repository(settings)
    server = TritonServer(
        repo,
        runtime_dir=settings.triton_runtime_dir,
        grpc_port=settings.triton_grpc_port,
        http_port=settings.triton_http_port,
        metrics_port=settings.triton_metrics_port,
    )
    server.start()
    watchdog = TritonWatchdog.from_settings(server, settings)
    try:
        app = _gateway_app(
            settings,
            repo,
            server.grpc_url,
            required=True,
            on_stub_unhealthy=watchdog.report_unhealthy_stub,
        )
        restarts = app.state.gateway.metrics.triton_restarts
        for cause in RESTART_CAUSES:
            restarts.labels(cause)  # every cause in /metrics from the start, at 0
        watchdog.on_restart = lambda cause: restarts.labels(cause).inc()
        print(
            f"triton: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics "
            f"{server.metrics_url}  (pid {server.pid}, repository {repo})"
        )
        print(f"gateway: http://{settings.host}:{settings.port}  (docs at /docs, metrics /metrics)")
        print("try:\n  " + curl_example(settings), flush=True)
        watchdog.start()
        _run_uvicorn(app, settings)
    finally:
        if watchdog.is_alive():
            watchdog.stop()
        server.stop()
