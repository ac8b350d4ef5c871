"""The whole product end to end on loopback, no mocks: `reward-service serve` in a subprocess.

One module fixture launches `python -m service.cli serve` (export into a temporary
`REWARD_REPOSITORIES_DIR` → the bundled tritonserver → the FastAPI gateway under uvicorn) on
free loopback ports, and stops it with SIGTERM at the end, checking that the launcher exits and
that no tritonserver or Python-backend stub process is left behind. The tests talk to it as a
trainer would: REST with a Bearer key, and KServe v2 gRPC straight to Triton's `score` model.

- REST rewards equal the in-process PyTorch reference (HF processor + torch CLIP + torch head +
  numpy TextNorm) within 1e-4, on square and non-square world images;
- the true prompt's TextNorm beats one-attribute-off prompts' (≥ 80 %);
- Triton's `score` model over gRPC returns the REST numbers within 1e-6;
- concurrent REST requests reach the image encoder as dynamic batches (Triton's statistics);
- malformed, oversized and unauthenticated requests get the right 4xx through the real stack;
- SIGKILLed Triton: 503 + Retry-After, then the launcher's watchdog restarts it and scoring
  resumes in the same gateway process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from textnorm_reward_client.clip_tokenizer import ClipTokenizer

from loadtest.processes import children, named_child
from service.gateway.triton_backend import executions_by_batch_size
from service.model_contract import MAX_PROMPTS
from service.settings import SHIPPED_HEAD_DIR, SHIPPED_MODEL_DIR
from service.textnorm import ensemble_mean, ensemble_uncertainty, textnorm
from service.triton_server import free_ports, group_alive, pid_alive
from shapes_world.grammar import describe
from shapes_world.perturb import perturb
from shapes_world.render import render
from shapes_world.sampling import random_scene
from shapes_world.scene import Caption, Group, Scene
from shapes_world.vocab import ATTRIBUTES
from tests.conftest import REPO_ROOT, assert_error

pytestmark = [pytest.mark.slow, pytest.mark.serial]

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Limits lowered for this stack so the oversize cases stay cheap (every other image is smaller).
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 1024 * 1024
MAX_ITEMS = 8
READY_DEADLINE_S = 180
STOP_DEADLINE_S = 30
REWARDS = ("raw", "textnorm", "head", "textnorm_head", "ensemble_mean", "ensemble_uw")
OUTPUT_OF = {r: r.upper() for r in REWARDS}  # REST field → `score` model output

TRUE_SCENE = Scene(groups=(Group(3, "red", "triangle"),), background="grass")
TRUE_PROMPT = "three red triangles on a grass background"
CONTRASTIVE = [
    "two red triangles on a grass background",
    "three blue triangles on a grass background",
    "three red circles on a grass background",
    "three red triangles on a sand background",
]
_TRITON_LINE = re.compile(r"triton: gRPC (\S+) .*\(pid (\d+), repository (.+)\)")
_RESTARTED = re.compile(r"tritonserver restarted \(pid (\d+)\)")


# -- the stack -------------------------------------------------------------------------------------
@dataclass
class Stack:
    proc: subprocess.Popen
    url: str
    grpc_url: str
    repository: Path
    log_path: Path
    triton_pids: set[int] = field(default_factory=set)  # every tritonserver seen, for teardown

    def output(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def triton_pid(self) -> int | None:
        """PID of the launcher's running tritonserver child (None while there is none)."""
        pid = named_child(self.proc.pid, "tritonserver")
        if pid is not None:
            self.triton_pids.add(pid)
        return pid


