"""CPU time of the servers under test, by role, read over a measured window (psutil).

On a shared machine throughput alone does not say where the cores went. `bench serving` reads
these counters at the start and the end of a point's windows and reports CPU milliseconds per
image for each role of the system measured: ``gateway`` (the `serve` launcher's own process:
FastAPI, JSON, base64, PNG decode, the gRPC client) and ``triton`` (everything it started:
tritonserver and its Python backend stubs, where ONNX Runtime or OpenVINO run), or only
``triton`` for the direct gRPC path, or ``server`` for a baseline (its process and every worker
it forked); and two roles that should stay small: ``idle servers`` (the servers not measured,
and the idle gateway of a gRPC point, which share the cores) and ``load generator`` (the
benchmark's own process: what the clients themselves cost).

A process that exits inside the windows takes its CPU seconds with it (only live processes are
read): its role is undercounted, never overcounted. Servers run for the whole benchmark, so
this only happens when one is restarted, such as Triton by the supervisor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import psutil

CpuReader = Callable[[], dict[str, float]]
IDLE_SERVERS = "idle servers"
LOAD_GENERATOR = "load generator"
STACK_SYSTEMS = ("gateway", "grpc")  # the systems `reward-service serve` (the "stack") serves


def own_and_descendants_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by `pid` itself, and by its live descendants."""
    root = psutil.Process(pid)
    descendants = 0.0
    for child in root.children(recursive=True):
        try:
            descendants += _busy_s(child)
        except psutil.NoSuchProcess:  # exited between listing and reading
            continue
    return _busy_s(root), descendants


def point_reader(measured: str, server_pids: Mapping[str, int]) -> CpuReader:
    """A reader of the CPU seconds used so far, by role, while `measured` is measured.

    `server_pids`: each server's root process, by name: ``stack`` for `reward-service serve`
    (where the gateway is the launcher's own process and Triton all it started), else the
    baseline's name."""
    own = "stack" if measured in STACK_SYSTEMS else measured

    def read() -> dict[str, float]:
        roles: dict[str, float] = {}
        idle = sum(sum(own_and_descendants_s(p)) for n, p in server_pids.items() if n != own)
        if own == "stack":
            gateway, triton = own_and_descendants_s(server_pids[own])
            if measured == "gateway":
                roles["gateway"] = gateway
            else:  # the direct gRPC path: the gateway only waits
                idle += gateway
            roles["triton"] = triton
        else:
            roles["server"] = sum(own_and_descendants_s(server_pids[own]))
        roles[IDLE_SERVERS] = idle
        roles[LOAD_GENERATOR] = _busy_s(psutil.Process())
        return roles

    return read


def used_s(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each role used between two readings, never negative (module docstring)."""
    return {role: max(0.0, after[role] - before.get(role, 0.0)) for role in after}


def _busy_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system
