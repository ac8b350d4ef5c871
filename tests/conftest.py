"""Shared test helpers."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.settings import SHIPPED_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `reward-service ARGS...` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_in_process(*args: str, timeout: float = 120) -> tuple[int, bool, str]:
    """Run the CLI's app in a fresh interpreter: (exit code, whether torch got imported,
    stderr). For the checks that must answer before torch loads (seconds of imports)."""
    code = (
        "import sys\nfrom service.cli import app\ntry:\n    app(sys.argv[1:])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout
    )
    exit_code, torch_loaded = res.stdout.split()[-2:]
    return int(exit_code), torch_loaded == "True", res.stderr


@pytest.fixture
def clean_reward_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No REWARD_* variable of the developer's shell: Settings() are the defaults."""
    for name in list(os.environ):
        if name.startswith("REWARD_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="session")
def shipped_model() -> str:
    assert (SHIPPED_MODEL_DIR / "model.safetensors").is_file(), "the shipped model is missing"
    return str(SHIPPED_MODEL_DIR)


def shipped_exports_fixture(precision: str):
    """A module fixture: the shipped CLIP and learned head exported twice, fp32 and
    `precision`, as {precision: repository}."""

    @pytest.fixture(scope="module")
    def repos(shipped_model, tmp_path_factory) -> dict[str, Path]:
        from export.repository import ExportOptions, export_repository
        from service.settings import SHIPPED_HEAD_DIR

        root = tmp_path_factory.mktemp(precision)
        out = {}
        for each in ("fp32", precision):
            out[each] = root / each
            options = ExportOptions(precision=each)
            export_repository(shipped_model, out[each], SHIPPED_HEAD_DIR, options)
        return out

    return repos


def assert_verifies_in_reduced_precision(repo: Path, precision: str) -> None:
    """`verify` of an int8 or bf16 export: within its precision's tolerances, past fp32's (the
    reduced precision is in effect), the head graph still exact; the learned head, which reads
    the reduced-precision embeddings, moved by them yet within its tolerance."""
    from export.verify import TOLERANCES, verify_repository
    from service import model_contract as contract

    report = verify_repository(repo, n_prompts=2)
    assert report.ok, report.max_diff
    assert report.tolerances["raw"] == contract.RAW_TOLERANCE[precision]
    fp32 = TOLERANCES["fp32"]
    assert report.max_diff["raw"] > fp32["raw"]
    assert report.max_diff["image_embeds"] > fp32["image_embeds"]
    assert report.max_diff["head_graph"] <= fp32["head_graph"]
    assert fp32["head"] < report.max_diff["head"] <= report.tolerances["head"]


def served_raw_rewards(repo: Path, images: list, prompts: list[str]) -> np.ndarray:
    """Raw rewards by an export's own files and runtimes, in process: each uint8 [H, W, 3]
    image alone, the prompts in one batch (tokenised with the repository's tokenizer.json)."""
    from textnorm_reward_client.clip_tokenizer import ClipTokenizer

    from service.onnx_models import open_served_model

    ids = ClipTokenizer(repo / "tokenizer.json").encode(list(prompts)).ids
    image = open_served_model(repo, "image_encoder")
    img = np.concatenate([image.run({"IMAGE": np.asarray(x)[None]})[0] for x in images])
    txt = open_served_model(repo, "text_encoder").run({"INPUT_IDS": ids})[0]
    return (img * txt).sum(axis=1)


def png_items(images: list, prompt: str) -> list[dict[str, str]]:
    """/v1/score items: each PIL image as a base64 PNG, all with `prompt`."""
    import base64
    import io

    items = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        items.append({"image": base64.b64encode(buf.getvalue()).decode(), "prompt": prompt})
    return items


def assert_error(response, status: int, code: str, field: str | None = None, limit=None) -> dict:
    """The gateway's error shape: status, code, echoed request id, the field and the limit."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    if field is not None:
        assert body["error"]["field"] == field, body
        assert field in body["error"]["message"], body
    if limit is not None:
        assert body["error"]["limit"] == limit, body
    return body
