"""deploy/triton_liveness.py, the Triton pod's liveness probe: against a real `tritonserver`
(a Python-backend stub killed: Triton still says live and ready, the probe does not), and its
pieces on a fake /proc. It runs with the NGC image's python3 (3.10) and nothing installed, so
it is checked for 3.10 syntax and standard-library imports too."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import signal
import socket
import subprocess
import sys
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


def run_probe(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
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
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported


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
    _fake_process(proc, 24, "python3", ["python3", "/models/x/1/model.py"], "S", 7)

    assert probe.server_pids(proc) == [7, 8]
    assert probe.live_stubs(7, proc) == {"score": 2}  # the zombie and the other server's: out
    assert probe.live_stubs(8, proc) == {"image_encoder": 1}
    assert probe.live_stubs(99, proc) == {}


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

    healthy = run_probe(f"--url={url}", f"--pid={pid}")
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
