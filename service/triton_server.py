"""Run the `tritonserver` bundled in the `nvidia-pytriton` wheel as a child process (CPU flavour).

The wheel ships `tritonserver` 2.51 with only the Python backend; the models of an exported CPU
repository are `model_repository/python_onnx/model.py` running ONNX Runtime. Getting it to run
needs a little preparation (DESIGN.md 6), all done by `TritonServer.start()`:

- the wheel's `backends/` folder is copied once into a writable runtime folder (default
  `~/.cache/textnorm-reward/triton-runtime/`), with the Python-backend stub built for this
  interpreter's version (`python_backend_stubs/3.11/triton_python_backend_stub`) put into
  `backends/python/`;
- `LD_LIBRARY_PATH` starts with `site-packages/nvidia_pytriton.libs` and the interpreter's own
  lib folder (else the stub loads the system's libpython);
- the environment's `bin` comes first on `PATH`, so the stub's embedded Python finds the venv
  (and its numpy/onnxruntime) through `pyvenv.cfg`;
- HTTP, gRPC and metrics endpoints bind to loopback (`--*-address 127.0.0.1`) on free ports
  picked at the first start and kept for later restarts (clients keep their URL).

The server runs in its own process group (`start_new_session`) and, by default, receives
SIGKILL when the thread that started it dies (`PR_SET_PDEATHSIG`), so no stub process outlives
it. `stop()` sends SIGTERM to the server's PID (Triton unloads its models and exits within
seconds), waits, escalates to SIGKILL of the whole group after `stop_timeout`, and finally kills
whatever is left in the group. Startup waits on `GET /v2/health/ready` (strict readiness: every
model loaded); an early exit or a missed deadline raises `TritonStartError` with the tail of the
server log. Everything configurable comes in through the constructor; the environment is only
read to build the child's environment. Torch-free.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from service.model_contract import BUNDLED_CONFIG_NAME
from service.settings import CACHE_DIR

STUB_NAME = "triton_python_backend_stub"  # the process of each Python-backend model instance

DEFAULT_RUNTIME_DIR = CACHE_DIR / "triton-runtime"
LOOPBACK = "127.0.0.1"

_PR_SET_PDEATHSIG = 1
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


class TritonStartError(RuntimeError):
    """tritonserver could not be started or did not become ready; the message has its log tail."""


def pytriton_root() -> Path:
    """`site-packages/pytriton/tritonserver` of the installed `nvidia-pytriton` wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed (no bundled tritonserver)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonStartError(f"no tritonserver binary under {root}")
    return root


