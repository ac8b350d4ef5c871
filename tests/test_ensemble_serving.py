"""A two-model export served as one ensemble (settings.members, issue 14 item 3).

The shipped CLIP and the shipped second member (models/shapes-clip-b: another image tower,
training seed and caption noise, the same tokenizer) are exported into one repository; the
gateway scores every item with both models and adds each model's rewards and the ensembles of
their TextNorm probabilities. Checked against a PyTorch reference of each model (no mocks), in
process on ONNX Runtime and through the real `serve` stack (bundled tritonserver).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from textnorm_reward_client import MemberReward, ScoreResult

from export.clip_model import checkpoint_hash, image_embeddings, load_clip, text_embeddings
from export.clip_model import tokenize as torch_tokenize
from export.tokenizer_build import save_clip_tokenizer, train_bpe
from export.verify import verify_repository
from models import SHIPPED_CALIBRATION_FILE, SHIPPED_MEMBER_DIR, SHIPPED_MODEL_DIR
from service.contrastive import contrastive_prompts
from service.gateway import create_app
from service.gateway.calibration import load_calibration, prompt_kind
from service.gateway.onnx_backend import OnnxBackend
from service.gateway.provenance import load_provenance
from service.model_contract import member_model, version_dir
from service.settings import Settings
from service.textnorm import ensemble_mean, ensemble_uncertainty, textnorm
from shapes_world.render import render
from shapes_world.scene import Group, Scene
from tests.conftest import assert_error, run_cli
from tests.serve_stack import serve_stack
from tests.test_serving import AUTH

pytest_plugins = ("tests.conftest_triton",)  # the single-model session export

PROMPT = "three red triangles on a grass background"
SCENES = [
    Scene(groups=(Group(3, "red", "triangle"),), background="grass"),  # matches the prompt
    Scene(groups=(Group(5, "red", "triangle"),), background="grass"),  # count off
    Scene(groups=(Group(3, "blue", "triangle"),), background="grass"),  # colour off
]


@pytest.fixture(scope="module")
def member_dir() -> Path:
    assert (SHIPPED_MEMBER_DIR / "model.safetensors").is_file(), "the shipped member is missing"
    return SHIPPED_MEMBER_DIR


@pytest.fixture(scope="module")
def ensemble_repo(tmp_path_factory, member_dir) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "repo"
    args = ["export", "--model", str(SHIPPED_MODEL_DIR), "--no-head", "--member", str(member_dir)]
    result = run_cli(*args, "--max-batch", "16", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def provenance(ensemble_repo) -> dict:
    return load_provenance(ensemble_repo)


def _app(repo: Path, provenance: dict, member_backend=None):
    settings = Settings(tokenizer_file=str(repo / "tokenizer.json"), head=None)
    member = member_backend or OnnxBackend(repo, intra_op_threads=1, member=1)
    return create_app(settings, OnnxBackend(repo, intra_op_threads=1), provenance, members=[member])


def _images() -> list[np.ndarray]:
    return [np.asarray(render(scene, seed=7 + i).image) for i, scene in enumerate(SCENES)]


def _b64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _request() -> dict:
    return {"items": [{"image": _b64(im), "prompt": PROMPT} for im in _images()]}


SHIPPED_CALIBRATION = load_calibration(SHIPPED_CALIBRATION_FILE)


def _calibrated_scale(source: Path) -> float:
    """The c the shipped calibration gives `source` for PROMPT's kind (auto-rule sets)."""
    kind = prompt_kind(PROMPT)
    if source == SHIPPED_MODEL_DIR:
        return SHIPPED_CALIBRATION.prompt_kinds[kind].scale
    return SHIPPED_CALIBRATION.members[checkpoint_hash(source)].prompt_kinds[kind]


