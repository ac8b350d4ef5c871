"""Smoke of `reward-service bench serving` through the real servers (shipped model, < 60 s).

A tiny matrix — gateway (Triton + FastAPI), the naive and LitServe baselines and the in-process
ceiling; RL prompts, 1 image per request, concurrency 1 and 4, one 1 s window — checks that:
every system scored images with no errors; the baselines return the gateway's raw rewards for
the same images and prompts (same checkpoint; our preprocessing is bit-exact with the HF
processor) within 1e-4; the report files exist and the table has the rows and columns it
claims; every ratio is img/s ÷ the baseline's img/s; each server's CPU time per image is
read by role and fits the machine's cores; no server is left running.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import psutil
import pytest

from loadtest.cpu_time import (
    IDLE_SERVERS,
    LOAD_GENERATOR,
    own_and_descendants_s,
    point_reader,
    used_s,
)
from loadtest.report import cpu_table, write_report
from loadtest.serving import (
    LABELS,
    BaselineServer,
    Mode,
    all_cores,
    bench_serving,
    closed_loop,
    others_paused,
)
from service.triton_server import group_alive, pid_alive
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.serial]

SYSTEMS = ("gateway", "naive", "litserve", "ceiling")
SERVED = ("gateway", "naive", "litserve")
LEVELS = (1, 4)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-serving")
    results = bench_serving(
        work / "logs",
        systems=SYSTEMS,
        workloads=("rl",),
        images=(1,),
        concurrency=LEVELS,
        textnorm=("on",),
        seconds=1.0,
        runs=1,
        warmup_s=0.5,
        precision="fp32",  # whatever REWARD_PRECISION a developer has set
    )
    return results, write_report(results, work / "out")


def _point(results, system, concurrency):
    (found,) = [
        p for p in results["points"] if p["system"] == system and p["concurrency"] == concurrency
    ]
    return found


def test_every_system_scored_images_without_errors(bench):
    results, _ = bench
    for system in SERVED:
        for c in LEVELS:
            p = _point(results, system, c)
            assert p["errors"] == 0, (system, c, p["error_samples"])
            assert p["img_s"] > 0 and p["requests"] > 0, (system, c)
            assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
    pairs = {(c["variant"], c["batch"]) for c in results["ceiling"]}
    assert {("pair", 1), ("pair", 4), ("image", 1), ("image", 4)} <= pairs
    assert all(c["pairs_s"] > 0 for c in results["ceiling"])


def test_baselines_return_the_gateways_raw_rewards(bench):
    parity = bench[0]["parity"]
    assert parity["errors"] == {}
    assert parity["reference"] == "gateway"
    assert set(parity["raw"]) == {"gateway", "naive", "litserve", "ceiling"}
    assert len(parity["raw"]["gateway"]) == 4
    for system in ("naive", "litserve", "ceiling"):
        assert parity["max_abs_diff"][system] < 1e-4, (system, parity["raw"])
    # fp32 towers: every system is held to the fp32 parity (int8 exports loosen it)
    assert bench[0]["meta"]["precision"] == "fp32"
    assert parity["tolerance"] == {system: 1e-4 for system in parity["raw"]}


def test_report_files_and_the_table(bench):
    results, paths = bench
    assert json.loads(paths["json"].read_text())["points"] == results["points"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert "after warm-up (≥ 0.5 s and 3 answers per client)" in markdown  # how it was measured
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| system |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, rows = table[0], {r[0]: r for r in table[2:]}
    assert header == [
        "system",
        "C=1 img/s",
        "C=1 p50 / p99 ms",
        "C=4 img/s",
        "C=4 p50 / p99 ms",
        "errors",
    ]
    assert all(len(r) == len(header) for r in table)
    for system in SERVED:
        row = rows[LABELS[system]]
        for k, c in enumerate(LEVELS):
            assert float(row[1 + 2 * k]) == pytest.approx(_point(results, system, c)["img_s"], 0.01)
        assert row[-1] == "0"
    for variant in ("pair", "image"):
        row = rows[f"{LABELS[f'ceiling:{variant}']} (batch = C)"]
        for k, c in enumerate(LEVELS):
            (m,) = [x for x in results["ceiling"] if (x["variant"], x["batch"]) == (variant, c)]
            assert float(row[1 + 2 * k]) == pytest.approx(m["pairs_s"], 0.01)
    for name in (
        "gateway ÷ naive",
        "gateway ÷ LitServe",
        "gateway ÷ best ceiling",
        "litserve ÷ naive",
        "naive ÷ LitServe",
    ):
        assert name in rows, name
        assert all(rows[name][1 + 2 * k].endswith("×") for k in range(len(LEVELS)))


def test_ratios_are_img_s_over_the_baseline(bench):
    results, _ = bench
    best = max(c["pairs_s"] for c in results["ceiling"] if c["variant"] == "pair")
    ratios = results["ratios"]
    assert ratios
    for r in ratios:
        if r["system"] == "ceiling":
            (mine,) = [
                c["pairs_s"]
                for c in results["ceiling"]
                if c["variant"] == "pair" and c["batch"] == r["concurrency"]
            ]
        else:
            mine = _point(results, r["system"], r["concurrency"])["img_s"]
        if r["baseline"] == "ceiling":
            base = best
        elif r["baseline"] == "ceiling_same_work":  # the best of the variant doing its work
            base = max(c["pairs_s"] for c in results["ceiling"] if c["variant"] == r["variant"])
        else:
            base = _point(results, r["baseline"], r["concurrency"])["img_s"]
        assert math.isclose(r["ratio"], mine / base, rel_tol=1e-9), r
    found = {(r["system"], r["baseline"], r["concurrency"]) for r in ratios}
    for c in LEVELS:
        assert {
            ("gateway", "naive", c),
            ("gateway", "litserve", c),
            ("gateway", "ceiling", c),
        } <= found


ROLES = {
    "gateway": {"gateway", "triton", IDLE_SERVERS, LOAD_GENERATOR},
    "naive": {"server", IDLE_SERVERS, LOAD_GENERATOR},
    "litserve": {"server", IDLE_SERVERS, LOAD_GENERATOR},
}


def test_each_servers_cpu_per_image_is_read_by_role_and_fits_the_cores(bench):
    results, paths = bench
    cores = all_cores()
    for system in SERVED:
        for c in LEVELS:
            p = _point(results, system, c)
            per_img, busy = p["cpu_ms_per_img"], p["cpu_cores"]
            assert set(per_img) == set(busy) == ROLES[system], (system, c)
            server = [r for r in per_img if r not in (IDLE_SERVERS, LOAD_GENERATOR)]
            # the model runs in the server: it used CPU (Triton's share, for the stack)
            assert per_img["triton" if system == "gateway" else "server"] > 0, (system, c)
            # no process tree keeps more cores busy than the machine has
            assert sum(busy[r] for r in server) <= cores * 1.1, (system, c, busy)
            # the baselines not measured were paused: idle, LitServe alone polls 0.12 cores
            assert busy[IDLE_SERVERS] < 0.05, (system, c, busy)
    rows = {r[0]: r[1:] for r in cpu_table(results, "rl", 1, "on")[1:]}
    for k, c in enumerate(LEVELS):
        gateway = _point(results, "gateway", c)["cpu_ms_per_img"]
        total, parts = rows[LABELS["gateway"]][k].split(" = ")
        assert float(total) == pytest.approx(gateway["gateway"] + gateway["triton"], rel=0.06)
        assert parts.endswith(" triton") and " gateway + " in parts
        naive = _point(results, "naive", c)["cpu_ms_per_img"]["server"]
        assert float(rows[LABELS["naive"]][k]) == pytest.approx(naive, rel=0.06)
    markdown = paths["markdown"].read_text()
    assert "server CPU ms/img" in markdown and "baselines not measured paused" in markdown


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"


def _server_with_busy_child() -> subprocess.Popen:
    """A process (its own session) that sleeps, with a child that burns 0.5 s of CPU, then
    sleeps: a server whose work happens in a worker, as Triton's does in its stubs."""
    parent = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {BURN!r} + "
        "'time.sleep(60)'])\ntime.sleep(60)\n"
    )
    return subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)


