"""deploy/triton_liveness.py, the Triton pod's liveness probe: against a real `tritonserver`
(a Python-backend stub killed: Triton still says live and ready, the probe does not), and its
pieces on a fake /proc. It runs with the NGC image's python3 (3.10) and nothing installed, so
it is checked for 3.10 syntax and standard-library imports too."""

from __future__ import annotations

import ast
import contextlib
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from service.triton_server import TritonServer
from tests.conftest import REPO_ROOT

pytest_plugins = ("tests.conftest_triton",)

SCRIPT = REPO_ROOT / "deploy" / "triton_liveness.py"
_spec = importlib.util.spec_from_file_location("triton_liveness", SCRIPT)  # a script, no package
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def run_probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


# -- what it may use ---------------------------------------------------------------------------
def test_the_probe_is_python_3_10_and_standard_library_only() -> None:
    tree = ast.parse(SCRIPT.read_text(), feature_version=(3, 10))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    # an explicit list: sys.stdlib_module_names is this interpreter's (3.11), not the image's
    allowed = {"__future__", "argparse", "json", "sys", "time", "urllib", "pathlib"}
    assert imported <= allowed, imported - allowed


# -- its pieces ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"instance_group": [{"kind": "KIND_CPU", "count": 2, "gpus": []}]}, 2),
        ({"instance_group": [{"kind": "KIND_GPU", "count": 2, "gpus": [0, 1, 3]}]}, 6),
        (
            {
                "instance_group": [
                    {"kind": "KIND_GPU", "count": 1, "gpus": [0]},
                    {"kind": "KIND_CPU", "count": 3},
                ]
            },
            4,
        ),
        ({}, 1),  # Triton's default: one instance
    ],
)
def test_instances_of_a_model_config(config: dict, expected: int) -> None:
    assert probe.instances(config) == expected


def _fake_process(proc: Path, pid: int, comm: str, argv: list[str], state: str, ppid: int) -> None:
    d = proc / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    # the name field may hold spaces and parentheses: the probe parses after the last ')'
    (d / "stat").write_text(f"{pid} ({comm}) x) {state} {ppid} 1 1 0 -1\n")


def _stub_argv(model: str, instance: str) -> list[str]:
    return [
        "/opt/tritonserver/backends/python/triton_python_backend_stub",
        f"/models/shapes-clip/{model}/1/model.py",
        "triton_python_backend_shm_region_1",
        "1048576",
        "1048576",
        "7",
        "/opt/tritonserver/backends/python",
        "336",
        instance,
        "DEFAULT",
    ]


