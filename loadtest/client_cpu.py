"""Client CPU time to send one batch of images: raw tensors vs PNG (vs raw + client resize).

    .venv/bin/python loadtest/client_cpu.py                       # 8 images at 512 px, 9 runs
    .venv/bin/python loadtest/client_cpu.py --images 8 --size 512 --runs 9 --url http://...

`time.process_time()` (every thread of this process: the encoding pool included) around one
`RewardClient.score` call, median of `--runs` after one warm-up call. Without `--url` the call
goes to an in-process `httpx.MockTransport` that answers at once, so the number is the
client's own work (conversion, PNG or raw encoding, base64, JSON) and no server's; with
`--url` a live gateway answers (and its time on the wire is not CPU time of this process).
Images: shapes-world renders (flat colours: PNG's best case) and the same with noise (closer to
a diffusion sample: PNG's usual case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
import numpy as np
from textnorm_reward_client import RewardClient

from shapes_world.render import render
from shapes_world.sampling import random_scene

SENT: list[int] = []  # body bytes of each request the mock received
LIMITS = {"max_items_per_request": 64, "image_formats": ["png", "raw"], "raw_dtypes": ["uint8"]}


def fake_service(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"models": [{"image_size": 224}], "limits": LIMITS})
    SENT.append(len(request.content))
    body = json.loads(request.content)
    results = [{"raw": 0.0, "textnorm": 0.5} for _ in body["items"]]
    return httpx.Response(
        200, json={"request_id": body["request_id"], "results": results, "provenance": {}}
    )


def batch(n: int, size: int, noise: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = np.stack(
        [np.asarray(render(random_scene(rng), i, size).image.convert("RGB")) for i in range(n)]
    )
    if noise:
        jitter = rng.normal(0, 12, images.shape)
        images = np.clip(images + jitter, 0, 255).astype(np.uint8)
    return images


def cpu_seconds(client: RewardClient, images: np.ndarray, runs: int) -> tuple[float, float]:
    """Median (client CPU seconds, wall seconds) of one `score` call."""
    client.score(images, "a prompt")  # warm-up (limits read, pools started)
    cpu, wall = [], []
    for _ in range(runs):
        began, began_wall = time.process_time(), time.perf_counter()
        client.score(images, "a prompt")
        cpu.append(time.process_time() - began)
        wall.append(time.perf_counter() - began_wall)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--url", default=None, help="a live gateway (default: in-process mock)")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    transport = None if args.url else httpx.MockTransport(fake_service)
    url = args.url or "http://mock"
    modes = {
        "png": {"raw_tensors": False},
        "raw": {"raw_tensors": True},
        "raw+resize": {"raw_tensors": True, "resize": True},
    }
    print(f"{args.images} images at {args.size} px, median of {args.runs} runs, client CPU (ms)")
    for noise in (False, True):
        images = batch(args.images, args.size, noise)
        row, walls, sizes = {}, {}, {}
        for name, options in modes.items():
            with RewardClient(url, api_key=args.api_key, transport=transport, **options) as c:
                cpu, wall = cpu_seconds(c, images, args.runs)
                row[name], walls[name] = cpu * 1000, wall * 1000
                sizes[name] = SENT[-1] / 1e6 if SENT else float("nan")
        kind = "renders+noise" if noise else "renders"
        cells = "  ".join(f"{k} {v:7.1f}" for k, v in row.items())
        print(f"{kind:14s} {cells}   png/raw = {row['png'] / row['raw']:.1f}×")
        if args.url:
            print(f"{'':14s} wall ms: " + "  ".join(f"{k} {v:.1f}" for k, v in walls.items()))
        else:
            print(f"{'':14s} body MB: " + "  ".join(f"{k} {v:.2f}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
