"""Faults under load, the short version of `python -m loadtest.faults` (issue 13, item 5).

One real stack for the module: the bundled tritonserver, a TCP delay proxy in front of its gRPC
port, and the torch-free gateway process in front of that (loadtest/fault_stack.py). Open-loop
load from `AsyncRewardClient` (retries on, a deadline per call) while Triton is SIGKILLed and
restarted, SIGSTOPped past the gateway's backend timeout, and while the network to it is slowed.
Every call must end with the reference rewards (item by item, within 1e-6) or an explicit
`RewardServiceError`: 0 wrong, 0 lost, 0 unexpected; and after the first success following the
fault, nearly every call succeeds.
"""

from __future__ import annotations

import asyncio

import pytest

from loadtest.fault_stack import Corpus, fault_stack, make_client, reference_rewards
from loadtest.faults import FaultParams, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.serial]

PARAMS = FaultParams(down_s=1.0, stop_s=4.0, latency_s=0.1, jitter_s=0.1, slow_s=4.0)
RATE_PER_S = 6.0  # calls per second, 2 items each: ~60 calls per scenario
LOAD = {"warm_s": 2.0, "recover_s": 4.0, "items_per_call": 2, "deadline_s": 30.0}
OK_SHARE_AFTER_RECOVERY = 0.9


@pytest.fixture(scope="module")
def stack(exported_repo, tmp_path_factory):
    with fault_stack(exported_repo, tmp_path_factory.mktemp("faults-under-load")) as s:
        yield s


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.build(size=64, n=12, seed=7)


@pytest.fixture(scope="module")
def reference(stack, corpus):
    async def go():
        client = make_client(stack.gateway.url)
        try:
            return await reference_rewards(client, corpus)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _run(name: str, stack, corpus, reference) -> dict:
    async def go():
        client = make_client(stack.gateway.url)  # one per event loop
        try:
            return await run_scenario(
                name, stack, client, corpus, reference, params=PARAMS,
                rate_per_s=RATE_PER_S, progress=False, **LOAD,
            )  # fmt: skip
        finally:
            await client.aclose()

    summary = asyncio.run(go())
    print(
        f"{name}: {summary['counts']} errors {summary['errors']} recover {summary['recover_s']} s"
    )
    return summary


def _assert_honest(summary: dict) -> None:
    counts = summary["counts"]
    assert summary["calls"] >= 40, summary
    assert counts["wrong"] == 0, summary["wrong"]
    assert counts["lost"] == 0, summary["lost"]
    assert counts["unexpected"] == 0, summary["unexpected"]
    assert counts["ok"] + counts["error"] == summary["calls"]
    assert summary["recover_s"] is not None, "no call succeeded after the fault"
    after = summary["counts_after_recovery"]
    assert after["ok"] >= OK_SHARE_AFTER_RECOVERY * sum(after.values()), summary


def test_triton_sigkill_then_restart(stack, corpus, reference):
    gateway_pid = stack.gateway.pid
    summary = _run("triton-sigkill", stack, corpus, reference)
    _assert_honest(summary)
    assert summary["fault"]["new_pid"] != summary["fault"]["killed_pid"]
    assert stack.gateway.pid == gateway_pid  # the same gateway process served throughout
    # the load met the fault: calls during the outage waited (retries) or failed explicitly
    assert summary["ok_latency_max_s"] > PARAMS.down_s or summary["counts"]["error"] > 0


def test_triton_sigstop_then_sigcont(stack, corpus, reference):
    summary = _run("triton-sigstop", stack, corpus, reference)
    _assert_honest(summary)
    assert summary["ok_latency_max_s"] > PARAMS.stop_s / 2 or summary["counts"]["error"] > 0


def test_slowed_network_to_triton(stack, corpus, reference):
    forwarded = stack.proxy.bytes_forwarded
    summary = _run("slow-network", stack, corpus, reference)
    _assert_honest(summary)
    assert stack.proxy.bytes_forwarded > forwarded  # the real gRPC bytes went through the proxy
    assert summary["ok_latency_max_s"] >= PARAMS.latency_s  # and were slowed
    assert stack.proxy.latency_s == 0.0  # healed
