"""The REST gateway (service/gateway) end to end, on a real exported repository.

The backend is `OnnxBackend`: ONNX Runtime on the exported repository's own ONNX files (the
files Triton serves). Tests against a running Triton live elsewhere. The repository is exported
once per session from the shipped model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.contrastive import contrastive_prompts
from service.gateway import BackendError, BackendUnavailable, check_bind, create_app
from service.gateway.onnx_backend import OnnxBackend
from service.gateway.provenance import load_provenance
from service.model_contract import CONTEXT_LENGTH, version_dir
from service.settings import SHIPPED_MODEL_DIR, Settings
from service.textnorm import textnorm
from shapes_world.grammar import describe
from shapes_world.perturb import perturb
from shapes_world.render import render
from shapes_world.sampling import random_scene
from shapes_world.scene import Caption, Group, Scene
from tests.conftest import assert_error

TRUE_PROMPT = "three red triangles on a grass background"
TRUE_SCENE = Scene(groups=(Group(3, "red", "triangle"),), background="grass")
SHORT_SET = [
    "two red triangles on a grass background",
    "three blue triangles on a grass background",
    "three red circles on a grass background",
    "three red triangles on a sand background",
]


# -- fixtures and helpers --------------------------------------------------------------------------
def _model_dir() -> Path:
    assert (SHIPPED_MODEL_DIR / "model.safetensors").is_file(), "the shipped model is missing"
    return SHIPPED_MODEL_DIR


pytest_plugins = ("tests.conftest_triton",)  # its session export (no head, max batch 16)


@pytest.fixture(scope="session")
def repo(triton_repo) -> Path:
    """The shipped model exported once per session (shared with the Triton tests)."""
    _model_dir()
    return triton_repo


@pytest.fixture(scope="session")
def provenance(repo) -> dict:
    return load_provenance(repo)


@pytest.fixture(scope="session")
def onnx_backend(repo) -> OnnxBackend:
    return OnnxBackend(repo, intra_op_threads=1)


class RecordingBackend:
    """Passes calls through to a real backend and records what the gateway asked for."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.image_shapes: list[tuple[int, ...]] = []
        self.text_rows: list[int] = []
        self.reward_rows: list[int] = []

    async def encode_images(self, images):
        self.image_shapes.append(images.shape)
        return await self.inner.encode_images(images)

    async def encode_texts(self, ids):
        self.text_rows.append(len(ids))
        return await self.inner.encode_texts(ids)

    async def rewards(self, image_embeds, prompt_embeds, prompt_mask, scale, lam):
        self.reward_rows.append(len(image_embeds))
        return await self.inner.rewards(image_embeds, prompt_embeds, prompt_mask, scale, lam)

    async def ready(self):
        return await self.inner.ready()

    async def export_hashes(self, models):
        return await self.inner.export_hashes(models)

    async def close(self):
        pass


class DownBackend:
    """A backend whose server is gone: every call raises BackendUnavailable."""

    async def encode_images(self, images):
        raise BackendUnavailable("image_encoder: connection refused")

    async def encode_texts(self, ids):
        raise BackendUnavailable("text_encoder: connection refused")

    async def rewards(self, *args):
        raise BackendUnavailable("reward_head: connection refused")

    async def ready(self):
        return False

    async def export_hashes(self, models):
        raise BackendUnavailable("config: connection refused")

    async def close(self):
        pass


class HangingBackend(RecordingBackend):
    """A real backend that hangs on inference (as a SIGSTOPped Triton does): its config and
    identity still answer, its encoders never do."""

    async def encode_images(self, images):
        await asyncio.sleep(3600)

    async def encode_texts(self, ids):
        await asyncio.sleep(3600)

    async def ready(self):
        await asyncio.sleep(3600)


@contextmanager
def gateway(provenance, backend, **overrides):
    app = create_app(Settings(**overrides), backend, provenance)
    with TestClient(app) as client:
        client.app_state = app.state.gateway
        yield client