def _wait_for_descendants_cpu(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + 20
    while own_and_descendants_s(pid)[1] < seconds:
        assert time.monotonic() < deadline, "the child's CPU time never showed"
        time.sleep(0.05)


def test_a_process_trees_cpu_counts_its_children_apart_from_itself():
    """`own_and_descendants_s` credits a busy child to the descendants, not to the parent;
    `used_s` never goes negative (a restarted process's counter starts again at 0)."""
    server = _server_with_busy_child()
    try:
        _wait_for_descendants_cpu(server.pid, 0.5)
        own, descendants = own_and_descendants_s(server.pid)
        assert 0.5 <= descendants < 1.0
        assert own < 0.3  # the parent only started Python and its child, then slept
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    assert used_s({"triton": 5.0, "gateway": 1.0}, {"triton": 0.5, "gateway": 1.5}) == {
        "triton": 0.0,
        "gateway": 0.5,
    }


def test_the_roles_of_each_system_and_what_counts_as_idle():
    """The gateway point splits the stack into gateway and Triton; the gRPC point counts the
    waiting gateway as idle, with the other servers; a baseline is one `server`."""
    stack, naive = _server_with_busy_child(), _server_with_busy_child()
    pids = {"stack": stack.pid, "naive": naive.pid}
    try:
        _wait_for_descendants_cpu(stack.pid, 0.5)
        _wait_for_descendants_cpu(naive.pid, 0.5)
        gateway, grpc, baseline = (point_reader(s, pids)() for s in ("gateway", "grpc", "naive"))
    finally:
        for proc in (stack, naive):
            os.killpg(proc.pid, 9)
            proc.wait()
    assert set(gateway) == {"gateway", "triton", IDLE_SERVERS, LOAD_GENERATOR}
    assert set(grpc) == {"triton", IDLE_SERVERS, LOAD_GENERATOR}
    assert set(baseline) == {"server", IDLE_SERVERS, LOAD_GENERATOR}
    assert gateway["triton"] >= 0.5 and baseline["server"] >= 0.5  # the workers' seconds
    assert gateway[IDLE_SERVERS] >= 0.5  # naive's tree, not measured here
    assert grpc[IDLE_SERVERS] == pytest.approx(gateway[IDLE_SERVERS] + gateway["gateway"], abs=0.05)


class _Sleeper:
    """A stand-in server: `sleep` in its own process group, paused and resumed as a baseline."""

    pause, resume = BaselineServer.pause, BaselineServer.resume

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["sleep", "60"], start_new_session=True)