def test_live_stubs_counts_the_servers_living_children_per_model(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").mkdir()  # not a PID: skipped
    _fake_process(proc, 7, "tritonserver", ["tritonserver", "--model-repository=/m"], "S", 1)
    _fake_process(proc, 8, "tritonserver", ["tritonserver"], "S", 1)  # another server
    _fake_process(proc, 20, "triton_python_b", _stub_argv("score", "score_0_0"), "S", 7)
    _fake_process(proc, 21, "triton_python_b", _stub_argv("score", "score_0_1"), "R", 7)
    _fake_process(proc, 22, "triton_python_b", _stub_argv("text_encoder", "t_0_0"), "Z", 7)
    _fake_process(proc, 23, "triton_python_b", _stub_argv("image_encoder", "i_0_0"), "S", 8)
    # stopped by SIGSTOP: Triton calls it not healthy and every call fails (out); stopped by a
    # tracer (py-spy dump, strace) for a moment: in
    _fake_process(proc, 26, "triton_python_b", _stub_argv("image_encoder", "i_0_1"), "T", 8)
    _fake_process(proc, 27, "triton_python_b", _stub_argv("image_encoder", "i_0_2"), "t", 8)
    _fake_process(proc, 24, "python3", ["python3", "/models/x/1/model.py"], "S", 7)

    assert probe.server_pids(proc) == [7, 8]
    assert probe.live_stubs(7, proc) == {"score": 2}  # the zombie and the other server's: out
    assert probe.live_stubs(8, proc) == {"image_encoder": 2}
    assert probe.live_stubs(99, proc) == {}


class _FakeTriton(http.server.BaseHTTPRequestHandler):
    """Triton's repository index and model configs, as a 24.10 server answers them."""

    index = [
        {"name": "image_encoder", "version": "1", "state": "READY"},  # onnxruntime: no stub
        {"name": "score", "version": "1", "state": "READY"},
        {"name": "score", "version": "2", "state": "READY"},
        {"name": "gpu_model", "version": "1", "state": "READY"},
        {"name": "broken", "version": "1", "state": "UNAVAILABLE", "reason": "load failed"},
        {"name": "pipeline", "version": "1", "state": "READY"},  # an ensemble
    ]
    configs = {
        "image_encoder": {"backend": "onnxruntime", "instance_group": [{"count": 4}]},
        "score": {"backend": "python", "instance_group": [{"kind": "KIND_CPU", "count": 2}]},
        "gpu_model": {
            "backend": "python",
            "instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [0, 1]}],
        },
        "broken": {"backend": "python", "instance_group": [{"count": 1}]},
        "pipeline": {"platform": "ensemble", "backend": ""},
    }
    delay_s = 0.0  # each config answer waits this long

    def _send(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(self.index if self.path == "/v2/repository/index" else {})

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/v2/health/"):
            self._send(None)
            return
        time.sleep(self.delay_s)
        self._send(self.configs[self.path.split("/")[3]])

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_triton(delay_s: float = 0.0) -> Iterator[str]:
    handler = type("Handler", (_FakeTriton,), {"delay_s": delay_s})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_expected_stubs_are_the_ready_python_models_instances() -> None:
    with fake_triton() as url:
        expected = probe.expected_stubs(probe.TritonHttp(url, 10))
    # two READY versions of score × 2 CPU instances; 1 instance on each of 2 GPUs; the
    # onnxruntime model, the ensemble and the model that failed to load run no stub
    assert expected == {"score": 4, "gpu_model": 2}


def test_the_timeout_bounds_all_the_calls_together() -> None:
    with fake_triton(delay_s=0.4) as url:
        started = time.monotonic()
        with pytest.raises(probe.ProbeFailure, match=r"within the 1 s budget|timed out"):
            probe.check(url, 1.0, pid=1)  # 4 config calls × 0.4 s > 1 s
        assert time.monotonic() - started < 1.5


# -- against a real tritonserver -------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_triton(triton_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tritonserver of this module's own: its stubs get killed (the session's is shared)."""
    log = tmp_path_factory.mktemp("liveness-log") / "tritonserver.log"
    server = TritonServer(triton_repo, log_file=log, startup_timeout=120, stop_timeout=20)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _stubs_by_model(server_pid: int) -> dict[str, psutil.Process]:
    return {
        Path(p.cmdline()[1]).parent.parent.name: p
        for p in psutil.Process(server_pid).children()
        if p.name() == probe.STUB_NAME
    }


def _dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def socket_bound_but_silent() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status


def test_the_probe_fails_when_a_stub_dies_while_triton_stays_live_and_ready(own_triton) -> None:
    url, pid = f"http://{own_triton.http_url}", str(own_triton.pid)
    models = sorted(_stubs_by_model(own_triton.pid))
    assert models, "the bundled repository runs every model in the Python backend"

    # a proxy in the environment is never used (the kubelet's HTTP probes use none)
    healthy = run_probe(f"--url={url}", f"--pid={pid}", env={"http_proxy": "http://127.0.0.1:1"})
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith(f"ok: tritonserver {pid} live;")
    for model in models:
        assert f"{model} 1/1" in healthy.stdout, healthy.stdout
    ready = run_probe(f"--url={url}", f"--pid={pid}", "--health=ready")
    assert ready.returncode == 0 and f"tritonserver {pid} ready;" in ready.stdout

    victim = "text_encoder" if "text_encoder" in models else models[0]
    stub = _stubs_by_model(own_triton.pid)[victim]
    stub.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _dead(stub) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(stub)

    # what the probe is for: Triton's own health endpoints do not notice
    assert _status(f"{url}/v2/health/live") == 200
    assert _status(f"{url}/v2/health/ready") == 200
    failed = run_probe(f"--url={url}", f"--pid={pid}")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stdout.strip() == (
        f"FAIL: tritonserver {pid}: Python-backend stubs died: {victim} (0 of 1 alive)"
    )


def test_the_probe_fails_fast_when_triton_does_not_answer() -> None:
    with socket_bound_but_silent() as port:
        started = time.monotonic()
        silent = run_probe(f"--url=http://127.0.0.1:{port}", "--timeout=1", "--pid=1")
        assert time.monotonic() - started < 10
    assert silent.returncode == 1
    assert silent.stdout.startswith("FAIL: GET http://127.0.0.1:") and "timed out" in silent.stdout
    refused = run_probe("--url=http://127.0.0.1:1", "--pid=1")
    assert refused.returncode == 1 and "Connection refused" in refused.stdout, refused.stdout
