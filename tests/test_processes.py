"""loadtest.processes on a real process tree: a parent in its own session with one child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from loadtest.processes import children, group_pids, named_child, rss_bytes

pytestmark = pytest.mark.serial

# The parent starts `sleep` (its child, in its process group), prints the child's pid, and
# never reaps it: a killed child stays a zombie until the parent exits.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen(["sleep", "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def tree():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        child = int(parent.stdout.readline())
        yield parent.pid, child
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def _wait_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"{pid} did not become a zombie"
        time.sleep(0.05)


def test_children_group_and_name_of_a_live_tree(tree) -> None:
    parent, child = tree
    assert children(parent) == [child]
    assert named_child(parent, "sleep") == child
    assert named_child(parent, "tritonserver") is None
    assert set(group_pids(parent)) == {parent, child}  # its own session: nothing else
    assert os.getpid() not in group_pids(parent)


def test_a_zombie_child_counts_as_gone(tree) -> None:
    parent, child = tree
    os.kill(child, signal.SIGKILL)
    _wait_zombie(child)  # the parent never waits for it
    assert children(parent) == []
    assert named_child(parent, "sleep") is None
    assert group_pids(parent) == [parent]


def test_rss_sums_live_processes_and_skips_gone_ones(tree) -> None:
    parent, child = tree
    own = psutil.Process(parent).memory_info().rss
    assert own > 1 << 20  # a Python interpreter holds megabytes
    both = rss_bytes([parent, child])
    assert both > own  # the child's memory is added (sleep holds some too)
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    assert rss_bytes([gone.pid]) == 0
    assert children(gone.pid) == [] and group_pids(gone.pid) == []
