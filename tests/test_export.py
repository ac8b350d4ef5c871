"""Export to a Triton model repository, verification against PyTorch, and export errors."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.repository import ExportOptions, export_repository, is_up_to_date, sha256_file
from export.verify import verify_repository
from service import model_contract as contract
from service.model_contract import version_dir
from service.settings import SHIPPED_HEAD_DIR
from tests.conftest import run_cli, run_cli_in_process

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
        assert (version_dir(out, name) / "model.onnx").is_file()
        assert (version_dir(out, name) / "model.py").is_file()
    assert (version_dir(out, "score") / "model.py").is_file()  # the one-call BLS pipeline
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk - set(prov["artifacts"]) == {"provenance.json"}
    assert len(prov["export_sha256"]) == 64
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
        model = onnx.load(str(version_dir(out, name) / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
        for value in model.graph.input:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    image = onnx.load(str(version_dir(out, "image_encoder") / "model.onnx")).graph.input[0]
    assert all(d.dim_param for d in image.type.tensor_type.shape.dim[:3])  # batch, height, width


def _config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_configs_parse_as_triton_model_configs(repo):
    """Native onnxruntime configs (the NGC server), Python-backend configs for the bundled
    server beside them: same tensors and batching; every config names the content hash."""
    out, prov = repo
    assert prov["models"] == sorted((*MODELS, "score"))
    for name in (*MODELS, "score"):
        native = _config(out / name / "config.pbtxt")
        bundled_path = out / name / "configs" / f"{contract.BUNDLED_CONFIG_NAME}.pbtxt"
        configs = [native] + ([_config(bundled_path)] if name != "score" else [])
        if name == "score":
            assert native.backend == "python"  # the BLS pipeline is Python everywhere
        else:
            assert native.platform == "onnxruntime_onnx" and not native.backend
            assert configs[1].backend == "python"
            assert configs[1].input == native.input and configs[1].output == native.output
        for config in configs:
            assert config.name == name and config.max_batch_size == 16
            assert config.dynamic_batching.max_queue_delay_microseconds > 0
            assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
            param = config.parameters[contract.EXPORT_HASH_PARAMETER].string_value
            assert param == prov["export_sha256"]


def test_text_encoder_takes_only_the_tokens_a_batch_needs(repo, shipped_model):
    """[B, T] for any T that keeps every row's end token gives the 77-token embeddings."""
    from textnorm_reward_client.clip_tokenizer import ClipTokenizer

    from export.clip_model import load_clip, tokenize

    out, prov = repo
    assert prov["text_tokens"] == "dynamic"
    session = ort.InferenceSession(
        str(version_dir(out, "text_encoder") / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    prompts = ["a red circle", "three blue triangles on a grass background", "six stars"]
    full = tokenize(load_clip(shipped_model).tokenizer, prompts).numpy()
    (reference,) = session.run(None, {"INPUT_IDS": full})
    tokenized = ClipTokenizer(out / "tokenizer.json").encode(prompts)
    assert np.array_equal(tokenized.ids, full)  # the gateway's tokenizer = the HF one
    for bucket in (1, 8, 16, 77):
        ids = tokenized.rows([0, 1, 2], bucket)
        assert ids.shape[1] == min(77, -(-int(tokenized.lengths.max()) // bucket) * bucket)
        (trimmed,) = session.run(None, {"INPUT_IDS": ids})
        assert np.abs(trimmed - reference).max() < 1e-5, bucket
    assert tokenized.rows([0], 1).shape[1] == tokenized.lengths[0] < 16  # "a red circle"


def test_export_hash_names_what_computes_and_serves_rewards(repo, tmp_path):
    """The content hash is recomputable from the repository; it changes with any model file or
    config setting (not with provenance or README); every model's one version derives from it."""
    from export.repository import content_hash

    out, prov = repo
    assert content_hash(out) == prov["export_sha256"]
    version = contract.export_version(prov["export_sha256"])
    assert prov["model_version"] == version
    for name in prov["models"]:
        assert version_dir(out, name).name == str(version)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "README.md").write_text("edited")
    (copy / "provenance.json").write_text("{}")
    assert content_hash(copy) == prov["export_sha256"]
    config = copy / "text_encoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 16", "max_batch_size: 8"))
    assert content_hash(copy) != prov["export_sha256"]  # the gateway splits batches by it
    shutil.copyfile(out / "text_encoder" / "config.pbtxt", config)
    onnx_file = version_dir(copy, "reward_head") / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    assert content_hash(copy) != prov["export_sha256"]


def test_the_same_export_from_another_checkout_has_the_same_bytes(repo, shipped_model, tmp_path):
    """The code copied to another path exports the shipped model to the same export hash (so
    the same `model_version`): no checkout or site-packages path inside any model file."""
    out, prov = repo
    root = Path(__file__).resolve().parents[1]
    elsewhere = tmp_path / "another" / "checkout"
    for package in ("export", "service", "model_repository", "models"):
        shutil.copytree(root / package, elsewhere / package, ignore=shutil.ignore_patterns("*.pyc"))
    script = (
        "import sys; from pathlib import Path; "
        "from export.repository import ExportOptions, export_repository; "
        "from service.settings import SHIPPED_HEAD_DIR; "
        "assert Path(sys.modules['export'].__file__).is_relative_to(Path.cwd()); "
        f"prov, _ = export_repository({shipped_model!r}, Path({str(tmp_path / 'repo')!r}), "
        "SHIPPED_HEAD_DIR, ExportOptions(max_batch=16)); print(prov['export_sha256'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(elsewhere)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == prov["export_sha256"]
    site_packages = sysconfig.get_paths()["purelib"]  # the venv may live outside the checkout
    for name in MODELS:
        graph = (version_dir(out, name) / "model.onnx").read_bytes()
        assert str(root).encode() not in graph and site_packages.encode() not in graph


def test_reexport_is_a_no_op_and_tampering_is_detected(repo, shipped_model):
    out, prov = repo
    mtime = (version_dir(out, "reward_head") / "model.onnx").stat().st_mtime_ns
    again, changed = export_repository(
        shipped_model, out, SHIPPED_HEAD_DIR, ExportOptions(max_batch=16)
    )
    assert not changed and again["cache_key"] == prov["cache_key"]
    assert (version_dir(out, "reward_head") / "model.onnx").stat().st_mtime_ns == mtime
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
    save_model(export_text_encoder(bundle), version_dir(broken, "text_encoder") / "model.onnx")
    res = run_cli("verify", str(broken), "--prompts", "1", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert not report["ok"] and report["max_diff"]["text_embeds"] > 1e-3


def test_batches_of_max_batch_match_single_items(repo):
    out, _ = repo
    session = ort.InferenceSession(str(version_dir(out, "image_encoder") / "model.onnx"))
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
        (["--target", "gpu", "--precision", "int8"], "--precision int8 needs --target cpu"),
        (["--precision", "int4"], "--precision must be one of fp32, fp16, int8"),
        # the shipped calibration belongs to the shipped model, not to the second one
        (
            [
                "--model",
                "models/shapes-clip-b",
                "--calibration",
                "models/shapes-clip-calibration.json",
            ],
            "calibrated for checkpoint",
        ),
        (["--calibration", "/nonexistent/calibration.json"], "cannot read the calibration file"),
    ],
)
def test_cli_export_bad_input_is_one_line(tmp_path, args, message):
    res = run_cli("export", "--out", str(tmp_path / "repo"), *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "option", [["--target", "tpu"], ["--precision", "int4"], ["--threads", "-1"]]
)
def test_a_bad_export_option_is_refused_before_torch_loads(tmp_path, option):
    """The options are checked first (export/options.py): the user waits no seconds of torch and
    checkpoint loading to read that an option is wrong."""
    code, torch_loaded, stderr = run_cli_in_process("export", "--out", str(tmp_path / "r"), *option)
    assert (code, torch_loaded) == (2, False), stderr
    assert stderr.startswith("error: --") and stderr.strip().count("\n") == 0


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


def _tree(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def test_a_new_export_replaces_the_old_through_a_symlink_or_not_at_all(tmp_path, monkeypatch):
    from export.repository import _replace

    def export(name: str, version: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "provenance.json").write_text(version)
        return path

    # OUT a symlink: the directory it points at is replaced and the link stays. Before, the
    # link became a directory (the old export stranded behind it), or, across filesystems,
    # the rename failed with OUT already moved away: no repository at all.
    target = export("served", "v1")
    link = tmp_path / "link"
    link.symlink_to(target)
    _replace(link, export(".served.tmp", "v2"))
    assert link.is_symlink() and _tree(link) == {"provenance.json": "v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "served"]

    # The last move fails: the older export is put back.
    real_rename = Path.rename

    def failing(self, to):
        if self.name == ".served.tmp2":
            raise OSError(18, "Invalid cross-device link")
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="cross-device"):
        _replace(link, export(".served.tmp2", "v3"))
    assert _tree(target) == {"provenance.json": "v2"}
    assert not (tmp_path / ".served.old").exists()


@pytest.fixture(scope="module")
def gpu_repo(shipped_model, tmp_path_factory):
    """The GPU flavour, exported here without TensorRT: ONNX files, configs, engine recipes."""
    out = tmp_path_factory.mktemp("export-gpu") / "repo"
    options = ExportOptions(target="gpu", precision="fp16", max_batch=16)
    prov, _ = export_repository(shipped_model, out, SHIPPED_HEAD_DIR, options)
    return out, prov


def test_gpu_flavour_uses_native_backends_and_keeps_the_contract(repo, gpu_repo):
    out, prov = gpu_repo
    platforms = {m: _config(out / m / "config.pbtxt") for m in prov["models"]}
    assert {m: c.platform or c.backend for m, c in platforms.items()} == {
        "image_encoder": "ensemble",
        "image_preprocess": "onnxruntime_onnx",
        "image_tower": "tensorrt_plan",
        "text_encoder": "tensorrt_plan",
        "reward_head": "onnxruntime_onnx",  # fp32 always: never a TensorRT fp16 engine
        "score": "python",  # only the direct-gRPC pipeline is Python
    }
    for name in ("image_preprocess", "image_tower", "text_encoder"):
        assert [g.kind for g in platforms[name].instance_group] == [
            model_config_pb2.ModelInstanceGroup.KIND_GPU
        ]
    assert [g.kind for g in platforms["reward_head"].instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_CPU  # exact fp32, no TF32
    ]
    cpu_out, _ = repo
    for name in MODELS:  # the gateway's view: identical tensors and batching in both flavours
        cpu, gpu = _config(cpu_out / name / "config.pbtxt"), platforms[name]
        assert (gpu.input, gpu.output, gpu.max_batch_size) == (
            cpu.input,
            cpu.output,
            cpu.max_batch_size,
        )
    for config in platforms.values():
        assert (
            config.parameters[contract.EXPORT_HASH_PARAMETER].string_value
            == (prov["export_sha256"])
        )
    engines = json.loads((out / "engines.json").read_text())
    assert [(e["model"], e["precision"]) for e in engines] == [
        ("image_tower", "fp16"),
        ("text_encoder", "fp16"),
    ]
    assert engines[1]["profiles"]["INPUT_IDS"]["max"] == [16, contract.CONTEXT_LENGTH]
    assert not list(out.rglob("*.plan"))  # engines are built on the GPU node


def test_gpu_flavour_preprocess_and_tower_equal_the_cpu_image_encoder(repo, gpu_repo):
    """The ensemble's two ONNX graphs, chained under ONNX Runtime, compute the CPU encoder."""
    cpu_out, gpu_out = repo[0], gpu_repo[0]

    def session(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 90, 150, 3), dtype=np.uint8)
    pixels = session(version_dir(gpu_out, "image_preprocess") / "model.onnx").run(
        None, {"IMAGE": images}
    )[0]
    chained = session(version_dir(gpu_out, "image_tower") / "model.onnx").run(
        None, {"PIXEL_VALUES": pixels}
    )[0]
    whole = session(version_dir(cpu_out, "image_encoder") / "model.onnx").run(
        None, {"IMAGE": images}
    )[0]
    assert np.abs(chained - whole).max() < 1e-5


def test_build_engines_without_tensorrt_is_one_line(gpu_repo, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    res = run_cli("build-engines", str(gpu_repo[0]), "--cache", str(tmp_path / "cache"))
    assert res.returncode == 2
    assert "TensorRT is not installed" in res.stderr and res.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("fp16", [True, False])
def test_an_fp32_engine_is_built_without_tf32(fp16, tmp_path, monkeypatch):
    """The builder flags, through a stand-in `tensorrt` module (the real build needs a GPU).
    TensorRT turns TF32 on by default: an "fp32" engine computed its matmuls in TF32."""
    import sys
    from types import SimpleNamespace as Namespace

    from export import tensorrt as trt_build

    flags = {"TF32"}  # TensorRT's default
    config = Namespace(
        set_memory_pool_limit=lambda *_: None,
        set_flag=flags.add,
        clear_flag=flags.discard,
        add_optimization_profile=lambda _: None,
    )
    builder = Namespace(
        create_network=lambda _: None,
        create_builder_config=lambda: config,
        create_optimization_profile=lambda: Namespace(set_shape=lambda *_: None),
        build_serialized_network=lambda *_: b"plan",
    )
    fake = Namespace(
        Logger=lambda _: None,
        Builder=lambda _: builder,
        OnnxParser=lambda *_: Namespace(parse_from_file=lambda _: True),
        BuilderFlag=Namespace(FP16="FP16", TF32="TF32"),
        MemoryPoolType=Namespace(WORKSPACE=0),
    )
    fake.Logger.WARNING = 0
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build.shutil, "which", lambda _: "/usr/bin/nvidia-smi")
    plan = tmp_path / "model.plan"
    trt_build.build_engine(tmp_path / "model.onnx", plan, {}, fp16=fp16)
    assert plan.read_bytes() == b"plan"
    assert flags == ({"FP16", "TF32"} if fp16 else set())


def test_build_engines_cache_is_keyed_by_gpu_tensorrt_and_onnx(gpu_repo, tmp_path):
    """The cache logic with a stand-in builder (the real one needs a GPU: the gpu test)."""
    from export.tensorrt import build_engines

    repo = tmp_path / "repo"
    shutil.copytree(gpu_repo[0], repo)
    built: list[tuple[str, bool]] = []

    def fake_builder(onnx_path, plan_path, profiles, fp16, timing_cache):
        assert set(profiles) and fp16
        built.append((onnx_path.parent.parent.name, fp16))
        plan_path.write_bytes(b"engine of " + sha256_file(onnx_path).encode())

    def run(gpu: str, trt: str = "10.5.0") -> list[dict]:
        return build_engines(
            repo, tmp_path / "cache", builder=fake_builder, gpu=gpu, trt_version=trt
        )

    first = run("NVIDIA H200")
    assert [r["reused"] for r in first] == [False, False] and len(built) == 2
    for name in ("image_tower", "text_encoder"):
        plan = (version_dir(repo, name) / "model.plan").read_bytes()
        assert plan == b"engine of " + sha256_file(version_dir(repo, name) / "model.onnx").encode()
    assert [r["reused"] for r in run("NVIDIA H200")] == [True, True] and len(built) == 2
    other = run("NVIDIA L4")  # another GPU model: new engines, other keys
    assert [r["reused"] for r in other] == [False, False] and len(built) == 4
    assert {r["key"] for r in other}.isdisjoint(r["key"] for r in first)
    assert [r["reused"] for r in run("NVIDIA H200", "10.6.0")] == [False, False]
    tampered = version_dir(repo, "text_encoder") / "model.onnx"
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="does not match provenance"):
        run("NVIDIA H200")


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
    report = verify_repository(out, n_prompts=5)
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
    from export.tensorrt import build_engines

    out = tmp_path / "gpu"
    options = ExportOptions(target="gpu", precision="fp16", max_batch=32)
    export_repository(shipped_model, out, SHIPPED_HEAD_DIR, options)
    build_engines(out, tmp_path / "engine-cache")
    for name in ("image_tower", "text_encoder"):
        assert (version_dir(out, name) / "model.plan").is_file()
    config = text_format.Parse(
        (out / "image_encoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.platform == "ensemble"

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

    def run(plan: str, inputs: dict, output: str, out_shape: tuple) -> np.ndarray:
        engine = runtime.deserialize_cuda_engine(
            (version_dir(out, plan) / "model.plan").read_bytes()
        )
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


def test_encoder_bench_measures_onnx_parity_and_a_bf16_flavour(repo, shipped_model):
    from export.bench import bench_image_encoder
    from export.clip_model import load_clip

    out, _ = repo
    onnx_file = version_dir(out, "image_encoder") / "model.onnx"
    res = bench_image_encoder(
        load_clip(shipped_model), onnx_file, runs=1, min_seconds=0.05, batch_sizes=(2,), bf16=True
    )
    assert all(res[k][2] > 0 for k in ("torch", "onnxruntime", "torch_bf16"))
    assert res["max_abs_diff_onnxruntime"][2] < 1e-4  # the served fp32 path: parity
    # bf16 really runs in lower precision, and stays near fp32 on unit embeddings
    assert 1e-5 < res["max_abs_diff_torch_bf16"][2] < 0.05


def test_verify_checks_as_many_prompts_as_asked_over_every_category():
    # `--prompts N` ran max(1, N // 5) per category: 1 → 5, 3 → 5, 7 → 5, 12 → 10.
    from export.verify import _held_out

    for n in (1, 3, 7, 12):
        cases = _held_out(n, seed=99)
        assert len(cases) == n
    firsts = {texts[0] for _, texts in _held_out(5, seed=99)}
    assert len(firsts) == 5  # one of each category, not five of the first