@pytest.fixture
def client(provenance, onnx_backend):
    with gateway(provenance, onnx_backend) as c:
        yield c


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def world_image(scene: Scene = TRUE_SCENE, seed: int = 0, size: int = 96) -> Image.Image:
    return render(scene, seed, size).image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height but holds almost no data (a bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def metric(client, name: str, labels: dict | None = None) -> float:
    value = client.app_state.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# -- rewards ---------------------------------------------------------------------------------------
def test_rewards_equal_direct_onnx_and_numpy_textnorm(client, repo, provenance):
    """Gateway results = ONNX Runtime on the same files + numpy TextNorm, within 1e-6."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    image_s = ort.InferenceSession(str(version_dir(repo, "image_encoder") / "model.onnx"), options)
    text_s = ort.InferenceSession(str(version_dir(repo, "text_encoder") / "model.onnx"), options)
    tok = Tokenizer.from_file(str(Path(provenance["model"]["source"]) / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")

    def token_ids(prompts):
        ids = np.full((len(prompts), CONTEXT_LENGTH), eos, np.int64)
        for i, p in enumerate(prompts):
            e = tok.encode(p).ids
            ids[i, : len(e)] = e
        return ids

    rng = np.random.default_rng(1)
    scale = 3.0
    items, expected = [], []
    for k in range(6):
        scene = random_scene(rng, 1 + k % 2)
        prompt = describe(Caption.of(scene))
        image = world_image(scene, k, (64, 96, 128)[k % 3])
        explicit = SHORT_SET if k == 5 else None
        contrastive = [p for p in explicit if p != prompt] if explicit else None
        contrastive = contrastive or contrastive_prompts(prompt, "auto")[:32]
        items.append({"image": b64(image), "prompt": prompt, "contrastive": explicit})
        img = image_s.run(None, {"IMAGE": np.asarray(image)[None]})[0][0]
        txt = text_s.run(None, {"INPUT_IDS": token_ids([prompt, *contrastive])})[0]
        sims = txt.astype(np.float64) @ img.astype(np.float64)
        expected.append((sims[0], float(textnorm(sims, scale)), len(contrastive)))
    r = client.post("/v1/score", json={"items": items, "textnorm": {"scale": scale}})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(items)
    for got, (raw, tn, n) in zip(results, expected, strict=True):
        assert abs(got["raw"] - raw) < 1e-6
        assert abs(got["textnorm"] - tn) < 1e-6
        assert got["contrastive_count"] == n
    assert r.json()["provenance"]["textnorm"]["scale"] == scale


def test_true_prompt_beats_one_attribute_off_prompts(client):
    rng = np.random.default_rng(0)
    wins = []
    for k in range(12):
        scene = random_scene(rng, 1)
        image = b64(world_image(scene, k))
        prompts = [describe(Caption.of(scene))]
        for attribute in ("count", "colour", "shape", "background"):
            prompts.append(describe(Caption.of(perturb(scene, attribute, rng))))
        r = client.post(
            "/v1/score", json={"items": [{"image": image, "prompt": p} for p in prompts]}
        )
        assert r.status_code == 200, r.text
        tn = [x["textnorm"] for x in r.json()["results"]]
        assert all(0 < t <= 1 for t in tn)
        wins += [tn[0] > other for other in tn[1:]]
    assert np.mean(wins) >= 0.8, np.mean(wins)


def test_item_order_preserved_with_mixed_sizes(provenance, onnx_backend):
    sizes = [(64, 64), (96, 96), (64, 64), (80, 120), (96, 96), (64, 64)]
    rng = np.random.default_rng(5)
    items = []
    for k, (w, h) in enumerate(sizes):
        scene = random_scene(rng, 1)
        image = world_image(scene, k, max(w, h)).resize((w, h))
        items.append({"image": b64(image), "prompt": describe(Caption.of(scene))})
    recorder = RecordingBackend(onnx_backend)
    with gateway(provenance, recorder) as c:
        together = c.post("/v1/score", json={"items": items}).json()["results"]
        # one encode call per distinct size, each call of one size
        assert sorted(s[1:3] for s in recorder.image_shapes) == [(64, 64), (96, 96), (120, 80)]
        assert sorted(s[0] for s in recorder.image_shapes) == [1, 2, 3]
        assert recorder.reward_rows == [len(items)]  # one rewards call for all items
        for item, result in zip(items, together, strict=True):
            alone = c.post("/v1/score", json={"items": [item]}).json()["results"][0]
            assert abs(alone["raw"] - result["raw"]) < 1e-6
            assert abs(alone["textnorm"] - result["textnorm"]) < 1e-6


def test_unique_prompts_encoded_once_and_cached_across_requests(provenance, onnx_backend):
    recorder = RecordingBackend(onnx_backend)
    image = b64(world_image())
    items = [{"image": image, "prompt": TRUE_PROMPT, "contrastive": SHORT_SET}] * 3
    with gateway(provenance, recorder) as c:
        first = c.post("/v1/score", json={"items": items})
        assert first.status_code == 200
        assert sum(recorder.text_rows) == 1 + len(SHORT_SET)  # once, though used thrice
        assert metric(c, "reward_gateway_embedding_cache_misses_total") == 5
        hits_before = metric(c, "reward_gateway_embedding_cache_hits_total")
        second = c.post("/v1/score", json={"items": items})
        assert sum(recorder.text_rows) == 1 + len(SHORT_SET)  # nothing new encoded
        assert metric(c, "reward_gateway_embedding_cache_hits_total") == hits_before + 5
        # Case and spacing the tokenizer normalises away hit the same entries.
        third = c.post(
            "/v1/score",
            json={
                "items": [
                    {"image": image, "prompt": "  Three RED triangles on a grass  background"}
                ]
            },
        )
        assert third.status_code == 200
        assert first.json()["results"] == second.json()["results"]


def test_long_prompt_refused_or_truncated(provenance, onnx_backend):
    long_prompt = TRUE_PROMPT + ", " + "very " * 80 + "bright"
    item = {"image": b64(world_image()), "prompt": long_prompt, "contrastive": SHORT_SET}
    with gateway(provenance, onnx_backend) as c:
        r = c.post("/v1/score", json={"items": [item]})
        body = assert_error(r, 422, "prompt_too_long", "items[0].prompt", CONTEXT_LENGTH)
        assert "truncate" in body["error"]["message"]
    with gateway(provenance, onnx_backend, truncate_long_prompts=True) as c:
        r = c.post("/v1/score", json={"items": [item]})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["prompt_truncated"] is True
        assert r.json()["provenance"]["tokenizer"]["truncate_long_prompts"] is True
        assert metric(c, "reward_gateway_prompts_truncated_total") == 1


def test_truncation_drops_contrastive_prompts_that_only_differ_past_the_cut(
    provenance, onnx_backend
):
    # Cut to 77 tokens, a contrastive prompt that differs from the prompt only past the cut
    # has the prompt's tokens, so its embedding: kept, it capped TextNorm at 1/|P| for every
    # image (four of them: 0.2 for a perfect match).
    padding = "very " * 75
    image = b64(world_image())
    head = f"{TRUE_PROMPT}, {padding}nice"
    differ_late = [f"{head} sand", f"{head} water", "two red triangles on a grass background"]
    with gateway(provenance, onnx_backend, truncate_long_prompts=True) as c:
        item = {"image": image, "prompt": f"{head} grass", "contrastive": differ_late}
        result = c.post("/v1/score", json={"items": [item]}).json()["results"][0]
        assert result["contrastive_count"] == 1 and result["contrastive_truncated"] == 0
        alone = {**item, "contrastive": differ_late[2:]}
        expected = c.post("/v1/score", json={"items": [alone]}).json()["results"][0]
        assert result["textnorm"] == pytest.approx(expected["textnorm"], abs=1e-6)
        counting = {"image": image, "prompt": f"a photo, {padding}of two cats"}  # count cut off
        r = c.post("/v1/score", json={"items": [counting], "textnorm": {"rule": "counting"}})
        body = assert_error(r, 422, "no_contrastive_prompts", "items[0].prompt", CONTEXT_LENGTH)
        assert "past the cut" in body["error"]["message"]
        # A registered set is cut the same way when registered: its id, hash and calibrated c
        # name the prompts it is scored with (before, the set kept them, scoring dropped them,
        # and its hash no longer matched what was used).
        created = c.post(
            "/v1/prompt-sets", json={"prompt": f"{head} grass", "contrastive": differ_late}
        )
        assert created.status_code == 201, created.text
        assert created.json()["prompt_set"]["contrastive"] == differ_late[2:]
        same = {"prompt": f"{head} grass", "contrastive": differ_late[:2]}
        assert_error(c.post("/v1/prompt-sets", json=same), 422, "no_contrastive_prompts")


def test_missing_contrastive_prompts_422_unless_allowed(client):
    image = b64(world_image())
    items = [{"image": image, "prompt": TRUE_PROMPT}, {"image": image, "prompt": "hello world"}]
    r = client.post("/v1/score", json={"items": items})
    body = assert_error(r, 422, "no_contrastive_prompts", "items[1].prompt")
    assert "'hello world'" in body["error"]["message"]
    # Only the prompt itself in an explicit list: nothing left after cleaning.
    solo = [{"image": image, "prompt": TRUE_PROMPT, "contrastive": [TRUE_PROMPT.upper()]}]
    assert_error(client.post("/v1/score", json={"items": solo}), 422, "no_contrastive_prompts")
    r = client.post("/v1/score", json={"items": items, "textnorm": {"allow_missing": True}})
    assert r.status_code == 200, r.text
    good, missing = r.json()["results"]
    assert good["textnorm"] is not None and good["contrastive_source"] == "rule"
    assert missing["textnorm"] is None and missing["contrastive_count"] == 0
    assert missing["contrastive_source"] == "none" and -1 <= missing["raw"] <= 1


def test_contrastive_prompts_equal_to_the_prompt_after_normalisation_are_dropped(client):
    from service.gateway.errors import ApiError
    from service.gateway.scoring import ContrastivePlan, PlannedItem

    image = b64(world_image())
    prompt = "a caf\u00e9 sign"  # precomposed é
    decomposed = "a cafe\u0301 sign"  # e + combining acute: the same text after NFC
    item = {"image": image, "prompt": prompt, "contrastive": [decomposed, "a blue sign"]}
    r = client.post("/v1/score", json={"items": [item]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["contrastive_count"] == 1
    solo = {**item, "contrastive": [decomposed]}
    assert_error(client.post("/v1/score", json={"items": [solo]}), 422, "no_contrastive_prompts")

    # The scorer itself drops prompts with the true prompt's cache key, and repeats, whatever
    # produced the plan: P never holds the same embedding twice.
    scorer = client.app_state.scorer
    plan = ContrastivePlan(
        ["A CAFE\u0301  sign", "a blue sign", "A Blue sign"], "explicit", field="x"
    )
    planned = [PlannedItem(prompt, plan, "prompt", "images[0]") for _ in range(2)]
    text_plan = scorer.plan_texts(planned)
    for p in planned:
        assert p.plan.prompts == ["a blue sign"]
        assert p.keys == [scorer.tokenizer.normalise(prompt), "a blue sign"]
    assert plan.prompts == ["A CAFE\u0301  sign", "a blue sign", "A Blue sign"]  # not mutated
    assert len(text_plan.texts) == 2
    empty = [PlannedItem(prompt, ContrastivePlan([decomposed], "explicit", field="x"), "p", "i")]
    with pytest.raises(ApiError) as info:
        scorer.plan_texts(empty)
    assert (info.value.code, info.value.field) == ("no_contrastive_prompts", "x")


# -- group endpoint --------------------------------------------------------------------------------
def test_group_scores_and_advantages(provenance, onnx_backend):
    rng = np.random.default_rng(3)
    scenes = [TRUE_SCENE] * 3 + [perturb(TRUE_SCENE, a, rng) for a in ("count", "colour", "shape")]
    images = [b64(world_image(s, seed)) for seed, s in enumerate(scenes)]
    recorder = RecordingBackend(onnx_backend)
    with gateway(provenance, recorder) as c:
        body = {
            "prompt": TRUE_PROMPT,
            "images": images,
            "textnorm": {"contrastive": SHORT_SET},
            "advantages": True,
            "request_id": "grpo-step-7",
        }
        r = c.post("/v1/score/group", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert recorder.text_rows == [1 + len(SHORT_SET)]  # one text encode for the group
        assert out["request_id"] == "grpo-step-7" and out["advantage_of"] == "textnorm"
        adv = np.array(out["advantages"])
        assert len(adv) == len(images)
        assert abs(adv.mean()) < 1e-9 and abs(adv.std() - 1) < 1e-3
        tn = np.array([x["textnorm"] for x in out["results"]])
        assert np.argmax(adv) == np.argmax(tn)
        assert abs(out["reward_mean"] - tn.mean()) < 1e-12
        # the same numbers as scoring the items one by one
        items = [{"image": im, "prompt": TRUE_PROMPT, "contrastive": SHORT_SET} for im in images]
        single = c.post("/v1/score", json={"items": items}).json()["results"]
        assert np.allclose([x["textnorm"] for x in single], tn, atol=1e-6)
        other = {**body, "advantage_of": "raw", "request_id": "grpo-step-7-raw"}  # a new id:
        raw = c.post("/v1/score/group", json=other).json()  # the same id would be a 409
        assert abs(np.mean(raw["advantages"])) < 1e-9 and raw["advantage_of"] == "raw"
        fresh = {k: v for k, v in body.items() if k != "request_id"}
        head = c.post("/v1/score/group", json={**fresh, "advantage_of": "head"})
        assert_error(head, 422, "advantage_unavailable", "advantage_of")
        many = c.post("/v1/score/group", json={**fresh, "images": images * 20})
        assert_error(many, 422, "too_many_items", "images", 64)


# -- prompt sets -----------------------------------------------------------------------------------
def test_prompt_set_register_use_list_delete(provenance, onnx_backend):
    from service.gateway.prompt_set_registry import content_id

    recorder = RecordingBackend(onnx_backend)
    image = b64(world_image())
    with gateway(provenance, recorder) as c:
        r = c.post(
            "/v1/prompt-sets",
            json={"prompt": TRUE_PROMPT, "contrastive": [*SHORT_SET, SHORT_SET[0]]},
        )
        assert r.status_code == 201, r.text
        assert r.json()["created"] and r.json()["pre_encoded"]
        assert r.json()["prompt_set"]["contrastive"] == SHORT_SET  # cleaned: repeat dropped
        set_id = r.json()["prompt_set"]["id"]
        assert set_id == content_id(TRUE_PROMPT, SHORT_SET)  # the same on every replica
        assert sum(recorder.text_rows) == 1 + len(SHORT_SET)
        again = c.post("/v1/prompt-sets", json={"prompt": TRUE_PROMPT, "contrastive": SHORT_SET})
        assert again.status_code == 200 and not again.json()["created"]
        assert again.json()["prompt_set"]["id"] == set_id
        chosen = c.post(
            "/v1/prompt-sets", json={"id": "tri", "prompt": TRUE_PROMPT, "contrastive": SHORT_SET}
        )
        assert_error(chosen, 422, "invalid_request", "id")  # ids are content hashes only
        anon = c.post(
            "/v1/prompt-sets", json={"prompt": "a red circle", "contrastive": ["a blue circle"]}
        )
        assert anon.status_code == 201 and anon.json()["prompt_set"]["id"].startswith("ps_")
        encoded_at_registration = sum(recorder.text_rows)
        assert encoded_at_registration == 1 + len(SHORT_SET) + 2

        listed = c.get("/v1/prompt-sets").json()["prompt_sets"]
        assert [s["id"] for s in listed] == [set_id, anon.json()["prompt_set"]["id"]]
        assert c.get(f"/v1/prompt-sets/{set_id}").json()["prompt_set"]["contrastive_count"] == 4

        by_id = c.post(
            "/v1/score",
            json={
                "items": [{"image": image, "prompt": TRUE_PROMPT}],
                "textnorm": {"prompt_set": set_id},
            },
        )
        assert by_id.status_code == 200, by_id.text
        result = by_id.json()["results"][0]
        assert (result["contrastive_source"], result["prompt_set"]) == ("prompt_set", set_id)
        assert result["contrastive_sha256"].startswith(set_id.removeprefix("ps_"))
        assert sum(recorder.text_rows) == encoded_at_registration  # pre-encoded: no new encode
        explicit = c.post(
            "/v1/score",
            json={"items": [{"image": image, "prompt": TRUE_PROMPT, "contrastive": SHORT_SET}]},
        ).json()["results"][0]
        assert abs(explicit["textnorm"] - result["textnorm"]) < 1e-7
        assert explicit["contrastive_sha256"] == result["contrastive_sha256"]  # same set
        # A set registered through the API applies only where a request names it: another
        # replica, which never saw the registration, must give the same reward.
        unnamed = c.post("/v1/score", json={"items": [{"image": image, "prompt": TRUE_PROMPT}]})
        unnamed_result = unnamed.json()["results"][0]
        assert unnamed_result["contrastive_source"] == "rule"
        assert unnamed_result["contrastive_sha256"] != result["contrastive_sha256"]
        mismatch = c.post(
            "/v1/score",
            json={"items": [{"image": image, "prompt": "a red circle", "prompt_set": set_id}]},
        )
        assert_error(mismatch, 422, "prompt_set_mismatch", "items[0].prompt_set")

        assert c.delete(f"/v1/prompt-sets/{set_id}").json()["deleted"] is True
        assert_error(c.get(f"/v1/prompt-sets/{set_id}"), 404, "prompt_set_not_found", "id")
        assert_error(c.delete(f"/v1/prompt-sets/{set_id}"), 404, "prompt_set_not_found")
        gone = c.post(
            "/v1/score",
            json={
                "items": [{"image": image, "prompt": TRUE_PROMPT}],
                "textnorm": {"prompt_set": set_id},
            },
        )
        assert_error(gone, 422, "unknown_prompt_set", "textnorm.prompt_set")


def test_configured_prompt_sets_apply_on_every_replica(provenance, onnx_backend, tmp_path):
    """Sets from REWARD_PROMPT_SETS_FILE load at start and apply to their prompt without an id:
    two replicas started from the same file give the same rewards and the same set hash."""
    sets_file = tmp_path / "sets.json"
    sets_file.write_text(json.dumps({TRUE_PROMPT: SHORT_SET}))
    image = b64(world_image())
    answers = []
    for _ in range(2):  # two independent gateway processes' worth of state
        with gateway(provenance, onnx_backend, prompt_sets_file=str(sets_file)) as c:
            r = c.post("/v1/score", json={"items": [{"image": image, "prompt": TRUE_PROMPT}]})
            assert r.status_code == 200, r.text
            answers.append(r.json()["results"][0])
            listed = c.get("/v1/prompt-sets").json()["prompt_sets"]
            assert [s["source"] for s in listed] == ["configured"]
    assert answers[0] == answers[1]
    assert answers[0]["contrastive_source"] == "prompt_set"
    assert answers[0]["contrastive_count"] == len(SHORT_SET)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({TRUE_PROMPT: "not a list"}))
    with (
        pytest.raises(ValueError, match="expected an array"),
        gateway(provenance, onnx_backend, prompt_sets_file=str(bad)),
    ):
        pass


def test_prompt_set_import(client):
    document = {
        "two red circles": ["a red circle", "three red circles", "two blue circles"],
        "a green star": ["two green stars", "a green square"],
    }
    r = client.post("/v1/prompt-sets/import", json=document)
    assert r.status_code == 200, r.text
    assert r.json()["created"] == 2 and r.json()["pre_encoded"] is True
    ids = {s["prompt"]: s["id"] for s in r.json()["prompt_sets"]}
    assert set(ids) == set(document) and all(
        s["source"] == "imported" for s in r.json()["prompt_sets"]
    )
    again = client.post("/v1/prompt-sets/import", json=document)
    assert again.json()["created"] == 0  # content-hash ids: importing twice is a no-op
    scene = Scene(groups=(Group(2, "red", "circle"),), background="white")
    item = {"image": b64(world_image(scene)), "prompt": "two red circles"}
    r = client.post("/v1/score", json={"items": [{**item, "prompt_set": ids["two red circles"]}]})
    result = r.json()["results"][0]
    assert result["prompt_set"] == ids["two red circles"] and result["contrastive_count"] == 3
    unnamed = client.post("/v1/score", json={"items": [item]}).json()["results"][0]
    assert unnamed["contrastive_source"] == "rule"  # imported sets apply where named

    bad = client.post("/v1/prompt-sets/import", json={"a red circle": "a blue circle"})
    body = assert_error(bad, 422, "invalid_prompt_sets")
    assert "expected an array" in body["error"]["message"]
    dup = client.post(
        "/v1/prompt-sets/import",
        content=b'{"a red circle": ["a blue circle"], "a red circle": ["two red circles"]}',
        headers={"content-type": "application/json"},
    )
    assert "duplicate" in assert_error(dup, 422, "invalid_prompt_sets")["error"]["message"]
    assert_error(
        client.post("/v1/prompt-sets/import", content=b"{nope", headers={"X-Request-ID": "imp-1"}),
        400,
        "malformed_json",
    )
    too_many = client.post(
        "/v1/prompt-sets/import", json={"a red circle": [f"x{i}" for i in range(33)]}
    )
    assert_error(too_many, 422, "too_many_contrastive_prompts", limit=32)


def test_an_imports_validation_and_tokenisation_run_off_the_event_loop(client, monkeypatch):
    # 10,000 sets of 15 prompts (a 7.6 MB body) took the event loop for 19 s, /healthz
    # included: validation, cache keys and pre-encode tokenisation all ran on it.
    import threading

    from service.gateway import app as app_module
    from service.gateway.scoring import Scorer

    threads: dict[str, set[str]] = {"validate": set(), "keys": set(), "tokenise": set()}

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            threads[name].add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        app_module, "_validated_set", recorded("validate", app_module._validated_set)
    )
    monkeypatch.setattr(Scorer, "cache_keys", recorded("keys", Scorer.cache_keys))
    monkeypatch.setattr(Scorer, "_plan_for", recorded("tokenise", Scorer._plan_for))
    document = {
        f"{n} red circles": [f"{m} red circles" for m in range(1, 6) if m != n] for n in (2, 3)
    }
    r = client.post("/v1/prompt-sets/import", json=document)
    assert r.status_code == 200 and r.json()["created"] == 2 and r.json()["pre_encoded"], r.text
    assert all(names and "MainThread" not in names for names in threads.values()), threads
    # What the worker computed is what the registry and the cache hold.
    state = client.app_state
    for prompt_set in state.registry.all():
        keys = state.scorer.set_cache_keys(prompt_set)
        assert len(keys) == 5 and all(k in state.cache for k in keys)
    assert client.post("/v1/prompt-sets/import", json=document).json()["pre_encoded"] is True
    # A failure in the worker is still the request's own 4xx.
    bad = client.post("/v1/prompt-sets/import", json={"a red circle": ["<|endoftext|> x"]})
    assert_error(bad, 422, "special_token_in_prompt", '["a red circle"][0]')


def test_import_conflict_is_409(client):
    from service.gateway.prompt_set_registry import PromptSet, content_id

    # A set already under the content-hash id an import computes, with other content (a hash
    # collision): a 409 naming the prompt, never a 500.
    taken = content_id("a red circle", ["a blue circle"])
    client.app_state.registry.add(PromptSet(taken, "a green star", ("a green square",), "x"))
    r = client.post("/v1/prompt-sets/import", json={"a red circle": ["a blue circle"]})
    assert (
        taken in assert_error(r, 409, "prompt_set_conflict", '["a red circle"]')["error"]["message"]
    )
    malformed = {"items": [], "textnorm": {"prompt_set": "tri"}}
    assert_error(client.post("/v1/score", json=malformed), 422, "invalid_request")


# -- limits and validation -------------------------------------------------------------------------
def test_too_many_items(provenance, onnx_backend):
    with gateway(provenance, onnx_backend, max_items_per_request=2) as c:
        item = {"image": b64(world_image()), "prompt": TRUE_PROMPT}
        assert_error(
            c.post("/v1/score", json={"items": [item] * 3}), 422, "too_many_items", "items", 2
        )


def test_image_limits_and_formats(provenance, onnx_backend):
    image = world_image()
    good = {"prompt": TRUE_PROMPT, "image": b64(image)}
    with gateway(provenance, onnx_backend, max_image_bytes=24_000, max_image_pixels=128 * 128) as c:

        def post_image(data: str, index: int = 1):
            items = [good, good]
            items[index] = {"prompt": TRUE_PROMPT, "image": data}
            return c.post("/v1/score", json={"items": items})

        pixels = np.random.default_rng(0).integers(0, 256, (100, 100, 3), np.uint8)
        noisy = Image.fromarray(pixels)  # 10 000 pixels (allowed) but ~30 kB as PNG
        assert len(base64.b64decode(b64(noisy))) > 24_000
        assert_error(post_image(b64(noisy)), 413, "image_too_large", "items[1].image", 24_000)
        big = Image.new("RGB", (200, 100))
        assert_error(post_image(b64(big)), 413, "image_too_many_pixels", "items[1].image", 16384)
        # a bomb: the header claims 30000 × 30000; refused before decoding, quickly
        start = time.perf_counter()
        bomb = base64.b64encode(png_header_only(30000, 30000)).decode()
        assert_error(post_image(bomb), 413, "image_too_many_pixels", "items[1].image")
        assert time.perf_counter() - start < 5
        # formats come from the content: GIF/BMP are refused whatever the claim says
        gif = "data:image/png;base64," + b64(image.resize((32, 32)), "GIF")
        body = assert_error(post_image(gif), 415, "unsupported_image_format", "items[1].image")
        assert body["error"]["limit"] == ["PNG", "JPEG", "WEBP"]
        assert_error(
            post_image(b64(image.resize((32, 32)), "BMP"), 0),
            415,
            "unsupported_image_format",
            "items[0].image",
        )
        truncated = base64.b64encode(base64.b64decode(b64(image))[:300]).decode()
        assert_error(post_image(truncated), 422, "invalid_image", "items[1].image")
        assert_error(post_image("not base64!!"), 422, "invalid_base64", "items[1].image")
        # JPEG and WebP (small enough) are accepted, with or without a data-URL claim
        small = image.resize((48, 48))
        for data in (b64(small, "JPEG"), "data:image/png;base64," + b64(small, "WEBP")):
            r = post_image(data)
            assert r.status_code == 200, r.text


def test_image_aspect_ratio_refused_from_the_header(provenance, onnx_backend):
    good = {"prompt": TRUE_PROMPT, "image": b64(world_image())}
    # 1 × 16,000,000: within max_image_pixels and a tiny file, but the encoder resizes the
    # shorter side to its input size (terabytes); refused before decoding, quickly. (A backend
    # that never encodes, so that a regression fails this test instead of exhausting memory.)
    with gateway(provenance, DownBackend()) as c:
        start = time.perf_counter()
        sliver = base64.b64encode(png_header_only(1, 16_000_000)).decode()
        r = c.post("/v1/score", json={"items": [good, {"prompt": TRUE_PROMPT, "image": sliver}]})
        body = assert_error(r, 422, "image_aspect_ratio", "items[1].image", 20.0)
        assert "1×16000000" in body["error"]["message"]
        assert time.perf_counter() - start < 5
    with gateway(provenance, onnx_backend) as c:
        wide = b64(Image.new("RGB", (210, 10)))  # 21:1
        r = c.post("/v1/score/group", json={"prompt": TRUE_PROMPT, "images": [wide]})
        assert_error(r, 422, "image_aspect_ratio", "images[0]", 20.0)
        at_limit = {"prompt": TRUE_PROMPT, "image": b64(Image.new("RGB", (10, 200)))}  # 20:1
        assert c.post("/v1/score", json={"items": [at_limit]}).status_code == 200
    with pytest.raises(ValueError):
        Settings(max_image_aspect_ratio=1.0)


def test_request_pixel_budget_checked_before_decoding(provenance, onnx_backend):
    assert Settings().max_request_pixels == 64 * 1024 * 1024
    image = b64(world_image())  # 96 × 96
    with gateway(provenance, onnx_backend, max_request_pixels=2 * 96 * 96 + 1) as c:
        items = [{"prompt": TRUE_PROMPT, "image": image}] * 3
        body = assert_error(
            c.post("/v1/score", json={"items": items}),
            413,
            "request_too_many_pixels",
            "items[2].image",
            2 * 96 * 96 + 1,
        )
        assert "in all" in body["error"]["message"]
        r = c.post("/v1/score/group", json={"prompt": TRUE_PROMPT, "images": [image] * 3})
        assert_error(r, 413, "request_too_many_pixels", "images[2]")
        # the image that crosses the budget is refused from its header, never decoded
        bomb = base64.b64encode(png_header_only(4000, 4000)).decode()
        r = c.post(
            "/v1/score", json={"items": [*items[:2], {"prompt": TRUE_PROMPT, "image": bomb}]}
        )
        assert_error(r, 413, "request_too_many_pixels", "items[2].image")
        assert c.post("/v1/score", json={"items": items[:2]}).status_code == 200


def test_image_batches_to_the_backend_stay_under_a_gibibyte():
    from service.gateway.backend import MAX_CALL_BYTES, GuardedBackend
    from service.gateway.identity import IdentityCheck
    from service.gateway.metrics import GatewayMetrics

    assert MAX_CALL_BYTES <= 1 << 30

    class Counting:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        async def encode_images(self, images):
            self.calls.append((len(images), images.nbytes))
            return np.ones((len(images), 8), np.float32)

        async def export_hashes(self, models):
            return dict.fromkeys(models, "h")

    inner = Counting()
    identity = IdentityCheck("h", ("image_encoder",))
    guarded = GuardedBackend(
        inner, identity=identity, timeout_s=5, max_batch=64, embed_dim=8, metrics=GatewayMetrics()
    )
    # 64 images of 4096² (3.2 GB) without allocating them: one broadcast pixel
    images = np.broadcast_to(np.zeros((1, 4096, 4096, 3), np.uint8), (64, 4096, 4096, 3))
    out = asyncio.run(guarded.encode_images(images))
    assert out.shape == (64, 8)
    assert sum(n for n, _ in inner.calls) == 64 and len(inner.calls) > 1
    assert all(nbytes <= MAX_CALL_BYTES for _, nbytes in inner.calls), inner.calls
    # small images are still split by max_batch only
    inner.calls.clear()
    asyncio.run(guarded.encode_images(np.zeros((130, 8, 8, 3), np.uint8)))
    assert [n for n, _ in inner.calls] == [64, 64, 2]


def test_request_body_limit(provenance, onnx_backend):
    with gateway(provenance, onnx_backend, max_request_bytes=2000) as c:
        payload = {"items": [{"image": "A" * 3000, "prompt": TRUE_PROMPT}]}
        assert_error(c.post("/v1/score", json=payload), 413, "request_too_large", "body", 2000)
        # a chunked upload (no Content-Length) is cut off while it streams in
        import json

        data = json.dumps(payload).encode()
        chunks = iter([data[i : i + 500] for i in range(0, len(data), 500)])
        r = c.post("/v1/score", content=chunks, headers={"content-type": "application/json"})
        assert_error(r, 413, "request_too_large", "body", 2000)


def test_contrastive_prompts_limit(client):
    image = b64(world_image())
    many = [f"{i} red triangles" for i in range(33)]
    r = client.post(
        "/v1/score",
        json={
            "items": [{"image": image, "prompt": TRUE_PROMPT}],
            "textnorm": {"contrastive": many},
        },
    )
    assert_error(r, 422, "too_many_contrastive_prompts", "textnorm.contrastive", 32)
    r = client.post(
        "/v1/score", json={"items": [{"image": image, "prompt": TRUE_PROMPT, "contrastive": many}]}
    )
    assert_error(r, 422, "too_many_contrastive_prompts", "items[0].contrastive", 32)
    r = client.post(
        "/v1/score",
        json={"items": [{"image": image, "prompt": TRUE_PROMPT, "contrastive": many[:32]}]},
    )
    assert r.status_code == 200 and r.json()["results"][0]["contrastive_count"] == 32


def test_validation_errors_in_the_error_shape(client):
    image = b64(world_image())
    r = client.post("/v1/score", json={"items": [{"image": image}], "request_id": "val-1"})
    body = assert_error(r, 422, "invalid_request", "items[0].prompt")
    assert body["request_id"] == "val-1"
    r = client.post(
        "/v1/score", json={"items": [{"image": image, "prompt": "x"}], "textnorm": {"scale": 0}}
    )
    assert_error(r, 422, "invalid_request", "textnorm.scale")
    r = client.post("/v1/score", json={"items": [{"image": image, "prompt": "x", "colour": 1}]})
    assert_error(r, 422, "invalid_request", "items[0].colour")
    assert_error(client.post("/v1/score", json={"items": []}), 422, "invalid_request", "items")
    r = client.post(
        "/v1/score",
        content=b'{"items": [',
        headers={"content-type": "application/json", "X-Request-ID": "bad-json"},
    )
    assert assert_error(r, 400, "malformed_json")["request_id"] == "bad-json"
    r = client.post("/v1/score", json={"items": [{"image": image, "prompt": "   "}]})
    assert_error(r, 422, "empty_prompt", "items[0].prompt")
    r = client.post("/v1/score", json={"items": [{"image": image, "prompt": "x" * 2001}]})
    assert_error(r, 422, "prompt_too_many_characters", "items[0].prompt", 2000)
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")


# -- request ids, auth, backend failures -----------------------------------------------------------
def test_request_ids_are_echoed(client):
    item = {"image": b64(world_image()), "prompt": TRUE_PROMPT}
    r = client.post(
        "/v1/score",
        json={"items": [item], "request_id": "body-id"},
        headers={"X-Request-ID": "hdr"},
    )
    assert r.json()["request_id"] == "body-id" == r.headers["x-request-id"]
    r = client.post("/v1/score", json={"items": [item]}, headers={"X-Request-ID": "hdr-id"})
    assert r.json()["request_id"] == "hdr-id" == r.headers["x-request-id"]
    r = client.post(
        "/v1/score", json={"items": [item]}, headers={"X-Request-ID": "bad id with spaces"}
    )
    assert len(r.json()["request_id"]) == 32 and r.json()["request_id"] != "bad id with spaces"
    provenance = r.json()["provenance"]
    assert provenance["model"]["checkpoint_sha256"] and len(provenance["tokenizer"]["sha256"]) == 64
    assert provenance["cache_key"] and provenance["exporter"]["versions"]["onnxruntime"]


def test_api_keys(provenance, onnx_backend):
    item = {"image": b64(world_image()), "prompt": TRUE_PROMPT}
    with gateway(provenance, onnx_backend, api_keys=["k-one", "k-two"]) as c:
        r = c.post("/v1/score", json={"items": [item]}, headers={"X-Request-ID": "auth-1"})
        body = assert_error(r, 401, "unauthorized")
        assert body["request_id"] == "auth-1" and r.headers["www-authenticate"] == "Bearer"
        wrong = c.post(
            "/v1/score", json={"items": [item]}, headers={"Authorization": "Bearer nope"}
        )
        assert "invalid" in assert_error(wrong, 401, "unauthorized")["error"]["message"]
        assert_error(
            c.get("/v1/models", headers={"Authorization": "Basic k-one"}), 401, "unauthorized"
        )
        ok = c.post("/v1/score", json={"items": [item]}, headers={"Authorization": "Bearer k-two"})
        assert ok.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200
        assert (
            metric(
                c,
                "reward_gateway_requests_total",
                {"endpoint": "/v1/score", "method": "POST", "status": "401"},
            )
            == 2
        )


def test_check_bind(monkeypatch):
    with pytest.raises(ValueError, match="refusing to bind '0.0.0.0'"):
        check_bind("0.0.0.0", Settings(api_keys=[]))
    with pytest.raises(ValueError):
        check_bind("::", Settings(api_keys=["  "]))  # a blank key is no key
    with pytest.raises(ValueError):
        check_bind("example.com", Settings())
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, Settings())
    check_bind("0.0.0.0", Settings(api_keys=["secret"]))
    monkeypatch.setenv("REWARD_API_KEYS", '["from-env"]')
    check_bind("0.0.0.0", Settings())  # keys from the environment count
    assert "from-env" not in repr(Settings())  # keys never show in a settings dump


def test_backend_unavailable_is_503_with_retry_after(provenance):
    item = {"image": b64(world_image()), "prompt": TRUE_PROMPT}
    with gateway(provenance, DownBackend(), retry_after_s=7) as c:
        r = c.post("/v1/score", json={"items": [item], "request_id": "down-1"})
        body = assert_error(r, 503, "backend_unavailable")
        assert r.headers["retry-after"] == "7" and body["request_id"] == "down-1"
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.headers["retry-after"] == "7"
        assert c.get("/healthz").status_code == 200
        # registering a set still works, it is just not pre-encoded
        reg = c.post("/v1/prompt-sets", json={"prompt": TRUE_PROMPT, "contrastive": SHORT_SET})
        assert reg.status_code == 201 and reg.json()["pre_encoded"] is False


def test_hanging_backend_times_out_504_and_errors_are_502(provenance, onnx_backend):
    item = {"image": b64(world_image()), "prompt": TRUE_PROMPT}
    with gateway(provenance, HangingBackend(onnx_backend), backend_timeout_s=0.3) as c:
        start = time.perf_counter()
        r = c.post("/v1/score", json={"items": [item]})
        assert_error(r, 504, "backend_timeout")  # a timeout is 504, not 503
        assert "retry-after" in r.headers and time.perf_counter() - start < 5
        assert c.get("/readyz").status_code == 503
        assert metric(c, "reward_gateway_refusals_total", {"cause": "backend_timeout"}) == 1

    class BrokenRewards(RecordingBackend):
        async def rewards(self, *args):
            raise BackendError("reward_head: [INTERNAL] onnxruntime failed")

    class WrongShapes(RecordingBackend):
        async def encode_images(self, images):
            return np.zeros((len(images), 3), np.float32)

    for backend in (BrokenRewards(onnx_backend), WrongShapes(onnx_backend)):
        with gateway(provenance, backend) as c:
            r = c.post("/v1/score", json={"items": [item]})
            body = assert_error(r, 502, "backend_error")
            assert "Traceback" not in body["error"]["message"]


# -- models, metrics, OpenAPI ----------------------------------------------------------------------
def test_models_endpoint(client, provenance):
    r = client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["models"]
    assert card["checkpoint_sha256"] == provenance["model"]["checkpoint_sha256"]
    assert card["embed_dim"] == provenance["model"]["embed_dim"] and card["head"] is None
    assert card["rewards"] == ["raw", "textnorm"]
    assert card["textnorm_defaults"]["scale"] == provenance["textnorm_defaults"]["scale"]


def test_metrics_exposed(provenance, onnx_backend):
    image = b64(world_image())
    with gateway(provenance, onnx_backend) as c:
        registered = c.post(
            "/v1/prompt-sets", json={"prompt": "a red circle", "contrastive": ["a blue circle"]}
        )
        set_id = registered.json()["prompt_set"]["id"]
        items = [
            {"image": image, "prompt": TRUE_PROMPT},
            {"image": image, "prompt": TRUE_PROMPT, "contrastive": SHORT_SET},
            {"image": image, "prompt": "a red circle", "prompt_set": set_id},
        ]
        assert c.post("/v1/score", json={"items": items}).status_code == 200
        text = c.get("/metrics").text
        for name in (
            "reward_gateway_requests_total",
            "reward_gateway_request_seconds_bucket",
            "reward_gateway_images_scored_total",
            "reward_gateway_embedding_cache_hits_total",
            "reward_gateway_embedding_cache_misses_total",
            "reward_gateway_backend_seconds_bucket",
            "reward_gateway_textnorm_bucket",
        ):
            assert name in text, name
        for label in ("rule", "explicit", set_id):
            assert metric(c, "reward_gateway_textnorm_count", {"prompt_set": label}) == 1
        assert metric(c, "reward_gateway_images_scored_total", {"endpoint": "/v1/score"}) == 3
        calls = {"call": "encode_images", "outcome": "ok"}
        assert metric(c, "reward_gateway_backend_seconds_count", calls) == 1


def test_openapi_documents_typed_api(client):
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/score",
        "/v1/score/group",
        "/v1/prompt-sets",
        "/v1/prompt-sets/import",
        "/v1/prompt-sets/{set_id}",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    for name in (
        "ScoreRequest",
        "ScoreResponse",
        "GroupRequest",
        "GroupResponse",
        "ErrorResponse",
        "Provenance",
        "TextNormOptions",
    ):
        assert name in schemas, name
    # no keys configured: no security declared (service/gateway/openapi.py)
    assert "HTTPBearer" not in spec["components"].get("securitySchemes", {})
    responses = spec["paths"]["/v1/score"]["post"]["responses"]
    assert {"200", "409", "413", "422", "429", "503", "504"} <= set(responses)


def test_unexpected_errors_are_json_500_without_traceback(provenance, onnx_backend):
    with gateway(provenance, onnx_backend) as c:

        def boom(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        c.app_state.scorer.plan_texts = boom
        item = {"image": b64(world_image()), "prompt": TRUE_PROMPT}
        r = c.post("/v1/score", json={"items": [item], "request_id": "oops-1"})
        body = assert_error(r, 500, "internal_error")
        assert body["request_id"] == "oops-1"
        assert "secret" not in r.text and "Traceback" not in r.text


def test_both_backends_implement_the_protocol(onnx_backend):
    from service.gateway import RewardBackendProtocol
    from service.gateway.triton_backend import RewardBackend

    assert isinstance(onnx_backend, RewardBackendProtocol)
    assert isinstance(RewardBackend("127.0.0.1:1"), RewardBackendProtocol)  # connects lazily


def test_tritons_stub_not_healthy_answer_is_a_503_reported_to_the_watchdog():
    # Triton's own words for a dead or stuck Python-backend stub; `serve` passes the
    # watchdog's report_unhealthy_stub, which restarts Triton after a few (a stuck stub keeps
    # its process, so counting processes cannot see it).
    from tritonclient.utils import InferenceServerException

    from service.gateway.backend import BackendError, StubUnhealthy
    from service.gateway.triton_backend import RewardBackend

    reports: list[int] = []
    backend = RewardBackend("127.0.0.1:1", on_stub_unhealthy=lambda: reports.append(1))

    async def fails(message: str):
        raise InferenceServerException(message, status="StatusCode.INTERNAL")

    unhealthy = "Stub process 'image_encoder_0_0' is not healthy."
    with pytest.raises(StubUnhealthy, match="Python-backend process died"):
        asyncio.run(backend._call("image_encoder", fails, unhealthy))
    assert reports == [1]
    with pytest.raises(BackendError):  # any other failure: not the watchdog's business
        asyncio.run(backend._call("image_encoder", fails, "onnx runtime error: bad shape"))
    assert reports == [1]


def test_client_retries_503_504_and_transport_errors_but_not_502():
    import httpx
    from textnorm_reward_client import RetryPolicy, RewardClient, RewardServiceError

    def counting_client(status: int | None):
        calls = []

        def handler(request):
            if request.url.path == "/v1/models":  # the limits, read once per client
                return httpx.Response(200, json={"models": [{}]})
            calls.append(request)
            if status is None:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(status, json={"error": {"message": f"status {status}"}})

        retry = RetryPolicy(attempts=2, backoff_base_s=0.01)
        transport = httpx.MockTransport(handler)
        return RewardClient("http://gateway.test", transport=transport, retry=retry), calls

    for status, attempts in ((502, 1), (422, 1), (503, 2), (504, 2)):
        trainer, calls = counting_client(status)
        with pytest.raises(RewardServiceError) as info:
            trainer.score([b"png"], "a red circle")
        assert info.value.status == status and len(calls) == attempts, status
    trainer, calls = counting_client(None)
    with pytest.raises(RewardServiceError) as unreachable:  # one error type, cause attached
        trainer.score([b"png"], "a red circle")
    assert unreachable.value.status is None and unreachable.value.code == "unreachable"
    assert isinstance(unreachable.value.__cause__, httpx.ConnectError)
    assert len(calls) == 2


def test_client_registers_a_set_again_on_a_replica_that_lacks_it(provenance, onnx_backend):
    """Two gateway replicas share no state. The client registers a set on one; its connection
    then lands on the other (a pod replaced, a new connection balanced elsewhere), which
    answers `unknown_prompt_set`: the client registers the set there, under the same
    content-hash id, and sends the request again. Both replicas give the same reward."""
    import httpx
    from textnorm_reward_client import RewardClient, RewardServiceError

    class Balancer(httpx.BaseTransport):
        def __init__(self, clients) -> None:
            self.clients, self.replica, self.seen = clients, 0, []

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.seen.append((self.replica, request.url.path))
            answer = self.clients[self.replica]._transport.handle_request(request)
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.read())

    image = base64.b64decode(b64(world_image()))  # PNG bytes, as a trainer sends them
    with gateway(provenance, onnx_backend) as a, gateway(provenance, onnx_backend) as b:
        balancer = Balancer([a, b])
        with RewardClient("http://testserver", transport=balancer) as client:
            set_id = client.register_prompt_set(TRUE_PROMPT, SHORT_SET)
            on_a = client.score([image], TRUE_PROMPT, textnorm={"prompt_set": set_id})
            balancer.replica = 1
            on_b = client.score([image], TRUE_PROMPT, textnorm={"prompt_set": set_id})
        assert balancer.seen == [
            (0, "/v1/prompt-sets"),
            (0, "/v1/models"),  # the service's limits, read once
            (0, "/v1/score"),
            (1, "/v1/score"),  # unknown_prompt_set on b
            (1, "/v1/prompt-sets"),  # registered there
            (1, "/v1/score"),
        ]
        for replica in (a, b):
            listed = replica.get("/v1/prompt-sets").json()["prompt_sets"]
            assert [s["id"] for s in listed] == [set_id]
        plain = RewardClient("http://testserver", transport=balancer, attempts=1)
        other = b.post(  # a set the client never registered: the error reaches the caller
            "/v1/prompt-sets", json={"prompt": TRUE_PROMPT, "contrastive": ["two red circles"]}
        ).json()["prompt_set"]["id"]
        b.delete(f"/v1/prompt-sets/{other}")
        with pytest.raises(RewardServiceError) as raised:
            plain.score([image], TRUE_PROMPT, textnorm={"prompt_set": other})
        assert raised.value.error["code"] == "unknown_prompt_set"
        plain.close()
    first, second = on_a["results"][0], on_b["results"][0]
    assert first["prompt_set"] == second["prompt_set"] == set_id
    assert abs(first["textnorm"] - second["textnorm"]) < 1e-7
    assert first["contrastive_sha256"] == second["contrastive_sha256"]


def test_a_rule_builds_each_prompt_s_set_once_and_hands_out_copies(client):
    from service.gateway.schemas import TextNormOptions

    scorer = client.app_state.scorer
    scorer._rule_prompts.cache_clear()
    prompt = "three red circles on a blue background"
    want = contrastive_prompts(prompt, "counting")
    first = scorer.plan_contrastive(prompt, "prompt", TextNormOptions(rule="counting"))
    first.prompts.append("mutated by a caller")
    again = scorer.plan_contrastive(prompt, "prompt", TextNormOptions(rule="counting"))
    assert again.prompts == want[: scorer.max_contrastive] and again.rule == "counting"
    other = scorer.plan_contrastive(prompt, "prompt", TextNormOptions(rule="attributes"))
    assert other.prompts == contrastive_prompts(prompt, "attributes")[: scorer.max_contrastive]
    info = scorer._rule_prompts.cache_info()
    assert (info.hits, info.misses) == (1, 2)


# -- found by review 2026-12-07: bounded work per request, paths under a root path ---------------
def test_a_prompt_over_the_context_is_refused_before_any_rule_runs(provenance, onnx_backend):
    """A 2,000-character prompt of repeated attribute words made thousands of contrastive
    prompts (≈ 5 MB), cached whole per prompt, before the 77-token check refused it: memory
    grew ~340 MB per request. Now: 422 first, nothing built or cached; and a rule's cached
    output is the cut list."""
    long_prompt = ("two red red red red red red red circle " * 60)[:1990]
    with gateway(provenance, onnx_backend) as c:
        scorer = c.app_state.scorer
        items = [{"image": b64(world_image()), "prompt": f"{k} {long_prompt}"} for k in range(3)]
        r = c.post("/v1/score", json={"items": items})
        assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long"
        assert r.json()["error"]["field"] == "items[0].prompt"
        assert scorer._rule_prompts.cache_info().currsize == 0
        ok = c.post("/v1/score", json={"items": [{"image": b64(world_image()),
                                                   "prompt": TRUE_PROMPT}]})  # fmt: skip
        assert ok.status_code == 200, ok.text
        cached = scorer._rule_prompts(TRUE_PROMPT, "auto")
        assert 0 < len(cached) <= scorer.max_contrastive


def test_a_list_past_any_item_limit_is_refused_before_its_elements_are_validated(
    provenance, onnx_backend
):
    """Two million tiny elements (4 MB of JSON) took 23 s of the event loop and 3.7 GB before
    the count check; the schema's bound refuses them with one error, the settings' limit
    still names its own value below it."""
    from service.settings import ITEMS_BOUND

    with gateway(provenance, onnx_backend) as c:
        body = b'{"prompt":"a red circle","images":[' + b",".join([b"0"] * 2_000_000) + b"]}"
        r = c.post("/v1/score/group", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["field"] == "images" and f"at most {ITEMS_BOUND}" in error["message"]
        assert len(error["details"]) == 1
        over = c.post("/v1/score", json={"items": [{"image": "x", "prompt": "p"}] * 65})
        assert over.json()["error"]["code"] == "too_many_items"  # the settings' 64
    with pytest.raises(ValueError, match="less than or equal to 4096"):
        Settings(max_items_per_request=ITEMS_BOUND + 1)


def test_auth_and_admission_hold_under_a_root_path(provenance, onnx_backend):
    """Behind a proxy serving the gateway under /api (uvicorn --root-path), the raw path is
    /api/v1/...: auth, admission and rate limits checked it and let every request through."""
    app = create_app(Settings(api_keys=["k-one"]), onnx_backend, provenance)
    with TestClient(app, root_path="/api") as c:
        assert c.get("/api/v1/models").status_code == 401
        created = c.post("/api/v1/prompt-sets", json={"prompt": TRUE_PROMPT,
                                                      "contrastive": SHORT_SET})  # fmt: skip
        assert created.status_code == 401
        keyed = c.get("/api/v1/models", headers={"Authorization": "Bearer k-one"})
        assert keyed.status_code == 200
        assert c.get("/api/healthz").status_code == 200  # not under /v1: open
        wrong = c.put("/api/v1/prompt-sets", headers={"Authorization": "Bearer k-one"})
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, POST"


def test_configured_prompt_sets_are_not_the_apis_to_delete(provenance, onnx_backend, tmp_path):
    sets_file = tmp_path / "sets.json"
    sets_file.write_text(json.dumps({TRUE_PROMPT: SHORT_SET}))
    with gateway(provenance, onnx_backend, prompt_sets_file=str(sets_file)) as c:
        (listed,) = c.get("/v1/prompt-sets").json()["prompt_sets"]
        r = c.delete(f"/v1/prompt-sets/{listed['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "prompt_set_configured"
        assert [s["id"] for s in c.get("/v1/prompt-sets").json()["prompt_sets"]] == [listed["id"]]


def test_import_wants_json_and_a_negative_content_length_is_a_400(provenance, onnx_backend):
    with gateway(provenance, onnx_backend) as c:
        r = c.post("/v1/prompt-sets/import", content=json.dumps({TRUE_PROMPT: SHORT_SET}),
                   headers={"content-type": "text/plain"})  # fmt: skip
        assert r.status_code == 415 and r.json()["error"]["field"] == "Content-Type"
        too_many = {f"{k} {TRUE_PROMPT}": SHORT_SET for k in range(10_001)}
        full = c.post("/v1/prompt-sets/import", json=too_many)
        assert full.status_code == 422 and full.json()["error"]["code"] == "registry_full"

        async def asgi_post(length: str) -> int:
            sent: list[dict] = []

            async def receive():
                return {"type": "http.request", "body": b"{}", "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/score", "root_path": "",
                     "headers": [(b"content-length", length.encode()),
                                 (b"content-type", b"application/json")],
                     "query_string": b"", "scheme": "http", "server": ("t", 80),
                     "client": ("127.0.0.1", 1), "http_version": "1.1"}  # fmt: skip
            await c.app(scope, receive, send)
            return sent[0]["status"]

        assert c.portal.call(asgi_post, "-100000000") == 400
        assert c.app_state.admission.in_use["body_bytes"] == 0


def test_a_request_whose_decode_is_queued_at_shutdown_is_answered(provenance, onnx_backend):
    # The lifespan cancelled the decode pool's queued work: a forced shutdown (a second
    # Ctrl-C) answered those requests with a plain-text 500, which clients do not retry.
    import threading

    import httpx

    async def run():
        app = create_app(Settings(decode_threads=1), onnx_backend, provenance)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        gate = threading.Event()
        app.state.gateway.pool.submit(gate.wait)  # the one decode thread is busy
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            item = {"image": b64(world_image()), "prompt": TRUE_PROMPT}
            request = asyncio.create_task(client.post("/v1/score", json={"items": [item]}))
            await asyncio.sleep(0.3)
            await lifespan.__aexit__(None, None, None)  # shutdown, the decode still queued
            gate.set()
            return await asyncio.wait_for(request, 30)

    r = asyncio.run(run())
    assert r.status_code == 200 and r.json()["results"][0]["raw"] is not None, r.text
