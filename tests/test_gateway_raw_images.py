"""The raw-tensor image form and the `limits` block of GET /v1/models (CONTRACT.md 1-2).

Real gateway app, real backend (ONNX Runtime on the session's exported repository). A raw
tensor is `{"shape": [H, W, 3], "dtype": "uint8", "data": base64 of the H*W*3 bytes}`.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from service.gateway.onnx_backend import OnnxBackend
from service.gateway.provenance import load_provenance
from shapes_world.scene import Group, Scene
from tests.conftest import assert_error
from tests.test_gateway import SHORT_SET, TRUE_PROMPT, b64, gateway, world_image

pytest_plugins = ("tests.conftest_triton",)


@pytest.fixture(scope="module")
def provenance(triton_repo) -> dict:
    return load_provenance(triton_repo)


@pytest.fixture(scope="module")
def onnx_backend(triton_repo) -> OnnxBackend:
    return OnnxBackend(triton_repo, intra_op_threads=1)


@pytest.fixture(scope="module")
def client(provenance, onnx_backend):
    with gateway(provenance, onnx_backend) as c:
        yield c


def raw(pixels: np.ndarray) -> dict:
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    data = base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode()
    return {"shape": list(pixels.shape), "dtype": "uint8", "data": data}


def pixels_of(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.uint8)


SCENES = [
    Scene(groups=(Group(3, "red", "triangle"),), background="grass"),
    Scene(groups=(Group(2, "blue", "circle"),), background="sand"),
]


def test_raw_tensor_and_png_of_the_same_pixels_give_the_same_reward(client):
    square = world_image(SCENES[0], seed=1, size=96)
    wide = world_image(SCENES[1], seed=2, size=96).resize((128, 80))  # non-square
    items_png, items_raw = [], []
    for image in (square, wide):
        common = {"prompt": TRUE_PROMPT, "contrastive": SHORT_SET}
        items_png.append({"image": b64(image), **common})
        items_raw.append({"image": raw(pixels_of(image)), **common})
    png = client.post("/v1/score", json={"items": items_png})
    tensors = client.post("/v1/score", json={"items": items_raw})
    mixed = client.post("/v1/score", json={"items": [items_raw[0], items_png[1]]})
    assert png.status_code == tensors.status_code == mixed.status_code == 200, tensors.text
    for a, b, c in zip(
        png.json()["results"], tensors.json()["results"], mixed.json()["results"], strict=True
    ):
        for key in ("raw", "textnorm"):
            assert abs(a[key] - b[key]) <= 1e-6 and abs(a[key] - c[key]) <= 1e-6, key
    # the group endpoint takes the raw form too, with the same numbers
    group = client.post(
        "/v1/score/group",
        json={
            "prompt": TRUE_PROMPT,
            "images": [raw(pixels_of(square)), raw(pixels_of(wide))],
            "textnorm": {"contrastive": SHORT_SET},
        },
    )
    assert group.status_code == 200, group.text
    for a, b in zip(png.json()["results"], group.json()["results"], strict=True):
        assert abs(a["textnorm"] - b["textnorm"]) <= 1e-6


def _item(image) -> dict:
    return {"items": [{"image": image, "prompt": TRUE_PROMPT, "contrastive": SHORT_SET}]}


GOOD = raw(np.zeros((8, 8, 3), np.uint8))
BYTES_8x8 = 8 * 8 * 3


@pytest.mark.parametrize(
    ("image", "status", "code", "field", "limit"),
    [
        ({**GOOD, "shape": [8, 8]}, 422, "invalid_raw_image", "items[0].image.shape", None),
        ({**GOOD, "shape": [8, 8, 4]}, 422, "invalid_raw_image", "items[0].image.shape", None),
        ({**GOOD, "shape": [8, -8, 3]}, 422, "invalid_raw_image", "items[0].image.shape", None),
        ({**GOOD, "shape": [8, 8.0, 3]}, 422, "invalid_raw_image", "items[0].image.shape", None),
        ({**GOOD, "shape": [True, 8, 3]}, 422, "invalid_raw_image", "items[0].image.shape", None),
        ({**GOOD, "shape": "8,8,3"}, 422, "invalid_raw_image", "items[0].image.shape", None),
        (
            {**GOOD, "dtype": "float32"},
            422,
            "unsupported_raw_dtype",
            "items[0].image.dtype",
            ["uint8"],
        ),
        (
            {**GOOD, "data": base64.b64encode(bytes(BYTES_8x8 - 3)).decode()},
            422,
            "raw_image_size_mismatch",
            "items[0].image.data",
            BYTES_8x8,
        ),
        (
            {**GOOD, "data": base64.b64encode(bytes(BYTES_8x8 + 1)).decode()},
            422,
            "raw_image_size_mismatch",
            "items[0].image.data",
            BYTES_8x8,
        ),
        (
            {**GOOD, "data": "!" * len(GOOD["data"])},
            422,
            "invalid_base64",
            "items[0].image.data",
            BYTES_8x8,
        ),
        (
            {**GOOD, "data": GOOD["data"][:-1]},
            422,
            "invalid_base64",
            "items[0].image.data",
            BYTES_8x8,
        ),
        ({**GOOD, "data": 12}, 422, "invalid_raw_image", "items[0].image.data", BYTES_8x8),
        (
            {**GOOD, "strides": [24, 3, 1]},
            422,
            "invalid_raw_image",
            "items[0].image.strides",
            ["shape", "dtype", "data"],
        ),
        (
            {"shape": [8, 8, 3], "dtype": "uint8"},
            422,
            "invalid_raw_image",
            "items[0].image.data",
            ["shape", "dtype", "data"],
        ),
        (
            {**GOOD, "shape": [2, 100, 3]},
            422,
            "image_aspect_ratio",
            "items[0].image",
            20.0,
        ),
        (12345, 422, "invalid_request", "items[0].image", None),
    ],
    ids=[
        "two-dims",
        "four-channels",
        "negative",
        "float-dim",
        "bool-dim",
        "string-shape",
        "float32",
        "bytes-short",
        "bytes-long",
        "bad-base64",
        "unpadded",
        "data-not-string",
        "extra-key",
        "missing-key",
        "aspect-ratio",
        "not-an-image",
    ],
)
def test_bad_raw_tensors_are_4xx_naming_the_field_and_limit(
    client, image, status, code, field, limit
):
    r = client.post("/v1/score", json=_item(image))
    body = assert_error(r, status, code, field, limit)
    assert "Traceback" not in body["error"]["message"]


def test_raw_pixel_limits_are_checked_from_the_shape_before_the_data(provenance, onnx_backend):
    """Too many pixels: refused from the declared shape, whatever `data` holds (here not even
    valid base64, of a length far from H*W*3), so nothing is decoded or allocated."""
    with gateway(provenance, onnx_backend, max_image_pixels=64 * 64) as c:
        huge = {"shape": [4000, 4000, 3], "dtype": "uint8", "data": "!!"}
        r = c.post("/v1/score", json=_item(huge))
        assert_error(r, 413, "image_too_many_pixels", "items[0].image", 64 * 64)
        ok = c.post("/v1/score", json=_item(raw(np.zeros((64, 64, 3), np.uint8))))
        assert ok.status_code == 200, ok.text
    with gateway(provenance, onnx_backend, max_request_pixels=3 * 32 * 32) as c:
        image = raw(np.full((32, 32, 3), 200, np.uint8))
        item = {"prompt": TRUE_PROMPT, "contrastive": SHORT_SET}
        four = {"items": [{"image": image, **item} for _ in range(4)]}
        r = c.post("/v1/score", json=four)
        assert_error(r, 413, "request_too_many_pixels", "items[3].image", 3 * 32 * 32)
        group = {
            "prompt": TRUE_PROMPT,
            "images": [image] * 4,
            "textnorm": {"contrastive": SHORT_SET},
        }
        r = c.post("/v1/score/group", json=group)
        assert_error(r, 413, "request_too_many_pixels", "images[3]", 3 * 32 * 32)
        bad = {**group, "images": [image, {**image, "dtype": "int8"}]}
        assert_error(
            c.post("/v1/score/group", json=bad), 422, "unsupported_raw_dtype", "images[1].dtype"
        )


def test_models_endpoint_names_the_limits(provenance, onnx_backend):
    settings = {"max_items_per_request": 12, "max_image_pixels": 512 * 512, "max_prompt_chars": 300}
    with gateway(provenance, onnx_backend, **settings) as c:
        r = c.get("/v1/models")
        assert r.status_code == 200, r.text
        body = r.json()
        limits = body["limits"]
        state = c.app_state.settings
        for name in (
            "max_items_per_request",
            "max_image_bytes",
            "max_image_pixels",
            "max_image_aspect_ratio",
            "max_request_pixels",
            "max_request_bytes",
            "max_prompt_chars",
        ):
            assert limits[name] == getattr(state, name), name
        assert limits["max_items_per_request"] == 12 and limits["max_image_pixels"] == 512 * 512
        assert limits["max_contrastive_prompts"] == min(state.max_contrastive_prompts, 32)
        assert set(limits["image_formats"]) == {"png", "jpeg", "webp", "raw"}
        assert limits["raw_dtypes"] == ["uint8"]
        assert body["models"][0]["image_size"] == provenance["model"].get("image_size")
        # the limit it names is the one it enforces
        image = raw(np.zeros((8, 8, 3), np.uint8))
        items = [{"image": image, "prompt": TRUE_PROMPT, "contrastive": SHORT_SET}] * 13
        r = c.post("/v1/score", json={"items": items})
        assert_error(r, 422, "too_many_items", "items", limits["max_items_per_request"])


def test_openapi_documents_the_raw_form(client):
    r = client.get("/openapi.json")
    if r.status_code == 404:
        pytest.skip("docs not exposed")
    spec = r.json()
    item = spec["components"]["schemas"]["ScoreItem"]["properties"]["image"]
    forms = {f.get("type"): f for f in item["anyOf"]}
    assert set(forms) == {"string", "object"}
    rawform = forms["object"]
    assert rawform["additionalProperties"] is False
    assert set(rawform["required"]) == {"shape", "dtype", "data"}
    assert rawform["properties"]["dtype"]["enum"] == ["uint8"]
    assert (
        rawform["properties"]["shape"]["minItems"]
        == rawform["properties"]["shape"]["maxItems"]
        == 3
    )
