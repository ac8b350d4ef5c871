"""A real tritonserver on loopback serving an exported CPU repository (no mocks).

Server lifecycle (`service.triton_server`), the async gRPC client
(`service.gateway.triton_backend`), parity with ONNX Runtime run in-process on the same ONNX
files, dynamic batching, large images, error mapping, and recovery of one client object across
a server restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from service.gateway.triton_backend import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    RewardBackend,
    executions_by_batch_size,
)
from service.model_contract import CONTEXT_LENGTH, MAX_PROMPTS, version_dir
from service.triton_server import (
    TritonServer,
    TritonStartError,
    free_ports,
    group_alive,
    pid_alive,
)

pytest_plugins = ("tests.conftest_triton",)  # the triton_repo and triton_server fixtures

pytestmark = [pytest.mark.slow, pytest.mark.serial]
MODELS = ("image_encoder", "text_encoder", "reward_head")
TOL = 1e-6


def run(coro):
    return asyncio.run(coro)


def session(repo, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(version_dir(repo, name) / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def token_ids(rng: np.random.Generator, batch: int) -> np.ndarray:
    ids = np.zeros((batch, CONTEXT_LENGTH), np.int64)
    for row in ids:
        n = int(rng.integers(3, 20))
        row[:n] = rng.integers(1, 100, n)
    return ids


def reward_inputs(rng: np.random.Generator, batch: int, dim: int) -> list[np.ndarray]:
    mask = np.zeros((batch, MAX_PROMPTS), bool)
    for i in range(batch):
        mask[i, : 1 + int(rng.integers(0, MAX_PROMPTS))] = True
    return [
        rng.standard_normal((batch, dim)).astype(np.float32),
        rng.standard_normal((batch, MAX_PROMPTS, dim)).astype(np.float32),
        mask,
        rng.uniform(1, 10, (batch, 1)).astype(np.float32),
        rng.uniform(0, 2, (batch, 1)).astype(np.float32),
    ]


def test_server_endpoints_and_models_ready(triton_server):
    assert triton_server.running() and pid_alive(triton_server.pid)
    assert triton_server.grpc_url.startswith("127.0.0.1:")
    assert triton_server.is_ready()
    assert triton_server.startup_seconds is not None and triton_server.startup_seconds < 60

    async def check():
        async with RewardBackend(triton_server.grpc_url, timeout=30) as backend:
            assert await backend.ready()
            assert backend.reward_outputs == ("RAW", "TEXTNORM")
            assert backend.embed_dim and backend.embed_dim > 0
            for model in MODELS:
                stats = await backend.model_stats(model)
                assert stats["name"] == model

    run(check())


def test_outputs_match_onnxruntime(triton_server, triton_repo):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 120, 90, 3), dtype=np.uint8)
    ids = token_ids(rng, 4)

    async def through_triton():
        async with RewardBackend(triton_server.grpc_url, timeout=30) as backend:
            image_embeds = await backend.encode_images(images)
            text_embeds = await backend.encode_texts(ids)
            head = reward_inputs(rng, 5, backend.embed_dim)
            rewards = await backend.rewards(*head)
            return image_embeds, text_embeds, head, rewards

    image_embeds, text_embeds, head, rewards = run(through_triton())

    (ref_images,) = session(triton_repo, "image_encoder").run(None, {"IMAGE": images})
    (ref_texts,) = session(triton_repo, "text_encoder").run(None, {"INPUT_IDS": ids})
    reward_session = session(triton_repo, "reward_head")
    feeds = {i.name: a for i, a in zip(reward_session.get_inputs(), head, strict=True)}
    ref_rewards = dict(
        zip(
            [o.name for o in reward_session.get_outputs()],
            reward_session.run(None, feeds),
            strict=True,
        )
    )
    assert image_embeds.shape == ref_images.shape and image_embeds.dtype == np.float32
    np.testing.assert_allclose(image_embeds, ref_images, rtol=0, atol=TOL)
    np.testing.assert_allclose(text_embeds, ref_texts, rtol=0, atol=TOL)
    assert set(rewards) == set(ref_rewards) == {"RAW", "TEXTNORM"}
    for name, value in rewards.items():
        assert value.shape == (5, 1)
        np.testing.assert_allclose(value, ref_rewards[name], rtol=0, atol=TOL)


def test_concurrent_requests_are_batched(triton_server):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 1, 224, 224, 3), dtype=np.uint8)

    async def burst():
        async with RewardBackend(triton_server.grpc_url, timeout=30) as backend:
            before = executions_by_batch_size(await backend.model_stats("image_encoder"))
            for _ in range(3):  # one burst normally suffices; retry if the host is very busy
                outs = await asyncio.gather(*(backend.encode_images(i) for i in images))
                assert all(o.shape == (1, backend.embed_dim) for o in outs)
                after = executions_by_batch_size(await backend.model_stats("image_encoder"))
                delta = {b: n - before.get(b, 0) for b, n in after.items()}
                delta = {b: n for b, n in delta.items() if n}
                if any(b > 1 for b in delta):
                    return delta
                before = after
            return delta

    delta = run(burst())
    print("image_encoder executions by batch size:", delta)
    assert any(size > 1 for size in delta), delta
    assert sum(size * n for size, n in delta.items()) % 16 == 0


def test_large_image_and_model_errors(triton_server):
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (1, 2048, 2048, 3), dtype=np.uint8)  # 12 MiB > gRPC's 4 MiB

    async def check():
        async with RewardBackend(triton_server.grpc_url, timeout=60) as backend:
            (embed,) = await backend.encode_images(big)
            assert embed.shape == (backend.embed_dim,) and np.isfinite(embed).all()
            with pytest.raises(BackendError):  # token id outside the vocabulary
                await backend.encode_texts(np.full((1, CONTEXT_LENGTH), 10**9, np.int64))
            with pytest.raises(BackendError):  # over max_batch_size 16
                await backend.encode_texts(np.zeros((17, CONTEXT_LENGTH), np.int64))
        hasty = RewardBackend(triton_server.grpc_url, timeout=1e-3)
        try:
            with pytest.raises(BackendTimeout):  # a BackendUnavailable: the gateway's 503
                await hasty.encode_images(big)
        finally:
            await hasty.close()

    run(check())


def test_broken_repository_fails_fast_with_log(tmp_path):
    (tmp_path / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "config.pbtxt").write_text("this is not a config {")
    server = TritonServer(tmp_path / "repo", log_file=tmp_path / "log", startup_timeout=60)
    with pytest.raises(TritonStartError, match="exited with code") as info:
        server.start()
    assert "broken" in str(info.value)  # the log tail names the failing model
    assert server.pid is None and not server.running()


def test_a_relative_runtime_dir_serves_and_a_taken_port_is_a_start_error(
    triton_repo, tmp_path, monkeypatch
):
    import socket

    # Triton runs with the runtime dir as its cwd: a relative one was resolved twice, and
    # every model failed with "unable to find backend library".
    monkeypatch.chdir(tmp_path)
    server = TritonServer(triton_repo, runtime_dir="rt", log_file=tmp_path / "log").start()
    try:
        assert server.is_ready() and (tmp_path / "rt" / "backends").is_dir()
    finally:
        server.stop()
    # A metrics port somebody else listens on: Triton went on without metrics, and `serve`
    # printed the other listener's URL as Triton's.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http, grpc = free_ports(2, "127.0.0.1")
        server = TritonServer(
            triton_repo, http_port=http, grpc_port=grpc, metrics_port=port, log_file=tmp_path / "l"
        )
        with pytest.raises(TritonStartError, match=f"metrics on port {port}"):
            server.start()
        assert server.pid is None and not server.running()


def test_server_dies_with_its_parent(triton_repo, tmp_path):
    """A server whose parent is SIGKILLed goes away with its stubs: no orphans."""
    script = (
        "import sys, time\n"
        "from service.triton_server import TritonServer\n"
        "server = TritonServer(sys.argv[1], log_file=sys.argv[2], startup_timeout=60).start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(triton_repo), str(tmp_path / "log")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while group_alive(pid):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            pytest.fail(f"tritonserver group {pid} outlived its parent")
        time.sleep(0.1)


def test_stop_makes_backend_unavailable_and_restart_recovers(triton_server):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    ids = token_ids(rng, 1)

    async def scenario():
        backend = RewardBackend(triton_server.grpc_url, timeout=10, ready_timeout=1)
        try:
            assert await backend.ready()
            before = await backend.encode_images(image)
            head = reward_inputs(rng, 1, backend.embed_dim or before.shape[1])

            pid = triton_server.pid
            triton_server.stop()
            assert not pid_alive(pid) and not group_alive(pid)
            assert triton_server.pid is None
            assert not await backend.ready()
            for call in (
                backend.encode_images(image),
                backend.encode_texts(ids),
                backend.rewards(*head),
                backend.model_stats("image_encoder"),
            ):
                with pytest.raises(BackendUnavailable):
                    await call

            triton_server.start()  # same ports: the client keeps its URL
            assert triton_server.pid != pid
            deadline = time.monotonic() + 15
            while not await backend.ready():
                assert time.monotonic() < deadline, "client did not recover"
                await asyncio.sleep(0.1)
            after = await backend.encode_images(image)
            np.testing.assert_array_equal(after, before)
            assert set(await backend.rewards(*head)) == {"RAW", "TEXTNORM"}
        finally:
            await backend.close()

    run(scenario())


def test_an_old_channel_is_replaced_and_closed_after_its_calls(triton_server):
    # gRPC resolves DNS again only when a connection fails: with one channel for ever, Triton
    # pods added behind the headless Service never got a call from the gateway (0 of ~3,900
    # over 87 s in a review's test). A channel past its age is replaced; calls on it finish.
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)

    async def scenario():
        backend = RewardBackend(triton_server.grpc_url, timeout=1.0, channel_max_age_s=0.3)
        try:
            first = await backend.encode_images(image)
            old = backend._grpc()
            in_flight = asyncio.create_task(backend.encode_images(image))  # on the old channel
            await asyncio.sleep(0.4)
            again = await backend.encode_images(image)  # on a new one
            assert backend._grpc() is not old and old in backend._retired
            np.testing.assert_array_equal(await in_flight, first)
            np.testing.assert_array_equal(again, first)
            deadline = time.monotonic() + 10
            while old in backend._retired:  # closed once its calls' timeout has passed
                assert time.monotonic() < deadline, "the old channel was never closed"
                await asyncio.sleep(0.1)
        finally:
            await backend.close()
        assert not backend._retired

    run(scenario())