def _reference(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch: (raw cosine [N], TextNorm at the model's own calibrated c [N]) over the served
    `auto` set."""
    bundle = load_clip(source)
    texts = [PROMPT, *contrastive_prompts(PROMPT, "auto")]
    pixels = bundle.processor(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = image_embeddings(bundle.model, pixels).numpy().astype(np.float64)
        txt = text_embeddings(bundle.model, torch_tokenize(bundle.tokenizer, texts)).numpy()
    scores = img @ txt.astype(np.float64).T
    return scores[:, 0], textnorm(scores, scale=_calibrated_scale(source))


@pytest.fixture(scope="module")
def references(member_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"first": _reference(SHIPPED_MODEL_DIR), "member": _reference(member_dir)}


@pytest.fixture(scope="module")
def in_process(ensemble_repo, provenance) -> dict:
    with TestClient(_app(ensemble_repo, provenance)) as client:
        response = client.post("/v1/score", json=_request())
    assert response.status_code == 200, response.text
    return response.json()


# -- export ----------------------------------------------------------------------------------------
def test_export_writes_each_member_as_its_own_models(ensemble_repo, provenance, member_dir):
    (member,) = provenance["members"]
    # the shipped calibration has this member's own c (calibrate --member): it is bundled
    assert provenance["textnorm_calibration"]["sha256"] == SHIPPED_CALIBRATION.sha256
    assert member["checkpoint_sha256"] == checkpoint_hash(member_dir)
    assert member["checkpoint_sha256"] != provenance["model"]["checkpoint_sha256"]
    assert member["image_size"] == 48 and provenance["model"]["image_size"] == 64
    roles = ("image_encoder", "text_encoder", "reward_head")
    assert member["models"] == {role: member_model(role, 1) for role in roles}
    for role in roles:  # one identity for the whole ensemble: every config names the hash
        assert member_model(role, 1) in provenance["models"]
        config = (ensemble_repo / member_model(role, 1) / "config.pbtxt").read_text()
        assert provenance["export_sha256"] in config


def test_the_default_calibration_is_bundled_only_with_every_members_c(tmp_path, member_dir):
    """export/repository.py: the default (shipped) calibration goes with members only when it
    has each member's own c; an explicit file is bundled as given (members at the item's c)."""
    from export.repository import _calibration_bytes

    first, member = checkpoint_hash(SHIPPED_MODEL_DIR), checkpoint_hash(member_dir)
    shipped = SHIPPED_CALIBRATION_FILE.read_bytes()
    assert (
        _calibration_bytes(SHIPPED_CALIBRATION_FILE, first, skip_unfitting=True, members=[member])
        == shipped
    )
    document = json.loads(shipped)
    del document["members"]
    single = tmp_path / "single-model.json"
    single.write_text(json.dumps(document))
    assert _calibration_bytes(single, first, skip_unfitting=True, members=[member]) is None
    assert _calibration_bytes(single, first, skip_unfitting=True, members=[]) is not None
    assert _calibration_bytes(single, first, skip_unfitting=False, members=[member]) is not None
    document["members"] = {member: {"name": "shapes-clip-b"}}  # named, but no c of its own
    single.write_text(json.dumps(document))
    assert _calibration_bytes(single, first, skip_unfitting=True, members=[member]) is None
    other = "f" * 64  # a member the shipped file does not know
    assert (
        _calibration_bytes(SHIPPED_CALIBRATION_FILE, first, skip_unfitting=True, members=[other])
        is None
    )


def test_verify_checks_every_member_against_pytorch(ensemble_repo, tmp_path):
    report = verify_repository(ensemble_repo, n_prompts=1, max_batch_check=False)
    assert report.ok, report.max_diff
    assert {"member1.image_embeds", "member1.text_embeds", "member1.raw"} <= set(report.tolerances)
    # the member's text encoder swapped for the first model's: verify must notice
    broken = tmp_path / "broken"
    shutil.copytree(ensemble_repo, broken)
    first = version_dir(broken, "text_encoder") / "model.onnx"
    shutil.copyfile(first, version_dir(broken, member_model("text_encoder", 1)) / "model.onnx")
    report = verify_repository(broken, n_prompts=1, max_batch_check=False)
    assert not report.ok
    assert report.max_diff["member1.text_embeds"] > report.tolerances["member1.text_embeds"]
    assert report.max_diff["text_embeds"] <= report.tolerances["text_embeds"]


def test_a_member_that_is_the_model_is_refused(tmp_path):
    out = tmp_path / "repo"
    args = ["export", "--no-head", "--member", str(SHIPPED_MODEL_DIR), "--out", str(out)]
    result = run_cli(*args, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "same checkpoint" in result.stderr and not out.exists()


def test_member_with_another_tokenizer_is_refused(tmp_path, member_dir):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(member_dir, other)
    (other / "tokenizer.json").unlink()
    save_clip_tokenizer(*train_bpe(["a red circle", "two blue squares"] * 50, 300), other)
    out = tmp_path / "repo"
    args = ["export", "--no-head", "--member", str(other), "--out", str(out)]
    result = run_cli(*args, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "another tokenizer" in result.stderr and str(other) in result.stderr
    assert not out.exists()


# -- the gateway, in process -----------------------------------------------------------------------
def test_every_model_scores_every_item_as_its_pytorch_reference(in_process, references):
    results = in_process["results"]
    names = [m["name"] for m in in_process["provenance"]["members"]]
    assert names == ["shapes-clip", "shapes-clip-b"]
    for k, which in enumerate(("first", "member")):
        raw, tn = references[which]
        np.testing.assert_allclose([r["members"][k]["raw"] for r in results], raw, atol=1e-4)
        np.testing.assert_allclose([r["members"][k]["textnorm"] for r in results], tn, atol=1e-4)
    # the first model's rewards are the response's usual fields
    assert [r["raw"] for r in results] == [r["members"][0]["raw"] for r in results]
    assert [r["textnorm"] for r in results] == [r["members"][0]["textnorm"] for r in results]
    # two genuinely different models: they disagree
    member_raw = np.array([r["members"][1]["raw"] for r in results])
    assert np.max(np.abs(member_raw - np.array([r["raw"] for r in results]))) > 1e-2


def test_each_model_uses_its_own_calibrated_c(in_process, member_dir):
    first, member = _calibrated_scale(SHIPPED_MODEL_DIR), _calibrated_scale(member_dir)
    assert first != member  # the shipped calibration chose different c: the test can tell
    for item in in_process["results"]:
        assert [m["textnorm_scale"] for m in item["members"]] == [first, member]
        assert item["textnorm_scale"] == first and item["textnorm_scale_source"] == "calibrated"
    used = in_process["provenance"]["textnorm"]  # the response's block says the same
    models_lambda = SHIPPED_CALIBRATION.prompt_kinds[prompt_kind(PROMPT)].models_lambda
    assert (used["scale"], used["member_scales"]) == (first, [first, member])
    assert used["ensemble_models_lambda"] == models_lambda != used["ensemble_lambda"]


def test_model_ensembles_combine_the_two_textnorm_probabilities(in_process):
    models_lambda = SHIPPED_CALIBRATION.prompt_kinds[prompt_kind(PROMPT)].models_lambda
    for item in in_process["results"]:
        probs = np.array([[m["textnorm"]] for m in item["members"]])
        lam = item["ensemble_models_lambda"]
        assert lam == models_lambda  # the calibration's models λ, not the item's ensemble λ
        assert item["ensemble_models_mean"] == pytest.approx(ensemble_mean(probs)[0], abs=1e-12)
        uw = ensemble_uncertainty(probs, lam=lam)[0]
        assert item["ensemble_models_uw"] == pytest.approx(uw, abs=1e-12)
        assert item["ensemble_models_uw"] <= item["ensemble_models_mean"]


def test_models_card_and_group_advantages_use_the_ensemble(ensemble_repo, provenance):
    with TestClient(_app(ensemble_repo, provenance)) as client:
        card = client.get("/v1/models").json()["models"][0]
        assert {"ensemble_models_mean", "ensemble_models_uw"} <= set(card["rewards"])
        assert [m["checkpoint_sha256"] for m in card["members"]] == [
            provenance["model"]["checkpoint_sha256"],
            provenance["members"][0]["checkpoint_sha256"],
        ]
        body = {
            "prompt": PROMPT,
            "images": [_b64(im) for im in _images()],
            "advantages": True,
            "advantage_of": "ensemble_models_uw",
        }
        response = client.post("/v1/score/group", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    values = np.array([r["ensemble_models_uw"] for r in data["results"]])
    expected = (values - values.mean()) / (values.std() + 1e-6)
    np.testing.assert_allclose(data["advantages"], expected, atol=1e-9)


def test_single_model_export_refuses_a_model_ensemble_advantage(triton_repo):
    provenance = load_provenance(triton_repo)
    settings = Settings(tokenizer_file=str(triton_repo / "tokenizer.json"), head=None)
    app = create_app(settings, OnnxBackend(triton_repo, intra_op_threads=1), provenance)
    body = {"prompt": PROMPT, "images": [_b64(_images()[0])] * 2, "advantages": True}
    with TestClient(app) as client:
        response = client.post(
            "/v1/score/group", json=body | {"advantage_of": "ensemble_models_uw"}
        )
        assert_error(response, 422, "advantage_unavailable", field="advantage_of")
        single = client.post("/v1/score", json=_request()).json()
    assert single["results"][0]["members"] is None
    assert single["provenance"]["members"] is None


def test_gateway_needs_the_right_backend_for_each_member(ensemble_repo, provenance):
    settings = Settings(tokenizer_file=str(ensemble_repo / "tokenizer.json"), head=None)
    first = OnnxBackend(ensemble_repo, intra_op_threads=1)
    with pytest.raises(ValueError, match="1 further ensemble member"):
        create_app(settings, first, provenance)
    # the first model's backend given for the member: its rewards would be labelled as B's
    with pytest.raises(ValueError, match="another model"):
        create_app(settings, first, provenance, members=[first])


def test_the_client_reads_each_models_rewards(in_process):
    result = ScoreResult.from_json(in_process)
    item = result.results[0]
    assert [m.name for m in item.members] == ["shapes-clip", "shapes-clip-b"]
    assert isinstance(item.members[1], MemberReward)
    assert item.members[1].raw == in_process["results"][0]["members"][1]["raw"]
    assert (
        item.members[1].textnorm_scale == in_process["results"][0]["members"][1]["textnorm_scale"]
    )
    assert item.ensemble_models_lambda == in_process["results"][0]["ensemble_models_lambda"]
    expected = [r["ensemble_models_uw"] for r in in_process["results"]]
    np.testing.assert_array_equal(result.rewards("ensemble_models_uw"), expected)


class OtherExport:
    """A member backend whose server carries another export's hash in its configs."""

    def __init__(self, inner: OnnxBackend) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def export_hashes(self, models):
        return {m: "0" * 64 for m in models}


def test_a_member_from_another_export_is_never_scored(ensemble_repo, provenance):
    member = OtherExport(OnnxBackend(ensemble_repo, intra_op_threads=1, member=1))
    with TestClient(_app(ensemble_repo, provenance, member)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert member_model("image_encoder", 1) in ready.json()["reason"]
        assert_error(client.post("/v1/score", json=_request()), 503, "model_mismatch")


# -- the real stack: `serve` with REWARD_MEMBERS, bundled tritonserver -----------------------------
@pytest.mark.slow
def test_serve_with_a_member_answers_as_the_in_process_gateway(
    tmp_path_factory, member_dir, in_process
):
    tmp = tmp_path_factory.mktemp("serve-ensemble")
    members = json.dumps([str(member_dir)])
    with (
        # no head; the shipped calibration, with each model's own c
        serve_stack(tmp, tmp / "repositories", head="", members=members) as stack,
        httpx.Client(base_url=stack.url, headers=AUTH, trust_env=False, timeout=60) as client,
    ):
        assert client.get("/readyz").status_code == 200
        response = client.post("/v1/score", json=_request())
    assert response.status_code == 200, response.text
    served, local = response.json()["results"], in_process["results"]
    for field in ("raw", "textnorm", "ensemble_models_mean", "ensemble_models_uw"):
        np.testing.assert_allclose(
            [r[field] for r in served], [r[field] for r in local], atol=1e-5, err_msg=field
        )
    np.testing.assert_allclose(
        [r["members"][1]["raw"] for r in served],
        [r["members"][1]["raw"] for r in local],
        atol=1e-5,
    )
