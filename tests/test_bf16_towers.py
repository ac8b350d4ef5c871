"""bf16 towers (`export --precision bf16`, `REWARD_PRECISION=bf16`): the fp32 ONNX files run by
OpenVINO with bfloat16 inference precision. What the repository says, how far it is from the
PyTorch fp32 reference, that it does not depend on batch-mates, and that a real Triton serves
it under its own identity.

Where the CPU has no native bfloat16 (no AMX / AVX-512 BF16), OpenVINO runs the same files in
fp32: the tests that need bf16 to be in effect say so and skip there."""

import json

import numpy as np
import pytest

from export.repository import ExportOptions
from export.verify import TOLERANCES
from loadtest.serving import SAME_EXPORT_TOLERANCE
from service import model_contract as contract
from service.model_contract import version_dir
from service.onnx_models import (
    ONNX_RUNTIME,
    OPENVINO_BF16,
    OpenVinoModel,
    Runtime,
    open_served_model,
    served_runtime,
)
from tests.conftest import (
    assert_verifies_in_reduced_precision,
    png_items,
    served_raw_rewards,
    shipped_exports_fixture,
)
from tests.serve_stack import client_for, serve_stack

TOWERS = ("image_encoder", "text_encoder")


repos = shipped_exports_fixture("bf16")


def _bf16_in_effect(repo) -> bool:
    opened = open_served_model(repo, "image_encoder")
    assert isinstance(opened, OpenVinoModel)
    return opened.effective_precision == "bf16"


@pytest.fixture(scope="module")
def bf16_cpu(repos) -> None:
    if not _bf16_in_effect(repos["bf16"]):
        pytest.skip("this CPU has no native bfloat16: OpenVINO runs the bf16 export in fp32")


def test_bf16_serves_the_fp32_files_with_openvino_and_says_so(repos):
    fp32, bf16 = repos["fp32"], repos["bf16"]
    for model in (*TOWERS, "reward_head"):
        # the same ONNX files: bf16 is how they are run, not another graph
        files = [(version_dir(r, model) / "model.onnx").read_bytes() for r in (fp32, bf16)]
        assert files[0] == files[1], model
        assert served_runtime(fp32, model) == ONNX_RUNTIME
    for model in TOWERS:
        assert served_runtime(bf16, model) == OPENVINO_BF16
        # the NGC image runs them through the Python backend too (its native openvino backend
        # fixes the batch at max_batch_size): both configs are the same
        native = (bf16 / model / "config.pbtxt").read_text()
        assert native == (bf16 / model / "configs" / "bundled.pbtxt").read_text()
        assert 'backend: "python"' in native and 'string_value: "openvino"' in native
    # the reward head stays exact fp32 on ONNX Runtime in every flavour
    assert served_runtime(bf16, "reward_head") == ONNX_RUNTIME
    assert 'platform: "onnxruntime_onnx"' in (bf16 / "reward_head" / "config.pbtxt").read_text()
    prov = {p: json.loads((r / "provenance.json").read_text()) for p, r in repos.items()}
    assert prov["bf16"]["options"]["precision"] == "bf16"
    assert prov["bf16"]["versions"]["openvino"]
    assert prov["bf16"]["export_sha256"] != prov["fp32"]["export_sha256"]
    assert prov["bf16"]["model_version"] != prov["fp32"]["model_version"]
    assert "bfloat16" in (bf16 / "README.md").read_text()


def test_bf16_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="--precision bf16 needs --target cpu"):
        ExportOptions(target="gpu", precision="bf16")
    with pytest.raises(ValueError, match="inference_precision f32"):
        Runtime("onnxruntime", "bf16")
    with pytest.raises(ValueError, match="runtime must be one of"):
        Runtime("tensorflow")


def test_bf16_verifies_within_its_tolerance_and_not_within_fp32s(repos, bf16_cpu):
    assert_verifies_in_reduced_precision(repos["bf16"], "bf16")


