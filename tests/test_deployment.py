"""The three roles as users deploy them, from built wheels, in fresh virtual environments.

- the trainer client's distribution installs with its own dependencies only (no numpy, no
  torch, nothing of the server) and imports without numpy;
- the gateway role, installed as the Dockerfile's `gateway` stage installs it (the wheels with
  the `[gateway]` extra, into a fresh venv where `import torch` fails), serves `/v1/score`
  against a `tritonserver` the test started separately, with the rewards the in-process
  reference gives for the same export;
- a gateway whose provenance names another export than the one Triton serves stays unready
  and says why, naming both content hashes, and never scores;
- a non-editable install of the server runs `reward-service serve` on the shipped model from
  another directory (package data: the shipped model and the Triton model templates).

Real pip, real venvs, real tritonserver on loopback; the long installs come from PyPI (or its
cache) like a user's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.gateway.provenance import load_provenance
from service.model_contract import version_dir
from service.triton_server import free_ports
from shapes_world.render import render
from shapes_world.scene import Group, Scene
from tests.conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow
pytest_plugins = ("tests.conftest_triton",)  # triton_repo, triton_server

API_KEY = "deploy-test-key"
PROMPT = "three red triangles on a grass background"
CONTRASTIVE = [
    "two red triangles on a grass background",
    "three blue triangles on a grass background",
]


def _run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of this checkout's settings or paths."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REWARD_", "PYTHON", "VIRTUAL_ENV"))
    }
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", str(path)])
    return path / "bin" / "python"


def _pip_list(python: Path) -> set[str]:
    out = _run([str(python), "-m", "pip", "list", "--format=json"], env=_clean_env()).stdout
    return {p["name"].lower().replace("_", "-") for p in json.loads(out)}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """Both distributions built as wheels, as the Dockerfile's builder stage builds them."""
    out = tmp_path_factory.mktemp("wheels")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*cmd, "-w", str(out), str(REPO_ROOT / "client"), str(REPO_ROOT)], cwd=out)
    found = {w.name.split("-")[0]: w for w in out.glob("*.whl")}
    assert set(found) == {"textnorm_reward_client", "textnorm_reward_service"}, found
    return found


def _encoded(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _png(scene: Scene, seed: int) -> bytes:
    return _encoded(render(scene, seed, 96).image)


def _score_body() -> dict:
    scenes = [
        Scene((Group(3, "red", "triangle"),), "grass"),
        Scene((Group(2, "red", "triangle"),), "grass"),
    ]
    items = [
        {
            "image": base64.b64encode(_png(s, i)).decode(),
            "prompt": PROMPT,
            "contrastive": CONTRASTIVE,
        }
        for i, s in enumerate(scenes)
    ]
    return {"items": items}


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline_s: float = 180) -> dict:
    deadline = time.monotonic() + deadline_s
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                r = client.get("/readyz")
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"/readyz not 200 after {deadline_s} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


# -- the client distribution -------------------------------------------------------------------
def test_client_distribution_installs_only_its_own_dependencies(wheels, tmp_path):
    python = _venv(tmp_path / "venv")
    before = _pip_list(python)
    _run(
        [str(python), "-m", "pip", "install", "-q", str(wheels["textnorm_reward_client"])],
        env=_clean_env(),
    )
    added = _pip_list(python) - before
    # httpx and tenacity with what they need, and nothing else.
    allowed = {
        "textnorm-reward-client", "httpx", "tenacity", "httpcore", "h11", "anyio", "idna",
        "sniffio", "certifi", "typing-extensions", "exceptiongroup",
    }  # fmt: skip
    assert {"textnorm-reward-client", "httpx", "tenacity"} <= added <= allowed, added
    probe = (
        "import importlib.util, sys\n"
        "import textnorm_reward_client as c\n"
        "assert c.RewardClient and c.RewardServiceError\n"
        "missing = [m for m in ('numpy', 'torch', 'typer', 'tokenizers', 'PIL', 'pydantic',"
        " 'service') if importlib.util.find_spec(m)]\n"
        "assert not missing, missing\n"
        "assert 'numpy' not in sys.modules\n"
        "print('ok')\n"
    )
    assert _run([str(python), "-c", probe], env=_clean_env(), cwd=tmp_path).stdout.strip() == "ok"


