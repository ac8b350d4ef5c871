"""The served reward, evaluated through the real stack: `reward-service serve` on loopback with a
calibration file, `reward-service eval --via` against it, and the calibrated c in every result.

One module fixture starts `python -m service.cli serve` (export → bundled tritonserver →
gateway) as tests/test_serving.py does, with `REWARD_TEXTNORM_CALIBRATION_FILE` naming a
calibration whose c differs per prompt kind, so a wrong lookup shows in the numbers.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from typer.testing import CliRunner

from evaluation.commands import app as eval_app
from export.clip_model import checkpoint_hash
from service.gateway.calibration import calibration_document
from service.settings import SHIPPED_MODEL_DIR
from shapes_world.render import render
from shapes_world.scene import Group, Scene
from tests.serve_stack import serve_stack
from tests.test_serving import (
    API_KEY,
    AUTH,
    MAX_ITEMS,
)

pytestmark = pytest.mark.slow

COMPOSITION_C, COMPOSITION_LAMBDA = 20.0, 0.5
SINGLE_C, SINGLE_LAMBDA = 3.0, 2.0
SCENE = Scene(groups=(Group(3, "red", "triangle"),), background="grass")
PROMPT = "three red triangles on a grass background"
COMPOSITION_SCENE = Scene(
    groups=(Group(1, "red", "circle"), Group(1, "blue", "square")), background="sky"
)
COMPOSITION_PROMPT = "a red circle and a blue square on a sky background"


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    document = calibration_document(
        checkpoint_sha256=checkpoint_hash(str(SHIPPED_MODEL_DIR)),
        validation_seed=0,
        grid={"scale": [SINGLE_C, COMPOSITION_C], "ensemble_lambda": [0.5, 2.0]},
        categories={},
        prompt_kinds={
            "composition": {"scale": COMPOSITION_C, "ensemble_lambda": COMPOSITION_LAMBDA},
            "single_object": {"scale": SINGLE_C, "ensemble_lambda": SINGLE_LAMBDA},
        },
    )
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, calibration_file):
    tmp = tmp_path_factory.mktemp("serving-calibrated")
    settings = {"textnorm_calibration_file": str(calibration_file)}
    with serve_stack(tmp, tmp / "repositories", **settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    with httpx.Client(base_url=stack.url, headers=AUTH, trust_env=False, timeout=60) as c:
        yield c


def _b64(scene: Scene, seed: int) -> str:
    buffer = io.BytesIO()
    render(scene, seed).image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _score(client, items, **textnorm) -> dict:
    body = {"items": items, **({"textnorm": textnorm} if textnorm else {})}
    response = client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_eval_via_the_service_equals_the_served_default_rows(stack, calibration_file):
    """`eval --via`: the offline served-default rows equal the rows scored through REST."""
    args = ["eval", "--json", "--via", stack.url, "--api-key", API_KEY]
    args += ["--calibration", str(calibration_file), "--via-batch", str(MAX_ITEMS)]
    args += ["--prompts-per-category", "2", "--images-per-prompt", "12", "--seed", "31"]
    result = CliRunner().invoke(eval_app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    served = [name for name in report if name.startswith("served_")]
    assert len(served) == 6  # raw, textnorm and the four head rewards
    for name in served:
        via = report[name.replace("served_", "via_")]
        for category, value in report[name].items():
            assert abs(value - via[category]) <= 1e-6, (name, category, value, via[category])
    differences = report["via_max_abs_difference"]
    assert differences["auroc"] <= 1e-6
    assert differences["textnorm_scale"] == 0.0  # the service used the c the eval assumed
    for field in ("raw", "textnorm", "textnorm_head", "ensemble_mean", "ensemble_uw"):
        assert differences[field] < 1e-4, differences
    # The served rows really are the calibrated ones: composition's c differs from the others'.
    assert report["served_textnorm"] != report["textnorm_clip"]


def test_results_name_the_calibrated_scale_per_item(client, calibration_file):
    import hashlib

    items = [
        {"image": _b64(SCENE, 1), "prompt": PROMPT},
        {"image": _b64(COMPOSITION_SCENE, 2), "prompt": COMPOSITION_PROMPT},
    ]
    out = _score(client, items)
    single, composition = out["results"]
    assert (single["textnorm_scale"], single["ensemble_lambda"]) == (SINGLE_C, SINGLE_LAMBDA)
    assert (composition["textnorm_scale"], composition["ensemble_lambda"]) == (
        COMPOSITION_C,
        COMPOSITION_LAMBDA,
    )
    assert {r["textnorm_scale_source"] for r in out["results"]} == {"calibrated"}
    used = out["provenance"]["textnorm"]
    assert used["scale_source"] == "calibrated"
    assert used["scale"] is None  # two items, two calibrated c: the block does not pick one
    alone = _score(client, items[1:])["provenance"]["textnorm"]
    assert (alone["scale"], alone["ensemble_lambda"]) == (COMPOSITION_C, COMPOSITION_LAMBDA)
    # Another rule's set was not what `calibrate` chose the prompt kinds' c on: model default.
    counting = _score(client, items[:1], rule="counting")["results"][0]
    assert counting["textnorm_scale_source"] == "default"
    assert counting["textnorm_scale"] not in (SINGLE_C, COMPOSITION_C)
    assert used["calibration_sha256"] == hashlib.sha256(calibration_file.read_bytes()).hexdigest()
    # The calibrated c is what TextNorm was computed with: asking for it explicitly agrees.
    expected = [(SINGLE_C, SINGLE_LAMBDA), (COMPOSITION_C, COMPOSITION_LAMBDA)]
    for item, result, (c, lam) in zip(items, out["results"], expected, strict=True):
        explicit = _score(client, [item], scale=c, ensemble_lambda=lam)["results"][0]
        for field in ("textnorm", "textnorm_head", "ensemble_uw"):
            assert explicit[field] == pytest.approx(result[field], abs=1e-6)
        assert explicit["textnorm_scale_source"] == "request"


def test_request_overrides_and_unknown_sets_use_the_default(client):
    items = [
        {"image": _b64(SCENE, 3), "prompt": PROMPT},
        {
            "image": _b64(SCENE, 4),
            "prompt": PROMPT,
            "contrastive": ["two red triangles on a grass background"],
        },
    ]
    overridden = _score(client, items, scale=1.5)
    assert [r["textnorm_scale"] for r in overridden["results"]] == [1.5, 1.5]
    assert overridden["provenance"]["textnorm"]["scale_source"] == "request"
    assert [r["ensemble_lambda"] for r in overridden["results"]][0] == SINGLE_LAMBDA
    mixed = _score(client, items)
    rule_item, explicit_item = mixed["results"]
    default_c = client.get("/v1/models").json()["models"][0]["textnorm_defaults"]["scale"]
    assert mixed["provenance"]["textnorm"]["scale"] is None  # the items' c differ
    assert rule_item["textnorm_scale_source"] == "calibrated"
    assert (explicit_item["textnorm_scale"], explicit_item["textnorm_scale_source"]) == (
        default_c,
        "default",
    )
    assert mixed["provenance"]["textnorm"]["scale_source"] == "mixed"


def test_models_names_the_calibration_the_gateway_serves(client, stack, calibration_file):
    """/v1/models names the calibration this gateway serves (here the file that overrides the
    export's bundled one) and its c per prompt kind, which the items of that kind get."""
    import hashlib

    from service.gateway.provenance import load_provenance

    served = hashlib.sha256(calibration_file.read_bytes()).hexdigest()
    bundled = load_provenance(stack.repository)["textnorm_calibration"]["sha256"]
    assert bundled != served  # the export bundles the shipped calibration: the file overrides
    body = client.get("/v1/models").json()
    card = body["models"][0]
    assert card["textnorm_calibration_sha256"] == served
    assert body["provenance"]["textnorm"]["calibration_sha256"] == served
    registered = client.post(
        "/v1/prompt-sets",
        json={"prompt": PROMPT, "contrastive": ["two red triangles on a grass background"]},
    )
    assert registered.status_code in (200, 201), registered.text
    assert registered.json()["provenance"]["textnorm"]["calibration_sha256"] == served
    calibrated = card["textnorm_calibrated"]
    assert set(calibrated) == {"composition", "single_object"}
    single = _score(client, [{"image": _b64(SCENE, 5), "prompt": PROMPT}])["results"][0]
    kinds = {k: (v["scale"], v["ensemble_lambda"]) for k, v in calibrated.items()}
    assert kinds["single_object"] == (single["textnorm_scale"], single["ensemble_lambda"])
    assert kinds == {
        "single_object": (SINGLE_C, SINGLE_LAMBDA),
        "composition": (COMPOSITION_C, COMPOSITION_LAMBDA),
    }
