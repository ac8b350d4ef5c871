"""The trainer-side client against the real stack: `python -m service.cli serve` on loopback.

One module fixture starts the stack (as tests/test_serving.py's `stack`, with at most
`MAX_ITEMS` items per request so chunking is cheap to see). The reference for every check is
the plain REST answer for PNG files (httpx, no client library); within 1e-5 and in item order:
- the sync and asyncio clients, for every image kind (bytes, paths, PIL, numpy, torch);
- a call of 3 × the item limit, split into concurrent requests and reassembled;
- `GrpcRewardClient` straight to Triton's `score` model;
- the adapters (DDPO/flow_grpo reward fn and its future, TRL GRPO reward fns, score_group
  advantages, also for a group over the limit);
- Triton SIGKILLed under 200 in-flight async calls: each call returns the undisturbed rewards
  or raises `RewardServiceError`, never wrong or missing rewards.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from textnorm_reward_client import (
    AsyncRewardClient,
    GrpcRewardClient,
    RetryPolicy,
    RewardClient,
    RewardServiceError,
)
from textnorm_reward_client.adapters import (
    DdpoRewardFn,
    async_grpo_reward_fn,
    group_advantages,
    grpo_reward_fn,
)

from shapes_world.render import render
from shapes_world.scene import Group, Scene
from tests.conftest import REPO_ROOT
from tests.serve_stack import serve_stack
from tests.test_serving import (
    API_KEY,
    AUTH,
    CONTRASTIVE,
    REWARDS,
    TRUE_PROMPT,
    Stack,
)

pytestmark = [pytest.mark.slow, pytest.mark.serial]

MAX_ITEMS = 4  # the stack's items per request: a 12-item call is 3 requests
TEXTNORM = {"contrastive": CONTRASTIVE}
SCENES = [
    Scene((Group(3, "red", "triangle"),), "grass"),
    Scene((Group(2, "red", "triangle"),), "grass"),
    Scene((Group(3, "blue", "triangle"),), "grass"),
    Scene((Group(3, "red", "circle"),), "grass"),
    Scene((Group(1, "red", "triangle"),), "sand"),
    Scene((Group(4, "green", "square"),), "grass"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-e2e")
    settings = {"max_items_per_request": str(MAX_ITEMS)}
    with serve_stack(tmp, tmp / "repositories", **settings) as running:
        yield running


def pil_images(count: int, size: int = 64, start: int = 0) -> list[Image.Image]:
    return [
        render(SCENES[i % len(SCENES)], start + i, size).image.convert("RGB") for i in range(count)
    ]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def rest_png(stack: Stack, images: list[Image.Image], prompt: str = TRUE_PROMPT) -> list[dict]:
    """The reference: plain REST with base64 PNG, one request per `MAX_ITEMS` images."""
    out: list[dict] = []
    with httpx.Client(base_url=stack.url, headers=AUTH, trust_env=False, timeout=60) as http:
        for k in range(0, len(images), MAX_ITEMS):
            items = [
                {"image": base64.b64encode(png(i)).decode(), "prompt": prompt}
                for i in images[k : k + MAX_ITEMS]
            ]
            r = http.post("/v1/score", json={"items": items, "textnorm": TEXTNORM})
            assert r.status_code == 200, r.text
            out += r.json()["results"]
    return out


def assert_same(result, reference: list[dict], atol: float = 1e-5, fields=REWARDS) -> None:
    assert len(result.results) == len(reference)
    for name in fields:
        want = np.array([np.nan if r[name] is None else r[name] for r in reference])
        assert np.allclose(result.rewards(name), want, atol=atol, equal_nan=True), name


@pytest.fixture(scope="module")
def reference(stack) -> tuple[list[Image.Image], list[dict]]:
    images = pil_images(3, 64) + pil_images(2, 96, start=10)
    images.append(images[0].resize((80, 64)))  # non-square
    return images, rest_png(stack, images)


@pytest.fixture(scope="module")
def client(stack):
    with RewardClient(stack.url, api_key=API_KEY) as c:
        yield c


def test_files_bytes_and_pil_through_sync_and_async_clients(stack, client, reference, tmp_path):
    images, expected = reference
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    assert_same(client.score([png(i) for i in images], TRUE_PROMPT, TEXTNORM), expected)
    assert_same(client.score(paths, TRUE_PROMPT, textnorm=TEXTNORM), expected)
    assert_same(client.score(images, [TRUE_PROMPT] * 6, textnorm=TEXTNORM), expected)

    async def run():
        async with AsyncRewardClient(stack.url, api_key=API_KEY) as a:
            return await asyncio.gather(
                a.score([str(p) for p in paths], TRUE_PROMPT, textnorm=TEXTNORM),
                a.score(images, TRUE_PROMPT, textnorm=TEXTNORM),
            )

    for result in asyncio.run(run()):
        assert_same(result, expected)
        assert result.provenance["model"]["name"] and result.request_id


def test_arrays_and_tensors_as_raw_tensors_give_the_png_rewards(stack, client, reference):
    torch = pytest.importorskip("torch")
    limits = client.limits()
    assert limits.from_service, "the gateway's /v1/models has no `limits` block"
    assert limits.accepts_raw and limits.max_items_per_request == MAX_ITEMS
    images, expected = reference
    arrays = [np.asarray(i) for i in images]
    same_size = np.stack(arrays[:3])  # [3, 64, 64, 3]
    chw = torch.from_numpy(same_size).permute(0, 3, 1, 2)  # [3, 3, 64, 64] uint8
    cases = [
        (arrays, expected),  # numpy [H, W, 3] of three sizes
        (same_size, expected[:3]),  # numpy [N, H, W, 3]
        (same_size.astype(np.float32) / 255, expected[:3]),  # numpy floats in [0, 1]
        (chw, expected[:3]),  # torch uint8 [N, 3, H, W]
        (chw.float() / 255, expected[:3]),  # torch float [N, 3, H, W] in [0, 1]
        ([chw[0].float() / 255, arrays[3], images[4], chw[2]], [expected[i] for i in (0, 3, 4, 2)]),
    ]
    for given, want in cases:
        assert_same(client.score(given, TRUE_PROMPT, textnorm=TEXTNORM), want)

    async def run():
        async with AsyncRewardClient(stack.url, api_key=API_KEY) as a:
            return await asyncio.gather(*(a.score(g, TRUE_PROMPT, TEXTNORM) for g, _ in cases))

    for result, (_, want) in zip(asyncio.run(run()), cases, strict=True):
        assert_same(result, want)


def test_a_call_of_three_times_the_item_limit_is_split_and_reassembled(stack, client):
    limits = client.limits()
    assert limits.from_service, "the gateway's /v1/models has no `limits` block"
    images = pil_images(3 * MAX_ITEMS, 64, start=20)
    prompts = [f"{TRUE_PROMPT}" if i % 2 else "three blue triangles on a grass background"
               for i in range(len(images))]  # fmt: skip
    expected = []
    for image, prompt in zip(images, prompts, strict=True):  # each alone: order-free reference
        expected += rest_png(stack, [image], prompt)
    with httpx.Client(base_url=stack.url, headers=AUTH, trust_env=False, timeout=60) as http:
        items = [{"image": base64.b64encode(png(i)).decode(), "prompt": TRUE_PROMPT}
                 for i in images]  # fmt: skip
        too_many = http.post("/v1/score", json={"items": items})
    assert too_many.status_code in (413, 422), too_many.text  # the limit is real
    arrays = np.stack([np.asarray(i) for i in images])
    result = client.score(arrays, prompts, textnorm=TEXTNORM, request_id="split-12")
    assert result.chunk_request_ids == ["split-12.0", "split-12.1", "split-12.2"]
    assert_same(result, expected)

    async def run():
        async with AsyncRewardClient(stack.url, api_key=API_KEY, max_concurrency=3) as a:
            return await a.score(list(images), prompts, textnorm=TEXTNORM)

    assert_same(asyncio.run(run()), expected)


def test_grpc_client_gives_the_rest_rewards(stack, reference):
    torch = pytest.importorskip("torch")
    images, expected = reference
    with GrpcRewardClient(stack.grpc_url, stack.repository, timeout_s=30) as grpc:
        assert_same(grpc.score([np.asarray(i) for i in images], TRUE_PROMPT, CONTRASTIVE), expected)
        assert_same(grpc.score([png(i) for i in images], TRUE_PROMPT, textnorm=TEXTNORM), expected)
        chw = torch.from_numpy(np.stack([np.asarray(i) for i in images[:3]])).permute(0, 3, 1, 2)
        assert_same(grpc.score(chw.float() / 255, TRUE_PROMPT, CONTRASTIVE), expected[:3])
        group = grpc.score_group(TRUE_PROMPT, images[:3], contrastive=CONTRASTIVE)
    values = np.array([r["textnorm"] for r in expected[:3]])
    assert np.allclose(group.advantage_array(), (values - values.mean()) / (values.std() + 1e-6))


def test_adapters_give_the_rest_rewards(stack, client, reference):
    torch = pytest.importorskip("torch")
    images, expected = reference
    batch = torch.from_numpy(np.stack([np.asarray(i) for i in images[:3]])).permute(0, 3, 1, 2)
    batch = batch.float() / 255  # what a VAE decodes to
    want = np.array([r["textnorm"] for r in expected[:3]])
    reward_fn = DdpoRewardFn(client, textnorm=TEXTNORM)
    rewards, info = reward_fn(batch, [TRUE_PROMPT] * 3, [{}] * 3)
    future = reward_fn.submit(batch, [TRUE_PROMPT] * 3, [{}] * 3)
    later, _ = future.result(timeout=60)
    reward_fn.close()
    assert np.allclose(rewards, want, atol=1e-5) and np.allclose(later, want, atol=1e-5)
    assert np.allclose(info["raw"], [r["raw"] for r in expected[:3]], atol=1e-5)

    grpo = grpo_reward_fn(client, textnorm=TEXTNORM)
    assert np.allclose(grpo([TRUE_PROMPT] * 6, images), [r["textnorm"] for r in expected], 0, 1e-5)

    async def run():
        async with AsyncRewardClient(stack.url, api_key=API_KEY) as a:
            return await async_grpo_reward_fn(a, textnorm=TEXTNORM)([TRUE_PROMPT] * 3, batch)

    assert np.allclose(asyncio.run(run()), want, atol=1e-5)

    # groups: one within the item limit (the service's advantages), one over it (the client's)
    values = np.array([r["textnorm"] for r in expected])
    small = client.score_group(TRUE_PROMPT, images[:3], textnorm=TEXTNORM)
    big = client.score_group(TRUE_PROMPT, images, textnorm=TEXTNORM)
    assert small.advantages_computed_by == "service" and big.advantages_computed_by == "client"
    for group, v in ((small, values[:3]), (big, values)):
        assert np.allclose(group.rewards("textnorm"), v, atol=1e-5)
        assert np.allclose(group.advantage_array(), (v - v.mean()) / (v.std() + 1e-6), atol=1e-4)
    rewards, advantages = group_advantages(
        client, images, [TRUE_PROMPT, "x"] * 3, textnorm=TEXTNORM
    )
    assert np.allclose(rewards[::2], values[::2], atol=1e-5)  # the TRUE_PROMPT group


def test_the_readme_examples_run_against_the_stack(stack, tmp_path):
    """Every `python` block of client/README.md that names REWARD_URL runs as written."""
    text = (REPO_ROOT / "client" / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    runnable = [b for b in blocks if "REWARD_URL" in b]
    assert len(runnable) >= 4  # clients, the DDPO fn, the TRL fns, the tracker and groups
    env = {**os.environ, "REWARD_URL": stack.url, "REWARD_API_KEY": API_KEY}
    for k, block in enumerate(runnable):
        script = tmp_path / f"example_{k}.py"
        script.write_text(block)
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, f"example {k}:\n{block}\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"example {k} printed nothing"


def test_triton_killed_under_200_async_calls_gives_right_rewards_or_the_error(stack, client):
    """Every call returns the undisturbed rewards item by item, or raises RewardServiceError."""
    images = [np.asarray(i) for i in pil_images(8, 64, start=40)]
    undisturbed = client.score(images, TRUE_PROMPT, textnorm=TEXTNORM)
    want = {name: undisturbed.rewards(name) for name in REWARDS}
    pairs = [(k % 8, (k + 3) % 8) for k in range(200)]
    old_pid = stack.triton_pid()
    assert old_pid is not None
    retry = RetryPolicy(attempts=8, backoff_base_s=0.2, backoff_max_s=2.0, max_retry_after_s=5)
    answers: list[int | str] = []  # every status (or transport error) the client met

    class Counting(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            try:
                response = await super().handle_async_request(request)
            except httpx.TransportError as exc:
                answers.append(type(exc).__name__)
                raise
            answers.append(response.status_code)
            return response

    async def run():
        done = 0
        async with AsyncRewardClient(
            stack.url, api_key=API_KEY, retry=retry, deadline_s=25, max_concurrency=64,
            transport=Counting(),
        ) as a:  # fmt: skip

            async def one(k: int):
                nonlocal done
                i, j = pairs[k]
                try:
                    return await a.score([images[i], images[j]], TRUE_PROMPT, TEXTNORM, f"kill-{k}")
                finally:
                    done += 1

            tasks = [asyncio.ensure_future(one(k)) for k in range(200)]
            while done < 10:
                await asyncio.sleep(0.01)
            os.kill(old_pid, signal.SIGKILL)
            killed_at = done
            return await asyncio.gather(*tasks, return_exceptions=True), killed_at

    began = time.monotonic()
    outcomes, killed_at = asyncio.run(run())
    took = time.monotonic() - began
    scored, failed = 0, []
    for (i, j), outcome in zip(pairs, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, RewardServiceError), repr(outcome)
            failed.append(outcome.code or outcome.status)
            continue
        scored += 1
        assert len(outcome.results) == 2
        for name in REWARDS:
            got = outcome.rewards(name)
            assert np.allclose(got, [want[name][i], want[name][j]], atol=1e-5), (name, i, j)
    retried = [a for a in answers if a != 200]
    print(f"killed after {killed_at} of 200; {scored} scored, {len(failed)} raised "
          f"({sorted(set(map(str, failed)))}) in {took:.1f} s; {len(answers)} answers, "
          f"retryable ones: {sorted(set(map(str, retried)))} × {len(retried)}")  # fmt: skip
    assert killed_at < 200 and scored + len(failed) == 200
    assert retried, "the kill disturbed no call: nothing was tested"
    deadline = time.monotonic() + 60  # the watchdog restarts Triton: the stack serves again
    while True:
        try:
            after = client.score(images[:2], TRUE_PROMPT, textnorm=TEXTNORM)
            break
        except RewardServiceError:
            assert time.monotonic() < deadline, stack.output()
            time.sleep(0.5)
    assert np.allclose(after.rewards("textnorm"), want["textnorm"][:2], atol=1e-5)
    assert stack.triton_pid() not in (None, old_pid)
