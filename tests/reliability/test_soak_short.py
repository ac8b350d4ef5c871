"""The 60 s soak (`make soak` runs 10 minutes at 70 % of measured capacity; issue 13, item 5).

One real stack (bundled tritonserver + the gateway process, default gateway settings), open
loop at a modest fixed rate for 60 s, the client without retries, every call checked item by
item against the undisturbed reference: 0 errors (wrong, lost and unexpected included), and the
RSS of the gateway and of Triton (its process group) drifts less than `RSS_DRIFT` from the
second 10 s bucket to the last. Latency is reported, not asserted (no timed assertions).
"""

from __future__ import annotations

import asyncio

import pytest

from loadtest.fault_stack import Corpus, fault_stack, make_client, reference_rewards
from loadtest.soak import RSS_DRIFT, SOAK_GATEWAY_SETTINGS, bucket_table, soak

pytestmark = [pytest.mark.slow, pytest.mark.serial]

SECONDS = 60.0
BUCKET_S = 10.0
RATE_PER_S = 8.0  # calls per second, 2 items each


@pytest.fixture(scope="module")
def stack(exported_repo, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("soak-short")
    with fault_stack(exported_repo, workdir, SOAK_GATEWAY_SETTINGS) as s:
        yield s


def test_soak_60s_no_errors_no_rss_drift(stack):
    async def go():
        client = make_client(stack.gateway.url, attempts=1, timeout_s=60)
        try:
            corpus = Corpus.build(size=64, n=12, seed=7)
            reference = await reference_rewards(client, corpus)
            return await soak(
                stack, client, corpus, reference, rate_per_s=RATE_PER_S, duration_s=SECONDS,
                bucket_s=BUCKET_S, items_per_call=2, sample_s=1.0, progress=False,
            )  # fmt: skip
        finally:
            await client.aclose()

    result = asyncio.run(go())
    print(bucket_table(result))
    assert result["calls"] >= 0.8 * RATE_PER_S * SECONDS  # the load was really offered
    assert result["errors"] == 0, result["error_details"]
    assert all(b["calls"] > 0 and b["errors"] == 0 for b in result["buckets"])
    for name, drift in result["rss_drift"].items():
        assert drift is not None and abs(drift) < RSS_DRIFT, (name, result["buckets"])
