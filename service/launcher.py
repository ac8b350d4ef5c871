"""`reward-service serve`: export if needed, start Triton, start the gateway, stop both cleanly.

1. Export the configured checkpoint (+ head) into `repositories_dir/<name>` in a subprocess —
   a no-op when the content-addressed cache key is unchanged, and it keeps torch out of this
   (serving) process.
2. Start the bundled `tritonserver` on loopback ports (`TritonServer`), wait until it is ready.
3. Serve the FastAPI gateway with uvicorn; uvicorn turns SIGINT/SIGTERM into a graceful
   shutdown, after which Triton is stopped by PID (its whole process group: no orphans).

A watchdog thread restarts Triton on the same ports if it dies; meanwhile the gateway answers
503 with Retry-After and `/readyz` is false, and service resumes without restarting the gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("reward_service.launcher")


def repository_dir(settings: Settings) -> Path:
    """One folder per (model, head, batch) configuration; export keeps it up to date."""
    tag = json.dumps(
        [
            settings.model,
            settings.head,
            settings.max_batch,
            settings.textnorm_scale,
            settings.ensemble_lambda,
            settings.triton_queue_delay_us,
        ]
    )
    name = Path(settings.model.rstrip("/")).name or "model"
    return (
        Path(settings.repositories_dir) / f"{name}-{hashlib.sha256(tag.encode()).hexdigest()[:12]}"
    )


def ensure_repository(settings: Settings) -> Path:
    out = repository_dir(settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
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
    ]
    cmd += ["--head", settings.head] if settings.head else ["--no-head"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError((result.stderr.strip().splitlines() or ["export failed"])[-1])
    log.info(result.stdout.strip())
    return out


def curl_example(settings: Settings) -> str:
    auth = ' -H "Authorization: Bearer $REWARD_API_KEY"' if settings.api_keys else ""
    return (
        f"curl -s http://{settings.host}:{settings.port}/v1/score{auth} -H 'Content-Type: "
        'application/json\' -d "{\\"items\\": [{\\"image\\": \\"$(base64 -w0 image.png)\\", '
        '\\"prompt\\": \\"three blue triangles on a grass background\\"}]}"'
    )


class TritonWatchdog(threading.Thread):
    """Restart a Triton server that exited, with a backoff; stop() before stopping Triton.

    It must stay alive as long as Triton runs: the server gets SIGKILL when the thread that
    started it ends (`TritonServer(die_with_parent=True)`)."""

    def __init__(self, server, interval_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
        super().__init__(name="triton-watchdog", daemon=True)
        self.server, self.interval_s, self.max_backoff_s = server, interval_s, max_backoff_s
        self._stopping = threading.Event()
        self.restarts = 0

    def run(self) -> None:
        try:
            self._watch()
        finally:
            if self._stopping.is_set():
                self.server.stop()  # from the thread that (re)started it, before it exits

    def _watch(self) -> None:
        backoff = self.interval_s
        while not self._stopping.wait(backoff):
            if self.server.running():
                backoff = self.interval_s
                continue
            log.warning("tritonserver is not running; restarting it")
            try:
                self.server.start()
                self.restarts += 1
                log.info("tritonserver restarted (pid %s)", self.server.pid)
                backoff = self.interval_s
            except Exception as exc:  # keep watching; the gateway answers 503 meanwhile
                log.error("tritonserver restart failed: %s", str(exc).splitlines()[0])
                backoff = min(backoff * 2, self.max_backoff_s)

    def stop(self) -> None:
        self._stopping.set()
        self.join()  # a restart in progress finishes (bounded by Triton's startup timeout)


async def _discover(backend) -> None:
    """Read the reward outputs from Triton, then drop the channel: gRPC aio channels belong to
    the event loop that made them, and uvicorn runs its own (the next call reopens one)."""
    await backend.connect()
    await backend.close()


def serve(settings: Settings) -> None:
    import uvicorn

    from service.gateway.app import create_app
    from service.gateway.auth import check_bind
    from service.triton_client import RewardBackend
    from service.triton_server import TritonServer

    check_bind(settings.host, settings)
    repo = ensure_repository(settings)
    provenance = json.loads((repo / "provenance.json").read_text())
    if not settings.tokenizer_file and (repo / "tokenizer.json").is_file():
        settings = settings.model_copy(update={"tokenizer_file": str(repo / "tokenizer.json")})
    server = TritonServer(
        repo,
        grpc_port=settings.triton_grpc_port,
        http_port=settings.triton_http_port,
        metrics_port=settings.triton_metrics_port,
    )
    server.start()
    watchdog = TritonWatchdog(server)
    try:
        backend = RewardBackend(server.grpc_url, timeout=settings.backend_timeout_s)
        asyncio.run(_discover(backend))
        app = create_app(settings, backend, provenance, close_backend_on_shutdown=True)
        print(
            f"triton: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics "
            f"{server.metrics_url}  (pid {server.pid}, repository {repo})"
        )
        print(f"gateway: http://{settings.host}:{settings.port}  (docs at /docs, metrics /metrics)")
        print("try:\n  " + curl_example(settings), flush=True)
        watchdog.start()
        # uvicorn shuts down on SIGTERM, then re-raises it with the default handler, which
        # would kill this process before the `finally` below stops Triton gracefully.
        signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        if watchdog.is_alive():
            watchdog.stop()
        server.stop()
