"""Export to a Triton model repository, verification against PyTorch, and export errors."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.repository import ExportOptions, export_repository, is_up_to_date, sha256_file
from export.verify import verify_repository
from service import model_contract as contract
from service.settings import SHIPPED_HEAD_DIR
from tests.conftest import run_cli

MODELS = ("image_encoder", "text_encoder", "reward_head")


@pytest.fixture(scope="module")
def repo(shipped_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "repo"
    prov, changed = export_repository(
        shipped_model, out, SHIPPED_HEAD_DIR, ExportOptions(max_batch=16)
    )
    assert changed
    return out, prov


def test_layout_and_provenance(repo):
    out, prov = repo
    for name in MODELS:
        assert (out / name / "config.pbtxt").is_file()
        assert (out / name / "1" / "model.onnx").is_file()
        assert (out / name / "1" / "model.py").is_file()
    assert (out / "score" / "1" / "model.py").is_file()  # the one-call BLS pipeline
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk - set(prov["artifacts"]) == {"provenance.json"}
    for rel, digest in prov["artifacts"].items():
        assert sha256_file(out / rel) == digest
    assert prov["model"]["checkpoint_sha256"] and prov["head"]["sha256"]
    assert prov["versions"]["torch"].startswith("2.13.0") and prov["versions"]["onnxruntime"]
    assert prov["textnorm_defaults"]["max_prompts"] == contract.MAX_PROMPTS
    assert not list(out.rglob("*.data"))  # single-file ONNX: no external data


def test_onnx_graphs_have_symbolic_batch_and_contract_names(repo):
    out, prov = repo
    dim = prov["model"]["embed_dim"]
    specs = {
        "image_encoder": contract.image_encoder(dim),
        "text_encoder": contract.text_encoder(dim),
        "reward_head": contract.reward_head(dim, True),
    }
    for name, spec in specs.items():
        model = onnx.load(str(out / name / "1" / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
        for value in model.graph.input:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    image = onnx.load(str(out / "image_encoder" / "1" / "model.onnx")).graph.input[0]
    assert all(d.dim_param for d in image.type.tensor_type.shape.dim[:3])  # batch, height, width


def test_configs_parse_as_triton_model_configs(repo):
    out, _ = repo
    for name in (*MODELS, "score"):
        config = text_format.Parse(
            (out / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        assert config.name == name and config.backend == "python"
        assert config.max_batch_size == 16
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]


def test_reexport_is_a_no_op_and_tampering_is_detected(repo, shipped_model):
    out, prov = repo
    mtime = (out / "reward_head" / "1" / "model.onnx").stat().st_mtime_ns
    again, changed = export_repository(
        shipped_model, out, SHIPPED_HEAD_DIR, ExportOptions(max_batch=16)
    )
    assert not changed and again["cache_key"] == prov["cache_key"]
    assert (out / "reward_head" / "1" / "model.onnx").stat().st_mtime_ns == mtime
    # A modified artifact → not up to date, so the next export rewrites it.
    path = out / "text_encoder" / "config.pbtxt"
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        assert not is_up_to_date(out, prov["cache_key"])
    finally:
        path.write_text(original)
    assert is_up_to_date(out, prov["cache_key"])


def test_verify_passes_on_all_image_shapes(repo):
    out, _ = repo
    report = verify_repository(out, n_prompts=5)
    assert report.ok, report.max_diff
    assert report.cases == 5 * 7  # seven sizes: square, tall, wide, tiny, 150 px, 2048 px, odd
    assert report.max_diff["raw"] <= 1e-4 and report.max_diff["head_graph"] <= 1e-5


def test_verify_fails_when_an_artifact_is_wrong(repo, tmp_path):
    out, _ = repo
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    # Swap the text encoder for the one of a different (random) model: verify must notice.
    from export.clip_model import load_clip
    from export.onnx_export import export_text_encoder, save_model

    bundle = load_clip(json.loads((out / "provenance.json").read_text())["model"]["source"])
    import torch

    with torch.no_grad():
        for p in bundle.model.text_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(export_text_encoder(bundle), broken / "text_encoder" / "1" / "model.onnx")
    res = run_cli("verify", str(broken), "--prompts", "1", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert not report["ok"] and report["max_diff"]["text_embeds"] > 1e-3


def test_batches_of_max_batch_match_single_items(repo):
    out, _ = repo
    session = ort.InferenceSession(str(out / "image_encoder" / "1" / "model.onnx"))
    images = np.random.default_rng(1).integers(0, 256, (16, 50, 70, 3), dtype=np.uint8)
    batched = session.run(None, {"IMAGE": images})[0]
    single = np.concatenate([session.run(None, {"IMAGE": images[i : i + 1]})[0] for i in range(16)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/clip"], "model directory not found"),
        (["--target", "tpu"], "--target must be cpu or gpu"),
        (["--precision", "fp16"], "--precision fp16 needs --target gpu"),
    ],
)
def test_cli_export_bad_input_is_one_line(tmp_path, args, message):
    res = run_cli("export", "--out", str(tmp_path / "repo"), *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "repo").exists()


def test_non_clip_checkpoint_and_unwritable_output(tmp_path, shipped_model):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = run_cli("export", "--out", str(tmp_path / "a"), "--model", str(bert))
    assert res.returncode == 2 and "not CLIP" in res.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_cli("export", "--out", str(blocker / "repo"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "file"]  # nothing half-written


def test_gpu_target_without_tensorrt_fails_cleanly(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    res = run_cli(
        "export", "--out", str(tmp_path / "repo"), "--target", "gpu", "--precision", "fp16"
    )
    assert res.returncode == 2
    assert "TensorRT is not installed" in res.stderr and res.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_vit_b32_sized_checkpoint_exports_and_verifies(tmp_path, shipped_model):
    """A CLIP with OpenAI ViT-B/32's shapes (224 px, patch 32, width 768/512, 12 layers)."""
    from export.bench import vit_b32_checkpoint
    from export.clip_model import load_clip

    ckpt = vit_b32_checkpoint(tmp_path / "vit-b32", load_clip(shipped_model))
    bundle = load_clip(ckpt)
    assert bundle.model.config.vision_config.hidden_size == 768
    assert bundle.processor.crop_size["height"] == 224
    out = tmp_path / "repo"
    prov, _ = export_repository(str(ckpt), out, None, ExportOptions(max_batch=8))
    assert prov["model"]["image_size"] == 224 and prov["head"] is None
    assert not list(out.rglob("*.data"))  # ~480 MB in all, still single-file ONNX
    report = verify_repository(out, n_prompts=1)
    assert report.ok, report.max_diff
    assert report.cases == 5 * 7  # one prompt per category, seven image sizes each