# -- the gateway role, torch-free, against a Triton it did not start ---------------------------
@pytest.fixture(scope="module")
def gateway_venv(wheels, tmp_path_factory) -> Path:
    """The Dockerfile's gateway stage, replayed: the two wheels with the [gateway] extra."""
    venv = tmp_path_factory.mktemp("gateway-venv") / "venv"
    python = _venv(venv)
    spec = f"{wheels['textnorm_reward_service']}[gateway]"
    _run(
        [str(python), "-m", "pip", "install", "-q", str(wheels["textnorm_reward_client"]), spec],
        env=_clean_env(),
        timeout=900,
    )
    installed = _pip_list(python)
    assert not installed & {"torch", "transformers", "onnx", "onnxruntime", "nvidia-pytriton"}
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0  # the environment where `import torch` fails
    return venv


def test_torch_free_gateway_from_the_wheel_serves_triton_rewards(
    gateway_venv, triton_server, triton_repo, tmp_path
):
    from fastapi.testclient import TestClient

    from service.gateway.app import create_app
    from service.gateway.onnx_backend import OnnxBackend
    from service.settings import Settings

    port = free_ports(1)[0]
    log = tmp_path / "gateway.log"
    cmd = [
        str(gateway_venv / "bin" / "reward-service"),
        "gateway",
        "--triton-url",
        triton_server.grpc_url,
        "--repository",
        str(triton_repo),
        "--port",
        str(port),
    ]
    env = _clean_env(REWARD_API_KEYS=json.dumps([API_KEY]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = _wait_ready(proc, url, log)
        assert ready["ready"] is True and ready["reason"] is None
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=url, trust_env=False, timeout=60, headers=headers) as client:
            served = client.post("/v1/score", json=_score_body())
            assert served.status_code == 200, served.text
            models = client.get("/v1/models").json()
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()[-3000:]
    where = subprocess.run(
        [str(gateway_venv / "bin" / "python"), "-c", "import service; print(service.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
    ).stdout
    assert str(gateway_venv) in where  # the installed wheel, not this checkout

    provenance = load_provenance(triton_repo)
    assert (
        models["provenance"]["model"]["checkpoint_sha256"]
        == (provenance["model"]["checkpoint_sha256"])
    )
    settings = Settings(tokenizer_file=str(triton_repo / "tokenizer.json"))
    app = create_app(settings, OnnxBackend(triton_repo, intra_op_threads=1), provenance)
    with TestClient(app) as reference:
        expected = reference.post("/v1/score", json=_score_body()).json()["results"]
    block = served.json()["provenance"]  # every response names the export that computed it
    assert (block["export_sha256"], block["model_version"]) == (
        provenance["export_sha256"],
        provenance["model_version"],
    )
    got = served.json()["results"]
    for field in ("raw", "textnorm"):
        assert np.allclose([r[field] for r in got], [r[field] for r in expected], atol=1e-5)
    assert [r["contrastive_sha256"] for r in got] == [r["contrastive_sha256"] for r in expected]
    assert got[0]["textnorm"] > got[1]["textnorm"]  # the true image wins its set


# -- identity: a gateway never scores with another export's models -----------------------------
@pytest.fixture(scope="module")
def other_export(tmp_path_factory) -> Path:
    """The shipped model exported with its learned head: other graphs, another content hash."""
    out = tmp_path_factory.mktemp("other") / "repo"
    result = run_cli("export", "--out", str(out), "--max-batch", "16", timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def test_gateway_refuses_a_triton_serving_another_export(triton_server, triton_repo, other_export):
    from fastapi.testclient import TestClient

    from service.gateway.app import create_app
    from service.gateway.triton_backend import RewardBackend
    from service.settings import Settings

    ours, served = load_provenance(other_export), load_provenance(triton_repo)
    assert ours["export_sha256"] != served["export_sha256"]
    settings = Settings(tokenizer_file=str(other_export / "tokenizer.json"))
    app = create_app(settings, RewardBackend(triton_server.grpc_url, timeout=10), ours)
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        reason = ready.json()["reason"]
        assert ours["export_sha256"] in reason and served["export_sha256"] in reason
        scored = client.post("/v1/score", json=_score_body())
        assert scored.status_code == 503, scored.text
        error = scored.json()["error"]
        assert error["code"] == "model_mismatch" and served["export_sha256"] in error["message"]
        assert "reward_gateway_model_mismatch 1.0" in client.get("/metrics").text
    # The same gateway code with the matching provenance is ready at once.
    right = Settings(tokenizer_file=str(triton_repo / "tokenizer.json"))
    app = create_app(right, RewardBackend(triton_server.grpc_url, timeout=10), served)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/score", json=_score_body()).status_code == 200


# -- the gateway without Triton (`--onnx`): the same rewards as through Triton ----------------
def test_gateway_onnx_serves_the_rewards_triton_serves(triton_server, triton_repo, tmp_path):
    from fastapi.testclient import TestClient

    from service.gateway.app import create_app
    from service.gateway.triton_backend import RewardBackend
    from service.settings import Settings

    both = run_cli("gateway", "--onnx", "--triton-url", triton_server.grpc_url,
                   "--repository", str(triton_repo), "--port", str(free_ports(1)[0]))  # fmt: skip
    assert both.returncode != 0 and "not both" in both.stderr, both.stderr
    port = free_ports(1)[0]
    log = tmp_path / "gateway.log"
    cmd = [sys.executable, "-m", "service.cli", "gateway", "--onnx",
           "--repository", str(triton_repo), "--port", str(port)]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=_clean_env(PYTHONPATH=str(REPO_ROOT)), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_ready(proc, url, log)["ready"] is True
        with httpx.Client(base_url=url, trust_env=False, timeout=60) as client:
            served = client.post("/v1/score", json=_score_body())
            assert served.status_code == 200, served.text
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()[-3000:]
    assert "ONNX Runtime in process" in log.read_text()

    provenance = load_provenance(triton_repo)
    settings = Settings(tokenizer_file=str(triton_repo / "tokenizer.json"))
    app = create_app(settings, RewardBackend(triton_server.grpc_url, timeout=10), provenance)
    with TestClient(app) as reference:
        expected = reference.post("/v1/score", json=_score_body()).json()
    got = served.json()
    assert got["provenance"]["export_sha256"] == expected["provenance"]["export_sha256"]
    for field in ("raw", "textnorm"):
        assert np.allclose(
            [r[field] for r in got["results"]], [r[field] for r in expected["results"]], atol=1e-5
        )
    assert got["results"][0]["textnorm"] > got["results"][1]["textnorm"]


# -- one host from a non-editable install ----------------------------------------------------
def test_non_editable_install_serves_the_shipped_model_from_another_directory(wheels, tmp_path):
    """The wheel installed without -e (so `models/` and `model_repository/` must be package
    data); its heavy dependencies (torch, the bundled tritonserver) are borrowed from this
    checkout's venv through a .pth line instead of installed again (gigabytes, minutes)."""
    venv = tmp_path / "venv"
    python = _venv(venv)
    wheel_args = [str(wheels["textnorm_reward_client"]), str(wheels["textnorm_reward_service"])]
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", *wheel_args], env=_clean_env())
    site = next((venv / "lib").glob("python3.*/site-packages"))
    dev_site = next((Path(sys.prefix) / "lib").glob("python3.*/site-packages"))
    (site / "zz_dependencies_from_dev_venv.pth").write_text(f"{dev_site}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = "import models, model_repository, service; print(models.SHIPPED_MODEL_DIR)"
    shipped = _run([str(python), "-c", probe], cwd=elsewhere, env=_clean_env()).stdout.strip()
    assert shipped.startswith(str(site)) and (Path(shipped) / "model.safetensors").is_file()

    gateway_port, *triton_ports = free_ports(4)
    env = _clean_env(
        REWARD_PORT=str(gateway_port),
        REWARD_TRITON_GRPC_PORT=str(triton_ports[0]),
        REWARD_TRITON_HTTP_PORT=str(triton_ports[1]),
        REWARD_TRITON_METRICS_PORT=str(triton_ports[2]),
        REWARD_REPOSITORIES_DIR=str(tmp_path / "repositories"),
        REWARD_TRITON_RUNTIME_DIR=str(tmp_path / "triton-runtime"),
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "reward-service"), "serve"],
            cwd=elsewhere,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        _wait_ready(proc, url, log, deadline_s=300)
        with httpx.Client(base_url=url, trust_env=False, timeout=60) as client:
            scored = client.post("/v1/score", json=_score_body())
            assert scored.status_code == 200, scored.text
            card = client.get("/v1/models").json()["models"][0]
    finally:
        code = _stop(proc)
    assert code == 0, log.read_text()[-3000:]
    assert card["head"] is not None  # the shipped head came along as package data
    exported = next((tmp_path / "repositories").iterdir())
    copied = (version_dir(exported, "image_encoder") / "model.py").read_bytes()
    assert copied == (site / "model_repository" / "python_onnx" / "model.py").read_bytes()
    assert load_provenance(exported)["model"]["source"] == shipped


def test_backend_balances_round_robin_over_every_address(triton_server, triton_repo, tmp_path):
    """A target with several addresses (as `dns:///` a headless Service's pods) is balanced
    round robin: two tritonservers on one repository both execute calls of one channel."""
    import asyncio

    from textnorm_reward_client.clip_tokenizer import ClipTokenizer

    from service.gateway.triton_backend import RewardBackend
    from service.triton_server import TritonServer

    ids = ClipTokenizer(triton_repo / "tokenizer.json").encode(["a red circle", "six stars"])
    version = load_provenance(triton_repo)["model_version"]
    second = TritonServer(triton_repo, log_file=tmp_path / "second.log").start()
    try:
        target = f"ipv4:{triton_server.grpc_url},{second.grpc_url}"

        async def run() -> list[int]:
            per_server = [RewardBackend(s.grpc_url) for s in (triton_server, second)]
            before = [
                (await b.model_stats("text_encoder")).get("inference_count", 0) for b in per_server
            ]
            balanced = RewardBackend(target, timeout=10, model_version=version)
            for _ in range(8):
                assert (await balanced.encode_texts(ids.rows([0, 1], 8))).shape[0] == 2
            await balanced.close()
            after = [
                (await b.model_stats("text_encoder")).get("inference_count", 0) for b in per_server
            ]
            for b in per_server:
                await b.close()
            return [a - b for a, b in zip(after, before, strict=True)]

        served = asyncio.run(run())
    finally:
        second.stop()
    assert sum(served) == 16 and min(served) > 0, served  # both servers took calls


def test_client_constants_match_the_contract():
    from textnorm_reward_client import clip_tokenizer, grpc_client

    from service import model_contract

    assert clip_tokenizer.CONTEXT_LENGTH == model_contract.CONTEXT_LENGTH
    assert grpc_client.MAX_PROMPTS == model_contract.MAX_PROMPTS


def test_grpc_client_gives_the_gateway_rewards_in_item_order(triton_server, triton_repo, tmp_path):
    """Direct KServe v2 to `score` (uint8 tensors, local tokenisation) = the REST gateway, in
    item order across image sizes; calls rotate over several addresses and fail over past one
    that is down."""
    from fastapi.testclient import TestClient
    from textnorm_reward_client import GrpcRewardClient, RewardServiceError

    from service.gateway.app import create_app
    from service.gateway.onnx_backend import OnnxBackend
    from service.settings import Settings

    scenes = [
        Scene((Group(3, "red", "triangle"),), "grass"),
        Scene((Group(2, "red", "triangle"),), "grass"),
        Scene((Group(3, "blue", "triangle"),), "grass"),
    ]
    sizes = [96, 64, 96]  # two calls (one per size); items must come back in order
    rendered = [
        render(s, i, size).image for i, (s, size) in enumerate(zip(scenes, sizes, strict=True))
    ]
    images = [np.asarray(image.convert("RGB")) for image in rendered]
    items = [
        {"image": base64.b64encode(_encoded(image)).decode(), "prompt": PROMPT}
        for image in rendered
    ]
    provenance = load_provenance(triton_repo)
    settings = Settings(tokenizer_file=str(triton_repo / "tokenizer.json"))
    app = create_app(settings, OnnxBackend(triton_repo, intra_op_threads=1), provenance)
    with TestClient(app) as reference:
        body = {"items": items, "textnorm": {"contrastive": CONTRASTIVE}}
        expected = reference.post("/v1/score", json=body).json()["results"]

    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    urls = [
        dead,
        triton_server.grpc_url,
        f"dns:///localhost:{triton_server.grpc_url.rsplit(':', 1)[1]}",
    ]
    with GrpcRewardClient(urls, triton_repo, timeout_s=10) as client:
        for _ in range(3):  # every address gets a turn; the dead one fails over
            got = client.score(images, PROMPT, CONTRASTIVE)
            assert np.allclose(got.rewards("raw"), [r["raw"] for r in expected], atol=1e-5)
            textnorm = got.rewards("textnorm")
            assert np.allclose(textnorm, [r["textnorm"] for r in expected], atol=1e-5)
        with pytest.raises(ValueError, match="contrastive"):
            client.score(images, PROMPT, [PROMPT, " "])  # nothing left once cleaned
        repeated = client.score(images, PROMPT, [*CONTRASTIVE, CONTRASTIVE[0], PROMPT])
        assert np.allclose(repeated.rewards("textnorm"), textnorm, atol=1e-6)  # cleaned alike
    # A channel kept for ever never resolves its address again (pods added behind a headless
    # Service get no calls): an old one is replaced, and closed once its calls had their time.
    with GrpcRewardClient(
        triton_server.grpc_url, triton_repo, timeout_s=1, channel_max_age_s=0.2
    ) as client:
        first = client._channels.next()
        time.sleep(0.3)
        again = client.score(images, PROMPT, CONTRASTIVE)
        assert np.allclose(again.rewards("textnorm"), textnorm, atol=1e-6)
        ((timer, retired),) = client._channels._retired
        assert retired is first and client._channels.next() is not first
        timer.join(5)  # closed after timeout + 1 s
        assert not timer.is_alive()
    other = tmp_path / "other-export"  # provenance naming another export's model version
    other.mkdir()
    shutil.copyfile(triton_repo / "tokenizer.json", other / "tokenizer.json")
    (other / "provenance.json").write_text(json.dumps({**provenance, "model_version": 2}))
    with (
        GrpcRewardClient(triton_server.grpc_url, other, timeout_s=10) as client,
        pytest.raises(RewardServiceError) as refused,
    ):
        client.score(images, PROMPT, CONTRASTIVE)
    assert refused.value.status == 503 and refused.value.error["code"] == "model_mismatch"


def test_grpc_client_picks_c_and_lambda_as_the_gateway_does(triton_server, triton_repo, tmp_path):
    """With a calibration bundled in the export that knows one explicit set by hash, that set
    gets its calibrated c and λ on both paths, another set the export's defaults, and a
    request's c wins; every item names the same set sha256, c, λ and source on both paths."""
    import hashlib

    from fastapi.testclient import TestClient
    from textnorm_reward_client import GrpcRewardClient
    from textnorm_reward_client.prompt_identity import contrastive_set_sha256

    from service.gateway.app import create_app
    from service.gateway.calibration import calibration_document
    from service.gateway.onnx_backend import OnnxBackend
    from service.settings import Settings

    provenance = load_provenance(triton_repo)
    document = calibration_document(
        checkpoint_sha256=provenance["model"]["checkpoint_sha256"],
        validation_seed=12345,
        grid={},
        categories={},
        prompt_kinds={},
        prompt_sets={
            contrastive_set_sha256(PROMPT, CONTRASTIVE): {"scale": 20.0, "ensemble_lambda": 0.25}
        },
    )
    raw = json.dumps(document).encode()
    bundled = {"file": "calibration.json", "sha256": hashlib.sha256(raw).hexdigest()}
    provenance = {**provenance, "textnorm_calibration": {**bundled, "document": document}}
    export = tmp_path / "calibrated-export"  # what a gRPC trainer is given: two files
    export.mkdir()
    shutil.copyfile(triton_repo / "tokenizer.json", export / "tokenizer.json")
    (export / "provenance.json").write_text(json.dumps(provenance))

    rendered = [render(Scene((Group(n, "red", "triangle"),), "grass"), n, 64).image for n in (2, 3)]
    images = [np.asarray(image.convert("RGB")) for image in rendered]
    encoded = [base64.b64encode(_encoded(image)).decode() for image in rendered]
    requests = [  # (contrastive, request's textnorm options beyond the set)
        (CONTRASTIVE, {}),  # calibrated by hash: c = 20, λ = 0.25
        (CONTRASTIVE[:1], {}),  # unknown set: the export's defaults
        (CONTRASTIVE, {"scale": 3.0}),  # the request's c, the set's calibrated λ
    ]
    settings = Settings(tokenizer_file=str(triton_repo / "tokenizer.json"))
    app = create_app(settings, OnnxBackend(triton_repo, intra_op_threads=1), provenance)
    fields = ("textnorm_scale", "ensemble_lambda", "textnorm_scale_source", "contrastive_sha256")
    with (
        TestClient(app) as gateway,
        GrpcRewardClient(triton_server.grpc_url, export, timeout_s=10) as client,
    ):
        textnorms = []
        for contrastive, options in requests:
            items = [{"image": e, "prompt": PROMPT} for e in encoded]
            body = {"items": items, "textnorm": {"contrastive": contrastive, **options}}
            expected = gateway.post("/v1/score", json=body).json()["results"]
            got = client.score(images, PROMPT, textnorm={"contrastive": contrastive, **options})
            for name in ("textnorm", "textnorm_head", "ensemble_uw"):  # those the export has
                want = np.array([r[name] for r in expected], np.float64)
                assert np.allclose(got.rewards(name), want, 0, 1e-5, equal_nan=True), name
            for result, want in zip(got.results, expected, strict=True):
                assert {f: getattr(result, f) for f in fields} == {f: want[f] for f in fields}
            textnorms.append(got.rewards("textnorm"))
            sources = {r.textnorm_scale_source for r in got.results}
            scales = {r.textnorm_scale for r in got.results}
            lambdas = {r.ensemble_lambda for r in got.results}
            defaults = provenance["textnorm_defaults"]
            assert (sources, scales, lambdas) == {
                0: ({"calibrated"}, {20.0}, {0.25}),
                1: ({"default"}, {defaults["scale"]}, {defaults["ensemble_lambda"]}),
                2: ({"request"}, {3.0}, {0.25}),
            }[len(textnorms) - 1]
    assert not np.allclose(textnorms[0], textnorms[2], atol=1e-3)  # c changed the reward