def test_bf16_embeddings_do_not_depend_on_batch_mates(repos):
    """Unlike int8 (activations quantized per batch, ~1e-3), a bf16 embedding is the same alone
    or in any batch: the served reward of an image does not depend on its batch-mates."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 70, 90, 3), dtype=np.uint8)
    image = open_served_model(repos["bf16"], "image_encoder")
    together = image.run({"IMAGE": images})[0]
    alone = np.concatenate([image.run({"IMAGE": images[i : i + 1]})[0] for i in range(9)])
    split = np.concatenate([image.run({"IMAGE": part})[0] for part in (images[:4], images[4:])])
    # 0.0 on the AMX Xeon this was written on; other bf16 kernels (AVX-512 BF16 without AMX,
    # other OpenVINO versions) are held to the tolerance `bench serving` relies on
    assert np.abs(together - alone).max() <= SAME_EXPORT_TOLERANCE["bf16"]
    assert np.abs(together - split).max() <= SAME_EXPORT_TOLERANCE["bf16"]
    fp32 = open_served_model(repos["fp32"], "image_encoder").run({"IMAGE": images})[0]
    assert np.abs(together - fp32).max() <= TOLERANCES["bf16"]["image_embeds"]


def test_triton_serves_bf16_towers_under_their_own_identity(repos, tmp_path):
    """`serve` of a bf16 repository: the bundled Triton runs the towers with OpenVINO,
    responses name the precision and the bf16 export, and the rewards equal the in-process
    OpenVINO ones (same runtime, no batch effect) and are within the bf16 tolerance of fp32."""
    from shapes_world.render import render
    from shapes_world.scene import Group, Scene

    scenes = [Scene((Group(n, "blue", "square"),), "sand") for n in (1, 2, 3)]
    images = [render(s, k, 96).image for k, s in enumerate(scenes)]
    prompt = "two blue squares on a sand background"
    items = png_items(images, prompt)
    repo = repos["bf16"]
    stack = serve_stack(tmp_path, tmp_path / "repositories", repository=str(repo))
    with stack as running, client_for(running) as client:
        body = client.post("/v1/score", json={"items": items}).json()
    # Triton's model.py says which runtime and precision each model runs (bf16 where the CPU
    # has it, else OpenVINO's fp32): the towers on OpenVINO, the head on ONNX Runtime
    log = _triton_log(running.proc.pid)
    precision = "bf16" if _bf16_in_effect(repo) else "f32"
    for model in TOWERS:
        assert f"{model}: runtime openvino, inference precision {precision}" in log, model
    assert "reward_head: runtime onnxruntime, inference precision as the file" in log
    prov = json.loads((repo / "provenance.json").read_text())
    assert body["provenance"]["exporter"]["precision"] == "bf16"
    assert body["provenance"]["export_sha256"] == prov["export_sha256"]
    served = np.array([r["raw"] for r in body["results"]])
    arrays = [np.asarray(i.convert("RGB")) for i in images]
    expected = {p: served_raw_rewards(r, arrays, [prompt] * 3) for p, r in repos.items()}
    assert np.abs(served - expected["bf16"]).max() <= SAME_EXPORT_TOLERANCE["bf16"]
    assert np.abs(served - expected["fp32"]).max() <= contract.RAW_TOLERANCE["bf16"]
    if _bf16_in_effect(repo):
        assert np.abs(served - expected["fp32"]).max() > contract.RAW_TOLERANCE["fp32"]


def _triton_log(serve_pid: int) -> str:
    """The log of the tritonserver that `serve` (process `serve_pid`) started."""
    from service.triton_server import DEFAULT_RUNTIME_DIR

    logs = sorted((DEFAULT_RUNTIME_DIR / "logs").glob(f"tritonserver-{serve_pid}-*.log"))
    assert logs, f"no Triton log of serve {serve_pid} in {DEFAULT_RUNTIME_DIR / 'logs'}"
    return "\n".join(p.read_text(errors="replace") for p in logs)


def test_baselines_bf16_flag_runs_them_under_autocast(shipped_model):
    """`bench serving --baseline-precision bf16`: the baselines' torch model under CPU
    autocast to bfloat16, rewards within the bf16 tolerance of fp32 (not equal to them)."""
    from loadtest.baselines.naive_server import load_model, pixel_values, raw_rewards, token_ids
    from shapes_world.benchmark import build_benchmark

    bundle = load_model(shipped_model, "bf16")
    bench = build_benchmark(seed=3, prompts_per_category=1, images_per_prompt=4)
    images = [item.image(size=64) for p in bench for item in p.items]
    prompts = [p.prompt for p in bench for _ in p.items]
    pixels, ids = pixel_values(bundle, images), token_ids(bundle, prompts)
    fp32, bf16 = (np.array(raw_rewards(bundle, pixels, ids, p)) for p in ("fp32", "bf16"))
    assert 0 < np.abs(fp32 - bf16).max() <= contract.RAW_TOLERANCE["bf16"]
    with pytest.raises(ValueError, match="precision must be one of"):
        load_model(shipped_model, "fp8")


def test_gateway_onnx_backend_runs_bf16_towers_as_triton_does(repos):
    """`gateway --onnx` on a bf16 repository: the in-process backend runs the towers on OpenVINO
    too (what Triton runs), not ONNX Runtime's fp32."""
    import asyncio

    from service.gateway.onnx_backend import OnnxBackend

    images = np.random.default_rng(1).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)
    embeds = {
        p: asyncio.run(OnnxBackend(r, intra_op_threads=1).encode_images(images))
        for p, r in repos.items()
    }
    openvino = open_served_model(repos["bf16"], "image_encoder").run({"IMAGE": images})[0]
    assert np.abs(embeds["bf16"] - openvino).max() <= SAME_EXPORT_TOLERANCE["bf16"]
    assert np.abs(embeds["bf16"] - embeds["fp32"]).max() <= TOLERANCES["bf16"]["image_embeds"]
    if _bf16_in_effect(repos["bf16"]):
        assert np.abs(embeds["bf16"] - embeds["fp32"]).max() > TOLERANCES["fp32"]["raw"]
