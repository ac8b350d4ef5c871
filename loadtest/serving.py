"""`reward-service bench serving`: throughput of the running product, with its ceiling.

Starts the real stack (`reward-service serve` in a subprocess, free loopback ports), then for
each concurrency C runs C closed-loop clients for a fixed time and counts scored images:
- gateway: `POST /v1/score`, one image per request (the trainer-side pattern of many small
  calls), TextNorm with the rule's contrastive prompts (text embeddings cached after the first);
- grpc: Triton's `score` model directly (KServe v2), one image plus 33 token-id rows per call
  — every call re-encodes its prompts, as a trainer without the gateway's cache would;
- ceiling: the image encoder's ONNX file in this process under ONNX Runtime at batch 1/8/32.
Each figure is the median of `runs` timed windows. Machines here are noisy: compare ratios.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from service.contrastive import contrastive_prompts
from service.gateway.clip_tokenizer import ClipTokenizer
from service.model_contract import MAX_PROMPTS
from service.triton_server import free_ports
from shapes_world.render import render
from shapes_world.scene import Group, Scene

PROMPT = "three blue triangles on a grass background"
SCENE = Scene((Group(3, "blue", "triangle"),), "grass")


class Stack:
    """`reward-service serve` in a subprocess on free loopback ports."""

    def __init__(self, workdir: Path, ready_timeout_s: float = 240) -> None:
        self.gateway_port, self.grpc_port, http, metrics = free_ports(4, "127.0.0.1")
        env = dict(
            os.environ,
            REWARD_PORT=str(self.gateway_port),
            REWARD_TRITON_GRPC_PORT=str(self.grpc_port),
            REWARD_TRITON_HTTP_PORT=str(http),
            REWARD_TRITON_METRICS_PORT=str(metrics),
        )
        self.log = workdir / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            self.stop()
            raise RuntimeError("the stack did not become ready in time")
        found = re.search(r"repository (\S+)\)", self.log.read_text())
        self.repository = Path(found.group(1)) if found else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _png(size: int = 128) -> bytes:
    buf = io.BytesIO()
    render(SCENE, seed=1, size=size).image.save(buf, format="PNG")
    return buf.getvalue()


async def _closed_loop(
    call: Callable[[], Awaitable[int]], concurrency: int, seconds: float
) -> float:
    """images/s of `concurrency` workers each calling `call` back to back for `seconds`."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            images = await call()  # not `done += await call()`: that reads `done` before the
            done += images  # await, so concurrent workers would overwrite each other's counts

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def _gateway_rates(url: str, concurrencies, seconds, runs) -> dict[int, float]:
    body = {"items": [{"image": base64.b64encode(_png()).decode(), "prompt": PROMPT}]}
    limits = httpx.Limits(max_connections=max(concurrencies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def call() -> int:
            response = await client.post("/v1/score", json=body)
            response.raise_for_status()
            return 1

        await call()  # warm the prompt-embedding cache
        return {
            c: statistics.median([await _closed_loop(call, c, seconds) for _ in range(runs)])
            for c in concurrencies
        }


async def _grpc_rates(grpc_url: str, tokenizer_file: Path, concurrencies, seconds, runs):
    import tritonclient.grpc.aio as grpcclient

    texts = [PROMPT, *contrastive_prompts(PROMPT)][:MAX_PROMPTS]
    ids = np.zeros((1, MAX_PROMPTS, 77), np.int64)
    ids[0, : len(texts)] = ClipTokenizer(tokenizer_file).encode(texts).ids
    mask = np.zeros((1, MAX_PROMPTS), bool)
    mask[0, : len(texts)] = True
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(_png())).convert("RGB"))[None]
    arrays = {
        "IMAGE": image,
        "INPUT_IDS": ids,
        "PROMPT_MASK": mask,
        "TEXTNORM_SCALE": np.full((1, 1), 5.0, np.float32),
        "ENSEMBLE_LAMBDA": np.ones((1, 1), np.float32),
    }
    dtypes = {
        "IMAGE": "UINT8",
        "INPUT_IDS": "INT64",
        "PROMPT_MASK": "BOOL",
        "TEXTNORM_SCALE": "FP32",
        "ENSEMBLE_LAMBDA": "FP32",
    }
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        inputs = []
        for name, value in arrays.items():
            tensor = grpcclient.InferInput(name, list(value.shape), dtypes[name])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)

        async def call() -> int:
            await client.infer("score", inputs, outputs=[grpcclient.InferRequestedOutput("RAW")])
            return 1

        await call()
        return {
            c: statistics.median([await _closed_loop(call, c, seconds) for _ in range(runs)])
            for c in concurrencies
        }
    finally:
        await client.close()


def ceiling_rates(onnx_path: Path, batches=(1, 8, 32), seconds: float = 2.0, runs: int = 3):
    """In-process ONNX Runtime, image encoder only, same 128-px world image."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(_png())).convert("RGB"))
    rates = {}
    for b in batches:
        feed = {"IMAGE": np.repeat(image[None], b, axis=0)}
        session.run(None, feed)
        samples = []
        for _ in range(runs):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                session.run(None, feed)
                n += b
            samples.append(n / (time.perf_counter() - start))
        rates[b] = statistics.median(samples)
    return rates


def bench_serving(workdir: Path, concurrencies=(1, 8, 32), seconds: float = 5.0, runs: int = 3):
    """{"gateway": {C: img/s}, "grpc": {C: img/s}, "ceiling_onnxruntime": {batch: img/s}}."""
    stack = Stack(workdir)
    try:
        tokenizer = stack.repository / "tokenizer.json"
        grpc_url = f"127.0.0.1:{stack.grpc_port}"
        result = {
            "gateway": asyncio.run(_gateway_rates(stack.url, concurrencies, seconds, runs)),
            "grpc": asyncio.run(_grpc_rates(grpc_url, tokenizer, concurrencies, seconds, runs)),
        }
    finally:
        stack.stop()
    onnx_path = stack.repository / "image_encoder" / "1" / "model.onnx"
    result["ceiling_onnxruntime"] = ceiling_rates(onnx_path)
    return result