def _serve_env(tmp: Path, gateway_port: int, triton_ports: list[int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARD_")}
    grpc, http, metrics = triton_ports
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
        REWARD_HOST="127.0.0.1",
        REWARD_PORT=str(gateway_port),
        REWARD_TRITON_GRPC_PORT=str(grpc),
        REWARD_TRITON_HTTP_PORT=str(http),
        REWARD_TRITON_METRICS_PORT=str(metrics),
        REWARD_API_KEYS=f'["{API_KEY}"]',
        REWARD_REPOSITORIES_DIR=str(tmp / "repositories"),
        REWARD_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        REWARD_MAX_IMAGE_PIXELS=str(MAX_IMAGE_PIXELS),
        REWARD_MAX_ITEMS_PER_REQUEST=str(MAX_ITEMS),
    )
    return env


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as client:
        while True:
            if proc.poll() is not None:
                output = log_path.read_text(errors="replace")[-6000:]
                pytest.fail(f"`serve` exited with {proc.returncode} before ready:\n{output}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")[-6000:]
                pytest.fail(f"/readyz not 200 after {READY_DEADLINE_S} s:\n{output}")
            time.sleep(0.25)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process `pid` and its process group (Triton's stubs) are gone."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid) or group_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _stop(stack: Stack) -> list[str]:
    """SIGTERM the launcher; the problems found (empty: stopped cleanly, nothing left)."""
    problems = []
    stack.triton_pid()  # record the current server (the watchdog may have replaced the first)
    stack.triton_pids |= {int(p) for p in _RESTARTED.findall(stack.log_path.read_text())}
    began = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    try:
        stack.proc.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        problems.append(f"launcher still running {STOP_DEADLINE_S} s after SIGTERM")
        _kill_group(stack.proc.pid)
        stack.proc.wait()
    stopped = time.monotonic() - began
    if stack.proc.returncode != 0:
        problems.append(f"launcher exited with {stack.proc.returncode}, not 0, after SIGTERM")
    print(f"launcher exited with {stack.proc.returncode} {stopped:.1f} s after SIGTERM")
    for pid in sorted(stack.triton_pids):
        left = max(5.0, STOP_DEADLINE_S - (time.monotonic() - began))
        if not _wait_gone(pid, left):
            problems.append(f"tritonserver {pid} or a process of its group outlived the launcher")
            _kill_group(pid)
    return problems


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    gateway_port, *triton_ports = free_ports(4)
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=REPO_ROOT,
            env=_serve_env(tmp, gateway_port, triton_ports),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        began = time.monotonic()
        _wait_ready(proc, url, log_path)
        print(f"stack ready in {time.monotonic() - began:.1f} s")
        found = _TRITON_LINE.search(log_path.read_text())
        assert found, f"no `triton: gRPC ...` line in the output:\n{log_path.read_text()}"
        grpc_url, pid, repository = found.group(1), int(found.group(2)), Path(found.group(3))
        assert grpc_url == f"127.0.0.1:{triton_ports[0]}"  # the port we asked for, loopback
        assert repository.parent == tmp / "repositories" and repository.is_dir()
        stack = Stack(proc, url, grpc_url, repository, log_path, {pid})
        assert stack.triton_pid() == pid  # the line names the launcher's tritonserver child
    except BaseException:
        for pid in [*children(proc.pid), proc.pid]:
            _kill_group(pid)
        proc.wait()
        raise
    yield stack
    problems = _stop(stack)
    assert not problems, "\n".join(problems) + "\n" + stack.output()


@pytest.fixture(scope="module")
def client(stack):
    with httpx.Client(base_url=stack.url, headers=AUTH, trust_env=False, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def defaults(client) -> dict:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    card = r.json()["models"][0]
    assert card["head"] is not None, "the shipped head should be served"
    return card["textnorm_defaults"]


@pytest.fixture(scope="module")
def grpc(stack):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(stack.grpc_url)
    yield client
    client.close()


# -- helpers ---------------------------------------------------------------------------------------
def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def world_image(scene: Scene, seed: int, width: int, height: int | None = None) -> Image.Image:
    """A rendered world image, resized to width × height when not square."""
    height = height or width
    image = render(scene, seed, max(width, height)).image
    return image if width == height else image.resize((width, height), Image.Resampling.BICUBIC)


def one_off_prompts(scene: Scene, rng: np.random.Generator) -> list[str]:
    """The scene's description with one attribute changed, for each attribute (distinct)."""
    true = describe(Caption.of(scene))
    out: list[str] = []
    for attribute in ATTRIBUTES:
        prompt = describe(Caption.of(perturb(scene, attribute, rng)))
        if prompt != true and prompt not in out:
            out.append(prompt)
    return out


def score(client: httpx.Client, items: list[dict], **textnorm_options) -> list[dict]:
    body: dict = {"items": items}
    if textnorm_options:
        body["textnorm"] = textnorm_options
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


# -- 1. REST = PyTorch reference -------------------------------------------------------------------
class TorchReference:
    """HF image processor + torch CLIP + torch reward head + numpy TextNorm (export/verify.py)."""

    def __init__(self) -> None:
        from export.clip_model import load_clip
        from export.reward_head import load_head

        self.bundle = load_clip(SHIPPED_MODEL_DIR)
        self.head = load_head(SHIPPED_HEAD_DIR)[0]

    def rewards(self, image: Image.Image, texts: list[str], scale: float, lam: float) -> dict:
        import torch

        from export.clip_model import image_embeddings, text_embeddings, tokenize

        px = self.bundle.processor(images=[image], return_tensors="pt")["pixel_values"]
        img = image_embeddings(self.bundle.model, px)[0]
        txt = text_embeddings(self.bundle.model, tokenize(self.bundle.tokenizer, texts))
        sims = (txt.double() @ img.double()).numpy()
        with torch.no_grad():
            logits = self.head.logits(img[None], txt).double().numpy()
        tn, tn_head = float(textnorm(sims, scale)), float(textnorm(logits, scale))
        probs = np.array([tn, tn_head])
        return {
            "raw": float(sims[0]),
            "textnorm": tn,
            "head": float(1.0 / (1.0 + np.exp(-logits[0]))),
            "textnorm_head": tn_head,
            "ensemble_mean": float(ensemble_mean(probs)),
            "ensemble_uw": float(ensemble_uncertainty(probs, lam)),
        }


def test_rest_rewards_equal_pytorch_reference(client, defaults):
    reference = TorchReference()
    scale, lam = defaults["scale"], defaults["ensemble_lambda"]
    rng = np.random.default_rng(11)
    # (width, height): the model's own size, larger squares, tall and wide non-square images.
    sizes = [(64, 64), (128, 128), (200, 200), (90, 150), (160, 72)]
    items, expected = [], []
    for k, (w, h) in enumerate(sizes):
        scene = random_scene(rng, 1 + k % 2)
        prompt = describe(Caption.of(scene))
        contrastive = one_off_prompts(scene, rng)
        image = world_image(scene, 100 + k, w, h)
        assert np.asarray(image).shape == (h, w, 3)
        items.append({"image": b64(image), "prompt": prompt, "contrastive": contrastive})
        expected.append(reference.rewards(image, [prompt, *contrastive], scale, lam))
    results = score(client, items)
    assert len(results) == len(items)
    worst = dict.fromkeys(REWARDS, 0.0)
    for got, want, item in zip(results, expected, items, strict=True):
        assert got["contrastive_source"] == "explicit"
        assert got["contrastive_count"] == len(item["contrastive"])
        for name in REWARDS:
            worst[name] = max(worst[name], abs(got[name] - want[name]))
    print("max |REST - torch| per reward:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert all(diff <= 1e-4 for diff in worst.values()), worst


def test_the_default_export_bundles_the_shipped_calibration(client, stack):
    """`make serve` serves the calibrated c: the export carries the shipped calibration inside
    its hash, and the gateway scores a rule-built set at its prompt kind's calibrated c."""
    import hashlib

    from service.settings import SHIPPED_CALIBRATION_FILE

    shipped = SHIPPED_CALIBRATION_FILE.read_bytes()
    sha = hashlib.sha256(shipped).hexdigest()
    assert (stack.repository / "calibration.json").read_bytes() == shipped
    provenance = json.loads((stack.repository / "provenance.json").read_text())
    bundled = provenance["textnorm_calibration"]
    assert (bundled["file"], bundled["sha256"]) == ("calibration.json", sha)
    assert bundled["document"] == json.loads(shipped)  # a gateway with provenance.json alone
    assert provenance["artifacts"]["calibration.json"] == sha
    card = client.get("/v1/models").json()["models"][0]
    assert card["textnorm_calibration_sha256"] == sha
    calibrated = json.loads(shipped)["prompt_kinds"]["single_object"]
    scene = Scene((Group(3, "red", "triangle"),), "grass")
    item = {"image": b64(world_image(scene, 5, 64)), "prompt": describe(Caption.of(scene))}
    response = client.post("/v1/score", json={"items": [item]})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["textnorm_scale_source"] == "calibrated"
    assert (result["textnorm_scale"], result["ensemble_lambda"]) == (
        calibrated["scale"], calibrated["ensemble_lambda"],
    )  # fmt: skip
    assert response.json()["provenance"]["textnorm"]["calibration_sha256"] == sha


# -- 2. TextNorm ranks the true prompt first ------------------------------------------------------
def test_true_prompt_textnorm_beats_one_attribute_off_prompts(client):
    rng = np.random.default_rng(7)
    wins: list[bool] = []
    for k in range(8):
        scene = random_scene(rng, 1)
        image = b64(world_image(scene, 200 + k, 96))
        prompts = [describe(Caption.of(scene)), *one_off_prompts(scene, rng)]
        results = score(client, [{"image": image, "prompt": p} for p in prompts])  # rule sets
        tn = [r["textnorm"] for r in results]
        assert all(0.0 < t <= 1.0 for t in tn), tn
        assert all(r["contrastive_source"] == "rule" and r["contrastive_count"] for r in results)
        wins += [tn[0] > other for other in tn[1:]]
    print(f"true prompt wins {sum(wins)}/{len(wins)}")
    assert len(wins) >= 24 and np.mean(wins) >= 0.8, np.mean(wins)


# -- 3. Triton's `score` model over gRPC = REST ----------------------------------------------------
def score_over_grpc(
    grpc, tokenizer, images: np.ndarray, prompt_sets, scale, lam, token_edits=()
) -> dict:
    """`token_edits`: ((item, row, column, id), ...) written over the tokenised ids."""
    import tritonclient.grpc as grpcclient

    n = len(images)
    ids = np.full((n, MAX_PROMPTS, tokenizer.context_length), tokenizer.eos_id, np.int64)
    mask = np.zeros((n, MAX_PROMPTS), bool)
    for i, texts in enumerate(prompt_sets):
        ids[i, : len(texts)] = tokenizer.encode(texts).ids
        mask[i, : len(texts)] = True
    for item, row, column, value in token_edits:
        ids[item, row, column] = value
    arrays = {
        "IMAGE": images,
        "INPUT_IDS": ids,
        "PROMPT_MASK": mask,
        "TEXTNORM_SCALE": np.full((n, 1), scale, np.float32),
        "ENSEMBLE_LAMBDA": np.full((n, 1), lam, np.float32),
    }
    inputs = []
    for name, array in arrays.items():
        dtype = {"uint8": "UINT8", "int64": "INT64", "bool": "BOOL", "float32": "FP32"}
        tensor = grpcclient.InferInput(name, list(array.shape), dtype[str(array.dtype)])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(o) for o in OUTPUT_OF.values()]
    result = grpc.infer("score", inputs, outputs=outputs, client_timeout=60)
    return {name: result.as_numpy(o) for name, o in OUTPUT_OF.items()}


def test_triton_grpc_score_model_equals_rest(client, grpc, defaults):
    tokenizer = ClipTokenizer(SHIPPED_MODEL_DIR / "tokenizer.json")
    rng = np.random.default_rng(3)
    other = random_scene(rng, 2)
    other_prompt, other_set = describe(Caption.of(other)), one_off_prompts(other, rng)
    pil = [world_image(TRUE_SCENE, 1, 112), world_image(other, 2, 112)]
    images = np.stack([np.asarray(p) for p in pil])
    sets = [[TRUE_PROMPT, *CONTRASTIVE], [other_prompt, *other_set]]
    items = [
        {"image": b64(p), "prompt": s[0], "contrastive": s[1:]}
        for p, s in zip(pil, sets, strict=True)
    ]
    for scale, lam in ((defaults["scale"], defaults["ensemble_lambda"]), (2.5, 0.3)):
        rest = score(client, items, scale=scale, ensemble_lambda=lam)
        direct = score_over_grpc(grpc, tokenizer, images, sets, scale, lam)
        for name, values in direct.items():
            assert values.shape == (2, 1) and values.dtype == np.float32
            got = [r[name] for r in rest]
            np.testing.assert_allclose(values[:, 0], got, rtol=0, atol=1e-6, err_msg=name)


# -- 4. concurrent REST requests are batched by Triton ---------------------------------------------
def image_encoder_executions(grpc) -> dict[int, int]:
    stats = grpc.get_inference_statistics("image_encoder", as_json=True, client_timeout=30)
    return executions_by_batch_size(stats["model_stats"][0])


def test_concurrent_rest_requests_are_batched(client, grpc, stack):
    rng = np.random.default_rng(4)
    images = [b64(world_image(random_scene(rng, 1), 300 + k, 80)) for k in range(16)]
    items = [{"image": i, "prompt": TRUE_PROMPT, "contrastive": CONTRASTIVE} for i in images]
    alone = [score(client, [item])[0] for item in items]  # also warms the text-embedding cache

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(
            base_url=stack.url, headers=AUTH, trust_env=False, timeout=60, limits=limits
        ) as ac:
            return await asyncio.gather(*(ac.post("/v1/score", json={"items": [i]}) for i in items))

    def merged_callers() -> float:  # image-encoder calls the gateway has sent, merged or not
        from tests.serve_stack import metric_value  # (it imports this module)

        text = client.get("/metrics").text
        value = metric_value(text, "reward_gateway_backend_merged_calls_sum", call="encode_images")
        return value or 0.0

    delta: dict[int, int] = {}
    for _ in range(3):  # one burst normally suffices; retry if the host is very busy
        before = image_encoder_executions(grpc)
        callers_before = merged_callers()
        responses = asyncio.run(burst())
        after = image_encoder_executions(grpc)
        # every request's image call went out exactly once, alone or merged with others'
        assert merged_callers() - callers_before == 16
        for r, want in zip(responses, alone, strict=True):
            assert r.status_code == 200, r.text
            got = r.json()["results"][0]
            assert all(abs(got[k] - want[k]) <= 1e-6 for k in REWARDS), (got, want)
        delta = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0)}
        if any(size > 1 for size in delta):
            break
    print("image_encoder executions by batch size during the burst:", delta)
    assert sum(size * n for size, n in delta.items()) == 16, delta  # each image encoded once
    assert any(size > 1 for size in delta), delta


# -- 5. bad requests through the real stack --------------------------------------------------------
def test_bad_requests_get_4xx_naming_the_field(client, stack):
    good = {"image": b64(world_image(TRUE_SCENE, 0, 64)), "prompt": TRUE_PROMPT}

    def post(items, **extra):
        return client.post("/v1/score", json={"items": items, **extra})

    assert_error(
        post([{**good, "image": "this is not base64!"}]), 422, "invalid_base64", "items[0].image"
    )
    gif = b64(Image.new("RGB", (32, 32), "red"), "GIF")
    body = assert_error(
        post([good, {**good, "image": gif}]), 415, "unsupported_image_format", "items[1].image"
    )
    assert set(body["error"]["limit"]) == {"PNG", "JPEG", "WEBP"}

    png = base64.b64decode(good["image"])
    padded = base64.b64encode(png + b"\0" * MAX_IMAGE_BYTES).decode()  # valid PNG, too many bytes
    body = assert_error(post([{**good, "image": padded}]), 413, "image_too_large", "items[0].image")
    assert body["error"]["limit"] == MAX_IMAGE_BYTES

    big = b64(Image.new("RGB", (1100, 1000), "white"))  # few bytes, 1.1 MP > 1 MP
    assert len(big) < MAX_IMAGE_BYTES
    body = assert_error(
        post([good, {**good, "image": big}]), 413, "image_too_many_pixels", "items[1].image"
    )
    assert body["error"]["limit"] == MAX_IMAGE_PIXELS and "1100×1000" in body["error"]["message"]

    body = assert_error(post([good] * (MAX_ITEMS + 1)), 422, "too_many_items", "items")
    assert body["error"]["limit"] == MAX_ITEMS
    assert_error(post([good], textnorm={"scle": 3.0}), 422, "invalid_request", "textnorm.scle")
    assert_error(post([{**good, "promt": "x"}]), 422, "invalid_request", "items[0].promt")

    no_key = httpx.post(f"{stack.url}/v1/score", json={"items": [good]}, trust_env=False)
    body = assert_error(no_key, 401, "unauthorized")
    assert "missing API key" in body["error"]["message"]
    assert no_key.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(
        f"{stack.url}/v1/score",
        json={"items": [good]},
        headers={"Authorization": "Bearer not-the-key"},
        trust_env=False,
    )
    body = assert_error(wrong, 401, "unauthorized")
    assert "invalid API key" in body["error"]["message"]
    assert httpx.get(f"{stack.url}/v1/models", trust_env=False).status_code == 401

    health = httpx.get(f"{stack.url}/healthz", trust_env=False)  # open: no key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert score(client, [{**good, "contrastive": CONTRASTIVE}])[0]["raw"] > 0  # still serving


def test_an_idle_connection_outlives_uvicorns_default_keep_alive(stack):
    """A trainer's pooled connection, idle between RL steps for longer than uvicorn's default
    5 s keep-alive, is still open when it is reused (keep_alive_s, default 75 s): the server
    never closes it just as the client sends on it."""
    host, port = urllib.parse.urlsplit(stack.url).netloc.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        time.sleep(6.5)
        conn.request("GET", "/healthz")  # on the same socket, or RemoteDisconnected
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        assert conn.sock is sock
    finally:
        conn.close()


# -- 6. Triton dies: 503, watchdog restart, recovery -----------------------------------------------
def test_triton_killed_then_restarted_by_watchdog(client, stack):
    item = {
        "image": b64(world_image(TRUE_SCENE, 5, 96)),
        "prompt": TRUE_PROMPT,
        "contrastive": CONTRASTIVE,
    }
    before = score(client, [item])[0]
    old = stack.triton_pid()
    assert old is not None
    launcher = stack.proc.pid
    stack.triton_pids.add(old)

    killed = time.monotonic()
    os.killpg(old, signal.SIGKILL)  # the server and its stubs (it leads its own group)
    r = client.post("/v1/score", json={"items": [item]})
    down = time.monotonic() - killed
    body = assert_error(r, 503, "backend_unavailable")
    assert int(r.headers["retry-after"]) > 0 and body["error"]["field"] is None
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False, ready.text
    assert int(ready.headers["retry-after"]) > 0
    assert client.get("/healthz").status_code == 200  # the gateway itself is alive
    assert down < 5, f"503 took {down:.1f} s"
    assert _wait_gone(old, 10), "the killed tritonserver or its stubs are still there"

    deadline = killed + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, f"not ready 60 s after the kill:\n{stack.output()}"
        assert stack.proc.poll() is None, f"the launcher exited:\n{stack.output()}"
        time.sleep(0.25)
    recovered = time.monotonic() - killed
    after = score(client, [item])[0]
    for name in REWARDS:
        assert abs(after[name] - before[name]) <= 1e-6, (name, after, before)

    new = stack.triton_pid()
    assert new is not None and new != old
    output = stack.log_path.read_text()
    assert f"tritonserver restarted (pid {new})" in output
    assert stack.proc.poll() is None and stack.proc.pid == launcher
    assert output.count("Started server process") == 1  # the same gateway process throughout
    print(f"503 after {down:.2f} s; ready again {recovered:.1f} s after the kill")


def test_cli_client_and_python_client_through_the_stack(stack, client, tmp_path):
    """`reward-service score` (a person at a terminal) and `textnorm_reward_client` (a trainer)
    return the numbers of a direct REST call; a wrong key and an unreachable URL are one-line
    errors."""
    from textnorm_reward_client import RewardClient, RewardServiceError

    from tests.conftest import run_cli

    scene = Scene(groups=(Group(2, "orange", "star"),), background="sky")
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"img{seed}.png"
        world_image(scene, seed, 128).save(path)
        paths.append(path)
    prompt = describe(Caption.of(scene))
    direct = score(
        client,
        [{"image": base64.b64encode(p.read_bytes()).decode(), "prompt": prompt} for p in paths],
    )
    env_key = {**os.environ, "REWARD_API_KEY": API_KEY}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "score",
            *map(str, paths),
            "--prompt",
            prompt,
            "--url",
            stack.url,
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env_key,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    via_cli = json.loads(res.stdout)["results"]
    with RewardClient(stack.url, api_key=API_KEY) as trainer:
        via_lib = trainer.score(paths, prompt)["results"]
        with pytest.raises(RewardServiceError) as bad:
            trainer.score(paths, prompt, textnorm={"scale": -1})
        assert bad.value.status == 422
    for a, b, c in zip(direct, via_cli, via_lib, strict=True):
        for key in ("raw", "textnorm", "head", "ensemble_uw"):
            assert abs(a[key] - b[key]) < 1e-6 and abs(a[key] - c[key]) < 1e-6
    wrong = run_cli(
        "score", str(paths[0]), "--prompt", prompt, "--url", stack.url, "--api-key", "nope"
    )
    assert wrong.returncode == 2, wrong.stderr  # refused: the caller's to fix
    assert wrong.stderr.startswith("error: the reward service refused the request: HTTP 401")
    assert wrong.stderr.strip().count("\n") == 0
    down = run_cli("score", str(paths[0]), "--prompt", prompt, "--url", "http://127.0.0.1:9")
    assert down.returncode == 1, down.stderr  # failed: as `finetune` against a down service
    assert down.stderr.startswith(
        "error: the reward service failed: unreachable: cannot reach http://127.0.0.1:9"
    )
    assert down.stderr.strip().count("\n") == 0


def test_grpc_score_model_refuses_inputs_that_would_give_wrong_rewards(grpc, stack):
    """Raw KServe v2 callers skip the gateway's validation: the `score` model itself refuses a
    missing true prompt and a non-positive TextNorm scale, without failing valid requests."""
    from tritonclient.utils import InferenceServerException

    tokenizer = ClipTokenizer(stack.repository / "tokenizer.json")
    image = np.asarray(world_image(Scene((Group(1, "red", "circle"),), "white"), 3, 64))[None]
    texts = [["a red circle on a white background", "two red circles on a white background"]]
    good = score_over_grpc(grpc, tokenizer, image, texts, 5.0, 1.0)
    assert 0 < float(good["textnorm"][0, 0]) < 1
    with pytest.raises(InferenceServerException, match="TEXTNORM_SCALE must be finite and > 0"):
        score_over_grpc(grpc, tokenizer, image, texts, -1.0, 1.0)
    with pytest.raises(InferenceServerException, match="ENSEMBLE_LAMBDA"):
        score_over_grpc(grpc, tokenizer, image, texts, 5.0, float("nan"))
    # A negative id would wrap round to another token in the tower's Gather: refused.
    with pytest.raises(InferenceServerException, match="INPUT_IDS must be token ids in") as neg:
        score_over_grpc(grpc, tokenizer, image, texts, 5.0, 1.0, [(0, 1, 1, -5)])
    assert neg.value.status() == "StatusCode.INVALID_ARGUMENT"
    # An id past the vocabulary: refused too (the tower's own error reached callers as INTERNAL).
    with pytest.raises(InferenceServerException, match="INPUT_IDS must be token ids in") as past:
        score_over_grpc(grpc, tokenizer, image, texts, 5.0, 1.0, [(0, 1, 1, 10**6)])
    assert past.value.status() == "StatusCode.INVALID_ARGUMENT", past.value


def test_sigterm_during_the_export_stops_serve_and_its_export(tmp_path):
    # The SIGTERM handler came only with uvicorn: a SIGTERM while `serve` exported (a pod
    # deleted during start-up) ended it at once, and the export went on for ~26 s, orphaned.
    import psutil

    gateway_port, *triton_ports = free_ports(4)
    env = _serve_env(tmp_path, gateway_port, triton_ports)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        export = None
        while export is None:
            assert time.monotonic() < deadline and proc.poll() is None, "no export started"
            kids = psutil.Process(proc.pid).children(recursive=True)
            export = next((p for p in kids if "export" in p.cmdline()), None)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        gone, alive = psutil.wait_procs([export], timeout=10)
        assert not alive, f"the export {export.pid} outlived serve"
        assert not list((tmp_path / "repositories").glob("*/provenance.json"))  # none written
    finally:
        for pid in [*children(proc.pid), proc.pid]:
            _kill_group(pid)
        proc.wait()
