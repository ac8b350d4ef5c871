#!/usr/bin/env python3
"""Liveness probe for a Triton container: is every Python-backend model instance still alive?

Each Python-backend model instance (the BLS `score` model; bf16 towers) runs in its own
`triton_python_backend_stub` process. When one dies (killed for memory, a crash), Triton 24.10
does not restart it and still answers `/v2/health/live` and `/v2/health/ready` with 200, while
every call to that model fails ("Stub process ... is not healthy"). Kubernetes' HTTP probes never
see it, so the pod keeps failing calls until someone restarts it. This probe does:

1. `GET /v2/health/live` (or `/v2/health/ready` with `--health ready`) must answer 200;
2. every READY model whose config says `backend: python` must have as many live stubs as it
   has instances (`instance_group` counts; a `KIND_GPU` group has `count` per listed GPU). A
   stub belongs to a model by the `<repository>/<model>/<version>/model.py` path Triton starts
   it with, and to this server by its parent PID; zombies do not count.

Exit status 0 when both hold, 1 otherwise; one line on stdout either way (kubelet records it in
the pod's events). `--timeout` bounds all the HTTP calls together (the kubelet's timeoutSeconds
bounds the whole probe, start-up included); no proxy is ever used. It needs Triton's
repository-index and model-config endpoints: a `--http-restricted-api` that restricts them
makes it fail. Standard library only, Python ≥ 3.10: it runs with the `python3` of the NGC
Triton image (`/opt/reward-service/triton_liveness.py` in the project's `triton` image). Linux
only (it reads /proc). With several tritonserver processes in one PID namespace (not in a pod),
name the one to check with `--pid`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
SERVER_NAME = "tritonserver"
PROC = Path("/proc")


class ProbeFailure(Exception):
    """What is wrong, in one line."""


class TritonHttp:
    """JSON calls to Triton's HTTP endpoint, all within one deadline (the kubelet's timeout
    covers the whole probe) and never through a proxy (the kubelet's own HTTP probes use none;
    a pod's http_proxy variables must not turn every probe into a failure)."""

    def __init__(self, url: str, budget_s: float) -> None:
        self.url = url.rstrip("/")
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def json(self, path: str, method: str = "GET") -> object:
        url = f"{self.url}{path}"
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProbeFailure(f"no answer to {method} {url} within the {self.budget_s:g} s budget")
        data = b"{}" if method == "POST" else None
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with self._opener.open(request, timeout=left) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            raise ProbeFailure(f"{method} {url} answered {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ProbeFailure(f"{method} {url} failed: {reason}") from None
        try:
            return json.loads(body) if body else None
        except ValueError:
            raise ProbeFailure(f"{method} {url} answered something that is not JSON") from None


def instances(config: dict) -> int:
    """Model instances of one model config (Triton's /v2/models/<m>/config JSON)."""
    total = 0
    for group in config.get("instance_group") or [{"count": 1}]:
        count = int(group.get("count", 1))
        gpus = group.get("gpus") or []
        total += count * len(gpus) if group.get("kind") == "KIND_GPU" and gpus else count
    return total


def expected_stubs(triton: TritonHttp) -> dict[str, int]:
    """{model name: instances} for every READY Python-backend model of `triton`. (Backends
    written in Python, `runtime: model.py`, also run stubs, but started from the backend's own
    model.py: they are not checked.)"""
    expected: dict[str, int] = {}
    for entry in triton.json("/v2/repository/index", method="POST") or []:
        if entry.get("state") != "READY":
            continue
        name, version = entry["name"], entry.get("version", "")
        path = f"/v2/models/{urllib.parse.quote(name)}"
        if version:
            path += f"/versions/{urllib.parse.quote(version)}"
        config = triton.json(f"{path}/config")
        if isinstance(config, dict) and config.get("backend") == "python":
            expected[name] = expected.get(name, 0) + instances(config)
    return expected


def _stat(pid_dir: Path) -> tuple[str, int]:
    """(state letter, parent PID) from /proc/<pid>/stat (the name may hold spaces and ')')."""
    text = (pid_dir / "stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def server_pids(proc: Path = PROC) -> list[int]:
    """PIDs of the tritonserver processes visible in /proc."""
    pids = []
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if (pid_dir / "comm").read_text().strip() == SERVER_NAME:
                pids.append(int(pid_dir.name))
        except OSError:  # exited while being read
            continue
    return sorted(pids)


def live_stubs(server_pid: int, proc: Path = PROC) -> dict[str, int]:
    """{model name: live stub processes} among the children of `server_pid`."""
    live: dict[str, int] = {}
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            if not argv[0].endswith(STUB_NAME.encode()) or len(argv) < 2:
                continue
            state, parent = _stat(pid_dir)
        except (OSError, ValueError, IndexError):  # exited while being read
            continue
        # exited, or stopped by a signal (not "t": a debugger or py-spy attached for a moment)
        if parent != server_pid or state in ("Z", "X", "T"):
            continue
        model = Path(argv[1].decode(errors="replace")).parent.parent.name
        live[model] = live.get(model, 0) + 1
    return live


def check(url: str, timeout: float, health: str = "live", pid: int | None = None) -> str:
    """The probe, every HTTP call within `timeout` seconds in all: a one-line summary when
    healthy; raises ProbeFailure otherwise."""
    triton = TritonHttp(url, timeout)
    triton.json(f"/v2/health/{health}")
    if pid is None:
        pids = server_pids()
        if len(pids) != 1:
            found = ", ".join(map(str, pids)) or "none"
            raise ProbeFailure(f"{len(pids)} {SERVER_NAME} processes ({found}): pass --pid")
        pid = pids[0]
    expected = expected_stubs(triton)
    live = live_stubs(pid)
    missing = {m: (live.get(m, 0), n) for m, n in sorted(expected.items()) if live.get(m, 0) < n}
    counts = ", ".join(f"{m} {live.get(m, 0)}/{n}" for m, n in sorted(expected.items()))
    if missing:
        dead = ", ".join(f"{m} ({have} of {want} alive)" for m, (have, want) in missing.items())
        raise ProbeFailure(f"{SERVER_NAME} {pid}: Python-backend stubs died: {dead}")
    return f"{SERVER_NAME} {pid} {health}; Python-backend stubs: {counts or 'none expected'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Triton's HTTP endpoint")
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds for all the HTTP calls together"
    )
    parser.add_argument("--health", choices=("live", "ready"), default="live")
    parser.add_argument("--pid", type=int, help="the tritonserver to check [default: the only one]")
    args = parser.parse_args(argv)
    try:
        print("ok:", check(args.url, args.timeout, args.health, args.pid))
    except ProbeFailure as e:
        print("FAIL:", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