# fp16 TensorRT tolerance: fp16 keeps 11 significant bits (relative step 4.9e-4); a unit
# embedding accumulated over 12 layers typically drifts ~1e-3 per component, so a cosine of two
# such embeddings moves by a few 1e-3. Bound: 1e-2 on embedding components, 5e-3 on raw rewards.
FP16_EMBED_TOL, FP16_REWARD_TOL = 1e-2, 5e-3


@pytest.mark.gpu
def test_gpu_export_builds_engines_within_fp16_tolerance(tmp_path, shipped_model):
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if shutil.which("nvidia-smi") is None or not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA-enabled torch")
    import tensorrt as trt

    from export.clip_model import image_embeddings, load_clip, text_embeddings, tokenize

    out = tmp_path / "gpu"
    options = ExportOptions(target="gpu", precision="fp16", max_batch=32)
    export_repository(shipped_model, out, SHIPPED_HEAD_DIR, options)
    for name in ("image_tower", "text_encoder", "reward_head"):
        assert (out / name / "1" / "model.plan").is_file()
    config = text_format.Parse(
        (out / "image_encoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.platform == "ensemble"

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

    def run(plan: str, inputs: dict, output: str, out_shape: tuple) -> np.ndarray:
        engine = runtime.deserialize_cuda_engine((out / plan / "1" / "model.plan").read_bytes())
        context = engine.create_execution_context()
        keep = []
        for name, value in inputs.items():
            tensor = torch.from_numpy(value).cuda().contiguous()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        result = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        context.set_tensor_address(output, result.data_ptr())
        assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        return result.cpu().numpy()

    bundle = load_clip(shipped_model)
    images = [
        np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(8)
    ]
    px = bundle.processor(images=images, return_tensors="pt")["pixel_values"]
    ref_img = image_embeddings(bundle.model, px).numpy()
    got_img = run("image_tower", {"PIXEL_VALUES": px.numpy()}, "IMAGE_EMBEDS", ref_img.shape)
    assert np.abs(got_img - ref_img).max() <= FP16_EMBED_TOL
    ids = tokenize(bundle.tokenizer, ["three red circles", "a blue star on a sky background"])
    ref_txt = text_embeddings(bundle.model, ids).numpy()
    got_txt = run("text_encoder", {"INPUT_IDS": ids.numpy()}, "TEXT_EMBEDS", ref_txt.shape)
    assert np.abs(got_txt - ref_txt).max() <= FP16_EMBED_TOL
    assert np.abs(got_img @ got_txt.T - ref_img @ ref_txt.T).max() <= FP16_REWARD_TOL
