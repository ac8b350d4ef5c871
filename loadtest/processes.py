"""The live processes of a stack under test (psutil): children, process groups, memory.

The fault suite, the soak and the end-to-end tests find the tritonserver a launcher started,
every process of Triton's group (the server and its Python-backend stubs) and their resident
memory. A process that exits while it is read is skipped; zombies (exited, not yet reaped)
count as gone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import psutil

_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError)


def _alive(process: psutil.Process) -> bool:
    with contextlib.suppress(*_GONE):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def children(ppid: int) -> list[int]:
    """The live direct children of `ppid` (empty when it is gone)."""
    try:
        found = psutil.Process(ppid).children()
    except _GONE:
        return []
    return [p.pid for p in found if _alive(p)]


def named_child(ppid: int, name: str) -> int | None:
    """The pid of a live direct child of `ppid` whose process name is `name` (None: none)."""
    for pid in children(ppid):
        with contextlib.suppress(*_GONE):
            if psutil.Process(pid).name() == name:
                return pid
    return None


def group_pids(pgid: int) -> list[int]:
    """Every live process of process group `pgid`."""
    out = []
    for process in psutil.process_iter():
        with contextlib.suppress(*_GONE):
            if os.getpgid(process.pid) == pgid and _alive(process):
                out.append(process.pid)
    return out


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident memory of `pids`, summed (0 for a process that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(*_GONE):
            total += psutil.Process(pid).memory_info().rss
    return total


def listener(port: int, host: str = "127.0.0.1") -> int | None:
    """The pid of the process listening on TCP `host:port` (None: nobody, or not ours to see)."""
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            anywhere = (host, "0.0.0.0", "::", "::1", f"::ffff:{host}")
            here = conn.laddr and conn.laddr.port == port and conn.laddr.ip in anywhere
            if here and conn.status == psutil.CONN_LISTEN and conn.pid is not None:
                return conn.pid
    return None


def in_tree(pid: int, root: int) -> bool:
    """True when `pid` is `root` or one of its live descendants."""
    if pid == root:
        return True
    with contextlib.suppress(*_GONE):
        return any(p.pid == pid for p in psutil.Process(root).children(recursive=True))
    return False