def prepare_runtime(runtime_dir: Path, source: Path | None = None) -> Path:
    """Copy the wheel's backends (+ this Python's stub) into `runtime_dir`; return the backends.

    Idempotent and safe against concurrent callers: the copy is built in a temporary folder and
    renamed into place; a marker records which wheel it came from, so a reinstalled wheel (or
    another Python version) gives a fresh copy.
    """
    source = source or pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"no Python-backend stub for Python {version} in {source}")
    lib = source / "backends" / "python" / "libtriton_python.so"
    stamp = f"{source}\n{version}\n{lib.stat().st_mtime_ns}\n{stub.stat().st_mtime_ns}\n"
    backends = runtime_dir / "backends"
    marker = runtime_dir / "backends.source"
    if marker.is_file() and marker.read_text() == stamp and (backends / "python").is_dir():
        return backends
    runtime_dir.mkdir(parents=True, exist_ok=True)
    staging = runtime_dir / f".backends.{os.getpid()}.{time.monotonic_ns()}"
    try:
        shutil.copytree(source / "backends", staging, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        (staging / "python" / "triton_python_backend_stub").chmod(0o755)
        if marker.is_file() and marker.read_text() == stamp and (backends / "python").is_dir():
            return backends  # another process finished the same copy meanwhile
        old = runtime_dir / f".old.{os.getpid()}.{time.monotonic_ns()}"
        if backends.exists():
            backends.rename(old)
        staging.rename(backends)
        shutil.rmtree(old, ignore_errors=True)
        marker.write_text(stamp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return backends


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports that are free on `host` right now (held together while picking)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def child_env(
    source: Path,
    python_prefix: Path,
    base: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment tritonserver (and the Python-backend stub it spawns) needs."""
    env = dict(os.environ if base is None else base)
    libs = source.parents[1] / "nvidia_pytriton.libs"
    pylib = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    ld = [str(libs), pylib] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(ld))
    path = [str(python_prefix / "bin")] + [p for p in env.get("PATH", "").split(":") if p]
    env["PATH"] = ":".join(dict.fromkeys(path))
    env.pop("PYTHONHOME", None)  # the stub must find the venv through PATH and pyvenv.cfg
    env.update(extra or {})
    return env


_prctl = None


def _die_with_parent() -> None:  # runs in the child between fork and exec: no imports here
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _load_prctl() -> None:
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _prctl = ctypes.CDLL(None, use_errno=True).prctl


class TritonServer:
    """One local `tritonserver` process serving `model_repository` (context manager too).

    Args:
        model_repository: the exported repository (`service.cli export --out`).
        runtime_dir: writable folder for the prepared backends (shared, prepared once).
        log_file: where the server writes stdout/stderr (default `runtime_dir/logs/...`).
        http_port, grpc_port, metrics_port: fixed ports; None picks free loopback ports at the
            first start, kept for restarts.
        host: bind address of the three endpoints.
        startup_timeout: seconds to wait for `/v2/health/ready`.
        stop_timeout: seconds to wait after SIGTERM before SIGKILL.
        python_prefix: environment whose `bin` goes first on PATH (default: this venv).
        log_verbose: tritonserver `--log-verbose` level.
        extra_args: more tritonserver flags.
        env: extra environment variables for the child.
        die_with_parent: SIGKILL the server when the thread that called `start()` exits.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        runtime_dir: str | os.PathLike[str] = DEFAULT_RUNTIME_DIR,
        log_file: str | os.PathLike[str] | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = LOOPBACK,
        startup_timeout: float = 120.0,
        stop_timeout: float = 20.0,
        python_prefix: str | os.PathLike[str] | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.runtime_dir = Path(runtime_dir).resolve()  # Triton's cwd: no relative paths
        self.host = host
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.python_prefix = Path(python_prefix or sys.prefix)
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.die_with_parent = die_with_parent
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self._ports: tuple[int, int, int] | None = None
        if not all(p is None for p in self._fixed_ports):
            if any(p is None for p in self._fixed_ports):
                raise ValueError("give all three ports or none")
            self._ports = (http_port, grpc_port, metrics_port)  # type: ignore[assignment]
        self._log_file = Path(log_file) if log_file else None
        self._proc: subprocess.Popen[bytes] | None = None
        # start() and stop() may run on different threads (the launcher's watchdog restarts,
        # the main thread stops): never both at once.
        self._lock = threading.RLock()
        self._log_offset = 0  # where the current run's output starts in the log file
        self.startup_seconds: float | None = None

    # -- endpoints -----------------------------------------------------------------------------
    def _port(self, index: int) -> int:
        if self._ports is None:
            raise RuntimeError("ports are chosen at the first start()")
        return self._ports[index]

    @property
    def http_url(self) -> str:
        """`host:port` of the HTTP/REST endpoint (tritonclient.http style, no scheme)."""
        return f"{self.host}:{self._port(0)}"

    @property
    def grpc_url(self) -> str:
        """`host:port` of the gRPC endpoint (tritonclient.grpc style)."""
        return f"{self.host}:{self._port(1)}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{self.host}:{self._port(2)}/metrics"

    @property
    def pid(self) -> int | None:
        """PID of the running server (None when not started or stopped)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_file(self) -> Path:
        if self._log_file is None:
            name = f"tritonserver-{os.getpid()}-{id(self):x}.log"
            self._log_file = self.runtime_dir / "logs" / name
        return self._log_file

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def python_stubs(self) -> int | None:
        """Live Python-backend stub processes of the running server, one per model instance:
        neither exited nor stopped (a SIGSTOP-ed stub answers nothing, and Triton only calls
        it "not healthy"). None: not running, or psutil, of the `triton` extra, missing."""
        try:
            import psutil
        except ImportError:
            return None
        try:
            children = psutil.Process(self.pid).children(recursive=True) if self.pid else None
        except psutil.Error:
            return None
        if children is None:
            return None
        # stopped by a signal, not "tracing stop": py-spy or strace attached for a moment
        gone = {psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED}
        live = 0
        for child in children:
            try:
                if child.name() == STUB_NAME and child.status() not in gone:
                    live += 1
            except psutil.Error:  # exited while being read
                continue
        return live

    def command(self, backends: Path, binary: Path) -> list[str]:
        http, grpc, metrics = self._port(0), self._port(1), self._port(2)
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={metrics}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout * 0.75))}",
            "--pinned-memory-pool-byte-size=0",  # CPU: no CUDA, skip the pinned pool
            # This server has only the Python backend: each CPU model's configs/bundled.pbtxt
            # runs its model.onnx with ONNX Runtime there (config.pbtxt is the native backend).
            f"--model-config-name={BUNDLED_CONFIG_NAME}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> TritonServer:
        """Prepare the runtime, launch the server and wait until it is ready. Idempotent."""
        with self._lock:
            return self._start()

    def _start(self) -> TritonServer:
        if self.running():
            return self
        if self._proc is not None:  # it died: reap it and kill what is left of its group
            self.stop()
        if not (self.model_repository.is_dir()):
            raise TritonStartError(f"no model repository at {self.model_repository}")
        source = pytriton_root()
        backends = prepare_runtime(self.runtime_dir, source)
        env = child_env(source, self.python_prefix, extra=self.extra_env)
        auto_ports = all(p is None for p in self._fixed_ports)
        attempts = 3 if auto_ports and self._ports is None else 1
        for attempt in range(attempts):
            if self._ports is None:
                self._ports = tuple(free_ports(3, self.host))  # type: ignore[assignment]
            try:
                self._launch(backends, source / "bin" / "tritonserver", env)
                return self
            except TritonStartError as exc:
                # "Address already in use" (gRPC), "Socket '…' already in use" (HTTP)
                in_use = "already in use" in str(exc).lower()
                if not (in_use and attempt + 1 < attempts):
                    raise
                self._ports = None  # a port was taken between picking and binding: pick again
        raise AssertionError("unreachable")

    def _launch(self, backends: Path, binary: Path, env: dict[str, str]) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if self.die_with_parent:
            _load_prctl()
        began = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== start {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                self.command(backends, binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.runtime_dir),
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(began + self.startup_timeout)
            if "failed to start metrics service" in self.log_tail(400).lower():
                # Triton goes on without its metrics endpoint: the port printed would be
                # somebody else's listener.
                raise TritonStartError(
                    f"tritonserver could not serve metrics on port {self._port(2)} (already in "
                    f"use?) (log {self.log_file}):\n{self.log_tail()}"
                )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def _wait_ready(self, deadline: float) -> None:
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {code} during startup "
                    f"(log {self.log_file}):\n{self.log_tail()}"
                )
            if self.is_ready(timeout=1.0):  # refused / reset while it comes up: False
                return
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver not ready after {self.startup_timeout:.0f} s "
                    f"(log {self.log_file}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def is_ready(self, timeout: float = 1.0) -> bool:
        """Synchronous `GET /v2/health/ready` (False when down)."""
        if self._ports is None:
            return False
        url = f"http://{self.host}:{self._port(0)}/v2/health/ready"
        try:
            with _NO_PROXY.open(url, timeout=timeout) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        """Last `lines` lines the server wrote in its current (or last) run."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM to the PID, wait, then SIGKILL the group; returns the exit code. Idempotent."""
        with self._lock:
            return self._stop()

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the server leads its own group
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            if not _wait_exited(proc.pid, self.stop_timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        # The leader is a zombie now (not reaped yet), so the group id cannot be reused: kill
        # whatever stub or helper may remain in it, then reap.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        return proc.wait()

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once and reap; for a hung server (a SIGSTOP-ed or
        deadlocked process ignores SIGTERM, so `stop()` would wait out `stop_timeout`)."""
        with self._lock:
            proc, self._proc = self._proc, None
            atexit.unregister(self.stop)
            if proc is None:
                return None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running() else "stopped"
        ports = f" grpc={self.grpc_url} http={self.http_url}" if self._ports else ""
        return f"TritonServer({str(self.model_repository)!r}, {state}{ports})"


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True while any process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until child `pid` has exited, without reaping it (it stays a zombie)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped
        if info is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