def _stopped(servers: dict[str, _Sleeper], expected: list[bool]) -> list[bool]:
    """Which servers are stopped, once they are as `expected` or after 5 s (signals are
    delivered asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        states = [
            psutil.Process(s.proc.pid).status() == psutil.STATUS_STOPPED for s in servers.values()
        ]
        if states == expected or time.monotonic() > deadline:
            return states
        time.sleep(0.01)


def test_others_paused_freezes_the_other_baselines_and_always_resumes_them():
    servers = {"stack": _Sleeper(), "naive": _Sleeper(), "litserve": _Sleeper()}
    try:
        with others_paused(servers, "naive"):
            assert _stopped(servers, [False, False, True]) == [False, False, True]
        with pytest.raises(RuntimeError), others_paused(servers, None):  # the ceiling
            assert _stopped(servers, [False, True, True]) == [False, True, True]
            raise RuntimeError("a failed point")
        assert _stopped(servers, [False, False, False]) == [False, False, False]
    finally:
        for server in servers.values():
            server.proc.kill()
            server.proc.wait()


def test_no_server_is_left_running(bench):
    pids = bench[0]["meta"]["pids"]
    assert {"stack", "naive", "litserve", "tritonserver"} <= set(pids)
    for name, pid in pids.items():
        assert not pid_alive(pid), name
        if name != "tritonserver":
            assert not group_alive(pid), name  # each server led its own process group


def test_cli_rejects_an_unknown_system_before_starting_anything():
    result = run_cli("bench", "serving", "--systems", "gateway,bogus", timeout=60)
    assert result.returncode == 2
    assert "error: --systems" in result.stderr and "bogus" in result.stderr


def test_parity_tolerance_depends_on_what_is_compared_with_what():
    """Two systems running the export differ by its precision's batch effect, the two PyTorch
    baselines by theirs (torch int8: its tolerance to fp32), the export against a baseline by
    the coarser precision's tolerance to fp32, whichever is the reference (the gateway, or the
    first system when the gateway does not run)."""
    from loadtest.serving import SAME_EXPORT_TOLERANCE, parity_tolerance
    from service.model_contract import RAW_TOLERANCE

    same_export = SAME_EXPORT_TOLERANCE
    assert parity_tolerance("ceiling", "gateway", "int8") == same_export["int8"]
    assert parity_tolerance("grpc", "ceiling", "int8") == same_export["int8"]
    assert parity_tolerance("ceiling", "gateway", "fp32") == same_export["fp32"]
    assert parity_tolerance("naive", "gateway", "int8") == RAW_TOLERANCE["int8"]
    assert parity_tolerance("ceiling", "naive", "int8") == RAW_TOLERANCE["int8"]
    assert parity_tolerance("litserve", "naive", "int8") == RAW_TOLERANCE["fp32"]  # torch fp32
    assert parity_tolerance("litserve", "naive", "fp32", "int8") == RAW_TOLERANCE["int8"]
    assert parity_tolerance("ceiling", "naive", "fp32", "int8") == RAW_TOLERANCE["int8"]
    # bf16 (OpenVINO) is batch-invariant: two systems running the export agree as in fp32
    assert parity_tolerance("grpc", "gateway", "bf16") == same_export["fp32"]
    assert parity_tolerance("naive", "gateway", "bf16") == RAW_TOLERANCE["bf16"]
    assert parity_tolerance("litserve", "naive", "fp32", "bf16") == RAW_TOLERANCE["bf16"]


class _SleepyTarget:
    """A stand-in target for the closed loop alone: each call takes `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def prepare(self, items, mode, repeats):
        return items

    async def send(self, prepared) -> list[float]:
        await asyncio.sleep(self.delay_s)
        return [0.0] * len(prepared)


class _OneItem:
    repeats = True

    def items(self, n: int) -> list[tuple[int, str]]:
        return [(0, "a red circle")] * n


def _closed_loop(target, **options):
    """closed_loop on one image of one prompt, TextNorm on, a warm-up of one answer."""
    return asyncio.run(
        closed_loop(
            target,
            _OneItem(),
            Mode("on", "auto"),
            **{"images": 1, "max_warmup_s": 30.0, "warmup_answers": 1, **options},
        )
    )


@pytest.mark.parametrize("warmup_answers", [1, 3])
def test_the_windows_start_after_every_client_had_its_warmup_answers(warmup_answers):
    """With no warm-up time, the windows wait for `warmup_answers` answers per client (the
    default 3; one round was not enough at C = 32 on a ViT-B/32), not more than one round
    beyond them, and every record before the windows belongs to the warm-up."""
    concurrency, delay = 4, 0.05
    loop = _closed_loop(
        _SleepyTarget(delay),
        concurrency=concurrency,
        seconds=0.2,
        runs=1,
        warmup_s=0.0,
        warmup_answers=warmup_answers,
    )
    before = [r for r in loop.records if r.end <= loop.t0]
    assert warmup_answers * concurrency <= len(before) <= (warmup_answers + 1) * concurrency
    assert loop.t0 - min(r.start for r in loop.records) >= warmup_answers * delay
    assert all(r.ok for r in loop.records)


def test_the_cpu_reader_is_read_at_the_edges_of_the_windows():
    """What closed_loop reports as CPU seconds is the reader's change over exactly the
    windows: a reader counting wall time gives their length, warm-up and drain excluded."""
    loop = _closed_loop(
        _SleepyTarget(0.05),
        concurrency=2,
        seconds=0.3,
        runs=2,
        warmup_s=0.3,
        cpu=lambda: {"clock": time.perf_counter()},
    )
    assert loop.cpu_s["clock"] == pytest.approx(loop.t1 - loop.t0, abs=0.02)


class _FailsToPrepareOnce(_SleepyTarget):
    """`prepare` raises on its first call (tokenising or serialising a request went wrong)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.calls = 0

    def prepare(self, items, mode, repeats):
        self.calls += 1
        if self.calls == 1:
            raise ValueError("could not build the request")
        return items


def test_a_request_that_fails_to_prepare_ends_the_point_loudly():
    # `prepare` (the harness's own tokenising and serialising) ran outside any accounting: the
    # client died silently and the point was measured at C - 1 clients with 0 errors.
    with pytest.raises(RuntimeError, match="client .* could not prepare a request"):
        _closed_loop(_FailsToPrepareOnce(0.02), concurrency=4, seconds=0.3, runs=1, warmup_s=0.1)
