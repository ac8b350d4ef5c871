"""Calibrated TextNorm scales: `reward-service calibrate` and the gateway's lookup.

The command runs on a small validation benchmark with the shipped model (torch, in process);
the lookup is the torch-free module the gateway uses.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from evaluation.calibrate import SCALE_GRID
from evaluation.commands import app
from service.gateway.calibration import (
    Calibration,
    calibration_document,
    choose_scale,
    load_calibration,
    parse_calibration,
    prompt_kind,
    summarise_sources,
)
from service.gateway.prompt_set_registry import contrastive_set_sha256
from service.settings import SHIPPED_MODEL_DIR, get_settings

COMPOSITION = "a red circle and a blue square on a grass background"
SINGLE = "three red triangles on a grass background"


def _doc(**kinds) -> dict:
    return calibration_document(
        checkpoint_sha256="abc",
        validation_seed=1,
        grid={"scale": [1.0, 10.0], "ensemble_lambda": [0.0, 1.0]},
        categories={"counting": {"scale": 10.0, "ensemble_lambda": 1.0}},
        prompt_kinds=kinds,
        prompt_sets={
            contrastive_set_sha256(SINGLE, ["two red triangles on a grass background"]): {
                "scale": 0.1,
                "ensemble_lambda": 2.0,
            }
        },
    )


@pytest.fixture
def calibration() -> Calibration:
    return parse_calibration(
        _doc(
            composition={"scale": 3.0, "ensemble_lambda": 0.5},
            single_object={"scale": 10.0, "ensemble_lambda": 2.0},
        )
    )


def test_prompt_kinds_follow_the_auto_rule():
    assert prompt_kind(COMPOSITION) == "composition"
    assert prompt_kind("an apple and a dog") == "composition"
    assert prompt_kind(SINGLE) == "single_object"
    assert prompt_kind("a photo of six cats") == "single_object"


def test_lookup_order_request_then_set_then_kind_then_default(calibration):
    def pick(prompt, sha=None, source="rule", scale=None, lam=None):
        return choose_scale(calibration, prompt, sha, source, scale, lam, 5.0, 1.0)

    assert pick(COMPOSITION) == pick(COMPOSITION, source="rule")
    assert (pick(COMPOSITION).scale, pick(COMPOSITION).ensemble_lambda) == (3.0, 0.5)
    assert pick(COMPOSITION).source == "calibrated"
    assert (pick(SINGLE).scale, pick(SINGLE).source) == (10.0, "calibrated")
    # An explicit set the calibration does not know: the model's default, not the kind's c.
    assert (pick(SINGLE, source="explicit").scale, pick(SINGLE, source="explicit").source) == (
        5.0,
        "default",
    )
    # The exact set the calibration names wins over the prompt's kind, whatever its source.
    known = contrastive_set_sha256(SINGLE, ["two red triangles on a grass background"])
    assert pick(SINGLE, known, source="prompt_set").scale == 0.1
    # The request overrides c; λ not set by the request still comes from the lookup.
    chosen = pick(COMPOSITION, scale=1.5)
    assert (chosen.scale, chosen.ensemble_lambda, chosen.source) == (1.5, 0.5, "request")
    assert pick(COMPOSITION, lam=0.0).ensemble_lambda == 0.0
    no_file = choose_scale(None, COMPOSITION, None, "rule", None, None, 5.0, 1.0)
    assert (no_file.scale, no_file.ensemble_lambda, no_file.source) == (5.0, 1.0, "default")


def test_summarise_sources():
    assert summarise_sources(["calibrated", "calibrated", None]) == "calibrated"
    assert summarise_sources(["calibrated", "default"]) == "mixed"
    assert summarise_sources([None]) is None


MEMBER_B, MEMBER_C = "b" * 64, "c" * 64  # member checkpoints: B calibrated, C not


def test_each_member_gets_its_own_c_and_the_ensemble_its_models_lambda():
    known = contrastive_set_sha256(SINGLE, ["two red triangles on a grass background"])
    doc = _doc(
        composition={"scale": 3.0, "ensemble_lambda": 0.5, "models_lambda": 2.0},
        single_object={"scale": 10.0, "ensemble_lambda": 2.0},  # no models_lambda
    )
    doc["members"] = {
        MEMBER_B: {
            "name": "b",
            "prompt_kinds": {"composition": {"scale": 20.0}, "single_object": {"scale": 0.1}},
            "prompt_sets": {known: {"scale": 7.0}},
        }
    }
    calibration = parse_calibration(doc)

    def pick(prompt, sha=None, source="rule", scale=None, lam=None):
        members = (MEMBER_B, MEMBER_C)
        return choose_scale(calibration, prompt, sha, source, scale, lam, 5.0, 1.0, members=members)

    chosen = pick(COMPOSITION)
    # B its own c; C (no entry) the item's c, as every model had before per-model calibration
    assert (chosen.scale, chosen.member_scales) == (3.0, (20.0, 3.0))
    assert (chosen.ensemble_lambda, chosen.models_lambda) == (0.5, 2.0)
    single = pick(SINGLE)
    assert single.member_scales == (0.1, 10.0)
    assert single.models_lambda == 2.0  # no models_lambda: the item's λ
    assert pick(SINGLE, known, source="prompt_set").member_scales == (7.0, 0.1)
    # an explicit set nobody calibrated: every model at the default
    assert pick(SINGLE, source="explicit").member_scales == (5.0, 5.0)
    # the request's c and λ apply to every model and to both ensembles
    asked = pick(COMPOSITION, scale=1.5, lam=0.25)
    assert (asked.member_scales, asked.ensemble_lambda, asked.models_lambda) == (
        (1.5, 1.5),
        0.25,
        0.25,
    )
    # a single-model export asks for no member: nothing changes for it
    alone = choose_scale(calibration, COMPOSITION, None, "rule", None, None, 5.0, 1.0)
    assert (alone.member_scales, alone.models_lambda) == ((), None)
    # a calibration without members: every model at the item's c and λ
    plain = parse_calibration(_doc(composition={"scale": 3.0, "ensemble_lambda": 0.5}))
    shared = choose_scale(plain, COMPOSITION, None, "rule", None, None, 5.0, 1.0, members=["b"])
    assert (shared.member_scales, shared.models_lambda) == ((3.0,), 0.5)


B = "b" * 64
B12 = "b" * 12


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([], "members must be an object"),
        ({"shapes-clip-b": {}}, "members key 'shapes-clip-b' is not a checkpoint sha256"),
        ({B: []}, rf"members\.{B12}: must be an object"),
        ({B: {"prompt_kind": {}}}, rf"members\.{B12}: unknown key 'prompt_kind'"),
        ({B: {"prompt_kinds": 5}}, rf"members\.{B12}\.prompt_kinds: must be an object"),
        ({B: {"prompt_kinds": 0}}, rf"members\.{B12}\.prompt_kinds: must be an object"),
        ({B: {"prompt_kinds": "composition"}}, r"prompt_kinds: must be an object"),
        ({B: {"prompt_kinds": {"counting": {"scale": 1}}}}, "unknown prompt kind 'counting'"),
        ({B: {"prompt_kinds": {"composition": {}}}}, "composition: expected an object with"),
        (
            {B: {"prompt_sets": {"x": {"scale": 1e39}}}},
            rf"members\.{B12}\.prompt_sets\.x\.scale: must be > 0 and <= 10000",
        ),
        ({B: {"categories": {"color": {"scale": "big"}}}}, "must be a number"),
        ({B: {"categories": {"color": {"scale": 10**400}}}}, "within float range"),
    ],
)
def test_bad_member_sections_name_the_problem(members, message):
    doc = _doc(composition={"scale": 3.0, "ensemble_lambda": 0.5})
    doc["members"] = members
    with pytest.raises(ValueError, match=message):
        parse_calibration(doc)
    doc = _doc(composition={"scale": 3.0, "ensemble_lambda": 0.5, "models_lambda": -1})
    with pytest.raises(ValueError, match="composition.models_lambda: must be >= 0"):
        parse_calibration(doc)


@pytest.mark.parametrize("seed", ["1", 1.0, True])
def test_a_validation_seed_that_is_not_an_integer_is_refused(seed):
    """eval refuses in-sample seeds by comparing with it: a seed it cannot read would pass."""
    doc = _doc(composition={"scale": 3.0, "ensemble_lambda": 0.5})
    doc["validation_seed"] = seed
    with pytest.raises(ValueError, match="validation_seed must be an integer"):
        parse_calibration(doc)


def test_a_member_is_calibrated_only_with_a_c_for_every_prompt_kind():
    doc = _doc(
        composition={"scale": 3.0, "ensemble_lambda": 0.5},
        single_object={"scale": 10.0, "ensemble_lambda": 2.0},
    )
    doc["members"] = {
        B: {"prompt_kinds": {"composition": {"scale": 1.0}, "single_object": {"scale": 2.0}}},
        "c" * 64: {"name": "named only"},
        "d" * 64: {"prompt_kinds": {"composition": {"scale": 1.0}}},
    }
    calibration = parse_calibration(doc)
    assert calibration.calibrates_member(B)
    assert not calibration.calibrates_member("c" * 64)
    assert not calibration.calibrates_member("d" * 64)
    assert not calibration.calibrates_member("e" * 64)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "expected a JSON object"),
        ({"format": 9}, "format 9 is not 1"),
        ({"format": 1, "prompt_kinds": {"counting": {}}}, "unknown prompt kind 'counting'"),
        (
            {"format": 1, "prompt_kinds": {"composition": {"scale": 1}}},
            "prompt_kinds.composition: missing ensemble_lambda",
        ),
        (
            {"format": 1, "prompt_kinds": {"composition": {"scale": 0, "ensemble_lambda": 1}}},
            "prompt_kinds.composition.scale: must be > 0 and <= 10000",
        ),
        (  # past float32's range the head's scale was inf, and TextNorm NaN
            {"format": 1, "prompt_kinds": {"composition": {"scale": 1e39, "ensemble_lambda": 1}}},
            "prompt_kinds.composition.scale: must be > 0 and <= 10000, got 1e",
        ),
        (
            {"format": 1, "prompt_sets": {"x": {"scale": 1, "ensemble_lambda": -1}}},
            "prompt_sets.x.ensemble_lambda: must be >= 0 and <= 10000",
        ),
    ],
)
def test_bad_calibration_documents_name_the_problem(doc, message):
    with pytest.raises(ValueError, match=message):
        parse_calibration(doc)


def test_load_refuses_another_checkpoint_and_bad_json(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_doc()))
    assert load_calibration(path, "abc").checkpoint_sha256 == "abc"
    with pytest.raises(ValueError, match="calibrated for checkpoint abc, but the served model"):
        load_calibration(path, "def")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON calibration file"):
        load_calibration(path)
    with pytest.raises(ValueError, match="cannot read the calibration file"):
        load_calibration(tmp_path / "missing.json")


def test_the_gateway_takes_the_calibration_the_export_bundles_unless_a_file_is_set(tmp_path):
    import hashlib

    from service.gateway.calibration import gateway_calibration

    document = _doc(single_object={"scale": 10.0, "ensemble_lambda": 2.0})
    raw = json.dumps(document).encode()
    bundled = {"file": "calibration.json", "sha256": hashlib.sha256(raw).hexdigest()}
    provenance = {"textnorm_calibration": {**bundled, "document": document}}
    got = gateway_calibration(None, "abc", provenance)
    assert got.sha256 == bundled["sha256"] and got.prompt_kinds["single_object"].scale == 10.0
    assert gateway_calibration(None, "abc", {"textnorm_calibration": None}) is None
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_doc(single_object={"scale": 1.0, "ensemble_lambda": 0.0})))
    assert (
        gateway_calibration(str(other), "abc", provenance).prompt_kinds["single_object"].scale
        == 1.0
    )  # the setting overrides the bundled one
    with pytest.raises(ValueError, match="bundled calibration is for another checkpoint"):
        gateway_calibration(None, "def", provenance)
    with pytest.raises(ValueError, match="unusable textnorm_calibration"):
        gateway_calibration(None, "abc", {"textnorm_calibration": {"sha256": "x"}})


# -- the command ----------------------------------------------------------------------------------
SMALL = ["--prompts-per-category", "2", "--images-per-prompt", "16", "--seed", "4242"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    """`calibrate` on a small validation benchmark, with a prompt-set file for two prompts."""
    from shapes_world.benchmark import build_benchmark

    tmp = tmp_path_factory.mktemp("calibrate")
    bench = build_benchmark(seed=4242, prompts_per_category=2, images_per_prompt=16)
    composition = [p.prompt for p in bench if p.category == "composition"]
    from service.contrastive import contrastive_prompts

    sets = {p: contrastive_prompts(p, "composition") for p in composition}  # the paper's sets
    sets_file = tmp / "sets.json"
    sets_file.write_text(json.dumps(sets))
    out = tmp / "cal.json"
    args = ["calibrate", "--out", str(out), "--prompt-sets", str(sets_file), *SMALL]
    result = CliRunner().invoke(app, [*args, "--member", "shapes-clip-b"])
    assert result.exit_code == 0, result.output
    return {"doc": json.loads(out.read_text()), "path": out, "sets": sets, "output": result.output}


def test_calibrate_picks_the_best_grid_value_per_group(calibrated):
    doc = calibrated["doc"]
    assert doc["validation_seed"] == 4242 and doc["grid"]["scale"] == list(SCALE_GRID)
    groups = [*doc["categories"].values(), *doc["prompt_kinds"].values()]
    assert set(doc["categories"]) == {"counting", "color", "background", "object", "composition"}
    assert set(doc["prompt_kinds"]) == {"composition", "single_object"}
    for choice in groups:
        by_scale = {float(k): v for k, v in choice["auroc_by_scale"].items()}
        assert by_scale[choice["scale"]] == max(by_scale.values())
        by_lambda = {float(k): v for k, v in choice["auroc_by_lambda"].items()}
        assert by_lambda[choice["ensemble_lambda"]] == max(by_lambda.values())
    assert doc["prompt_kinds"]["single_object"]["prompts"] == 8  # four categories pooled


def test_calibrate_member_chooses_its_own_c_and_the_models_lambda(calibrated):
    """`--member`: B's c per group from B's own TextNorm (recomputed here for one group), the
    models' λ per group of the first model's entries, and the gateway reads them back."""
    from evaluation.calibrate import _auroc
    from evaluation.evaluate import category_contrastive, score_benchmark
    from export.clip_model import checkpoint_hash, load_clip
    from models import SHIPPED_MEMBER_DIR
    from service.textnorm import textnorm
    from shapes_world.benchmark import build_benchmark

    doc = calibrated["doc"]
    (sha,) = doc["members"]
    assert sha == checkpoint_hash(SHIPPED_MEMBER_DIR)
    member = doc["members"][sha]
    assert member["name"] == "shapes-clip-b"
    assert set(member["categories"]) == set(doc["categories"])
    assert set(member["prompt_kinds"]) == set(doc["prompt_kinds"])
    assert set(member["prompt_sets"]) == set(doc["prompt_sets"])
    for part in ("categories", "prompt_kinds"):
        for name, choice in member[part].items():
            by_scale = {float(k): v for k, v in choice["auroc_by_scale"].items()}
            assert by_scale[choice["scale"]] == max(by_scale.values())
            first = doc[part][name]
            by_lambda = {float(k): v for k, v in first["auroc_by_models_lambda"].items()}
            assert by_lambda[first["models_lambda"]] == max(by_lambda.values())
    # B's numbers are B's: its counting AUROC at each c, recomputed from B's own scores
    bench = build_benchmark(seed=4242, prompts_per_category=2, images_per_prompt=16)
    counting = [p for p in bench if p.category == "counting"]
    scored = score_benchmark(load_clip(SHIPPED_MEMBER_DIR), counting, None, category_contrastive)
    for c, value in member["categories"]["counting"]["auroc_by_scale"].items():
        want = _auroc(scored, lambda p, c=float(c): textnorm(p.clip.astype("float64"), c))
        assert value == pytest.approx(want, abs=1e-6), c
    assert (
        member["categories"]["counting"]["auroc_by_scale"]
        != (doc["categories"]["counting"]["auroc_by_scale"])
    )
    calibration = load_calibration(calibrated["path"])
    chosen = calibration.choose(SINGLE, None, None, None, 5.0, 1.0, members=[sha])
    assert chosen.member_scales == (member["prompt_kinds"]["single_object"]["scale"],)
    assert chosen.models_lambda == doc["prompt_kinds"]["single_object"]["models_lambda"]
    assert "shapes-clip-b c = " in calibrated["output"]


def test_calibrate_stores_each_prompt_sets_scale_by_its_content_hash(calibrated):
    doc, sets = calibrated["doc"], calibrated["sets"]
    expected = {contrastive_set_sha256(p, s) for p, s in sets.items()}
    assert set(doc["prompt_sets"]) == expected
    for entry in doc["prompt_sets"].values():
        assert entry["prompt"] in sets and entry["category"] == "composition"
    # What the gateway reads back: the file's own sets are found by hash.
    calibration = load_calibration(calibrated["path"])
    prompt, contrastive = next(iter(sets.items()))
    sha = contrastive_set_sha256(prompt, contrastive)
    chosen = calibration.choose(prompt, sha, None, None, 5.0, 1.0, source="prompt_set")
    assert chosen.scale == doc["prompt_sets"][sha]["scale"] and chosen.source == "calibrated"


def test_calibrate_refuses_the_held_out_seed(tmp_path, monkeypatch):
    seed = str(get_settings().benchmark_seed)
    result = CliRunner().invoke(
        app, ["calibrate", "--out", str(tmp_path / "c.json"), "--seed", seed, "--no-head"]
    )
    assert result.exit_code == 2
    assert "held-out benchmark seed" in result.output
    assert not (tmp_path / "c.json").exists()
    # with the setting moved, the README's held-out seed is still not a validation seed
    from service.settings import Settings

    default = str(Settings.model_fields["benchmark_seed"].default)
    monkeypatch.setenv("REWARD_BENCHMARK_SEED", "1")
    get_settings.cache_clear()
    try:
        assert get_settings().benchmark_seed == 1
        moved = CliRunner().invoke(
            app, ["calibrate", "--out", str(tmp_path / "c.json"), "--seed", default, "--no-head"]
        )
    finally:
        monkeypatch.delenv("REWARD_BENCHMARK_SEED")
        get_settings.cache_clear()
    assert moved.exit_code == 2 and "held-out benchmark seed" in moved.output


def test_calibrate_refuses_a_prompt_set_file_with_no_validation_prompt(tmp_path):
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps({"a purple star": ["two purple stars"]}))
    args = ["calibrate", "--out", str(tmp_path / "c.json"), "--prompt-sets", str(sets), *SMALL]
    result = CliRunner().invoke(app, [*args, "--no-head"])
    assert result.exit_code == 2
    assert "none of its prompts is a validation prompt" in result.output


def test_eval_uses_the_calibrated_scale_per_category(calibrated):
    """The per-category rows with --calibration equal evaluate() at each category's own c."""
    from evaluation.evaluate import EvalSettings, evaluate, score_benchmark
    from export.clip_model import load_clip
    from shapes_world.benchmark import build_benchmark

    args = ["eval", "--json", "--no-head", "--calibration", str(calibrated["path"]), *SMALL]
    in_sample = CliRunner().invoke(app, args)  # the seed c was chosen on: refused
    assert in_sample.exit_code == 2 and "in-sample" in in_sample.output, in_sample.output
    unknown = calibrated["path"].with_name("no-seed.json")  # which seed it chose c on: unknown
    document = dict(calibrated["doc"])
    del document["validation_seed"]
    unknown.write_text(json.dumps(document))
    no_seed = CliRunner().invoke(app, [*args, "--calibration", str(unknown), "--seed", "4243"])
    assert no_seed.exit_code == 2 and "no validation_seed" in no_seed.output, no_seed.output
    result = CliRunner().invoke(app, [*args, "--seed", "4243"])  # the last --seed wins
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    bench = build_benchmark(seed=4243, prompts_per_category=2, images_per_prompt=16)
    scored = score_benchmark(load_clip(str(SHIPPED_MODEL_DIR)), bench)
    for category, choice in calibrated["doc"]["categories"].items():
        part = [p for p in scored if p.prompt.category == category]
        expected = evaluate(part, EvalSettings(choice["scale"], choice["ensemble_lambda"]))
        assert report["textnorm_clip"][category] == pytest.approx(
            expected["textnorm_clip"][category], abs=1e-9
        )
