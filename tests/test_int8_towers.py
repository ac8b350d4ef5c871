"""int8 towers (`export --precision int8`, `REWARD_PRECISION=int8`): what is quantized, how far
it is from the PyTorch fp32 reference, and that a real Triton serves it under its own identity."""

import json

import numpy as np
import onnx
import pytest
from scipy.stats import spearmanr

from service import model_contract as contract
from service.model_contract import version_dir
from shapes_world.benchmark import build_benchmark
from tests.conftest import (
    assert_verifies_in_reduced_precision,
    png_items,
    served_raw_rewards,
    shipped_exports_fixture,
)
from tests.serve_stack import client_for, serve_stack

TOWERS = ("image_encoder", "text_encoder")


repos = shipped_exports_fixture("int8")


def _graph(repo, model: str) -> onnx.ModelProto:
    return onnx.load(str(version_dir(repo, model) / "model.onnx"))


def _int8_matrices(model: onnx.ModelProto) -> list[str]:
    """int8 weight matrices (their per-channel zero points are int8 vectors)."""
    return [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    ]


def test_int8_quantizes_the_towers_weight_matmuls_only(repos):
    for name in TOWERS:
        fp32, int8 = _graph(repos["fp32"], name), _graph(repos["int8"], name)
        onnx.checker.check_model(int8, full_check=True)
        fp32_weights = {t.name for t in fp32.graph.initializer}
        weight_matmuls = [
            n for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in fp32_weights
        ]
        quantized = [n for n in int8.graph.node if n.op_type == "MatMulInteger"]
        still_fp32 = [n for n in int8.graph.node if n.op_type == "MatMul"]
        # every weight MatMul is int8 (the image tower's visual projection too, whose weight
        # is not an initializer of the fp32 graph as such: one more than those that are) ...
        assert len(quantized) == len(_int8_matrices(int8)) >= len(weight_matmuls) > 0, name
        # ... and what stays fp32 multiplies activations only (attention)
        int8_inits = {t.name for t in int8.graph.initializer}
        assert still_fp32 and all(not set(n.input) & int8_inits for n in still_fp32), name
        assert not {n.input[1] for n in weight_matmuls} & int8_inits, name
        assert "DynamicQuantizeLinear" in {n.op_type for n in int8.graph.node}
        assert [i.name for i in int8.graph.input] == [i.name for i in fp32.graph.input]
        assert [o.name for o in int8.graph.output] == [o.name for o in fp32.graph.output]
    # the in-graph preprocessing is untouched: same nodes under preprocess/
    pre = [
        (n.op_type, n.name, list(n.input))
        for n in _graph(repos["fp32"], "image_encoder").graph.node
        if any(i.startswith("preprocess/") for i in n.output)
    ]
    assert pre and pre == [
        (n.op_type, n.name, list(n.input))
        for n in _graph(repos["int8"], "image_encoder").graph.node
        if any(i.startswith("preprocess/") for i in n.output)
    ]
    # the reward head is exact fp32 in every flavour: the same file
    heads = [(version_dir(r, "reward_head") / "model.onnx").read_bytes() for r in repos.values()]
    assert heads[0] == heads[1]


def test_int8_is_its_own_export_and_says_so(repos):
    prov = {p: json.loads((r / "provenance.json").read_text()) for p, r in repos.items()}
    assert prov["int8"]["options"]["precision"] == "int8"
    assert prov["int8"]["export_sha256"] != prov["fp32"]["export_sha256"]
    assert prov["int8"]["model_version"] != prov["fp32"]["model_version"]
    assert "int8" in (repos["int8"] / "README.md").read_text()


def test_int8_verifies_within_its_tolerance_and_not_within_fp32s(repos):
    assert_verifies_in_reduced_precision(repos["int8"], "int8")


def test_int8_ranks_benchmark_images_as_fp32_does(repos):
    """Per prompt, the order of its images by raw reward: what a reward's AUROC and an RL
    advantage depend on (README: AUROC within 0.002 of fp32 on the held-out benchmark)."""
    bench = build_benchmark(seed=7, prompts_per_category=1, images_per_prompt=12)
    rhos = []
    for prompt in bench:
        images = [np.asarray(item.image(size=64)) for item in prompt.items]
        prompts = [prompt.prompt] * len(images)
        fp32 = served_raw_rewards(repos["fp32"], images, prompts)
        int8 = served_raw_rewards(repos["int8"], images, prompts)
        assert np.abs(int8 - fp32).max() <= contract.RAW_TOLERANCE["int8"]
        rhos.append(spearmanr(fp32, int8).statistic)
    assert min(rhos) >= 0.95 and np.mean(rhos) >= 0.98, rhos


def test_triton_serves_int8_towers_under_their_own_identity(repos, tmp_path):
    """`REWARD_PRECISION=int8 serve`: the bundled Triton runs the quantized graphs, responses
    name the precision and the int8 export, and rewards are the int8 files' (within the batch
    effect) and within the int8 tolerance of fp32."""
    from shapes_world.render import render
    from shapes_world.scene import Group, Scene

    fp32_repo = repos["fp32"]
    scenes = [Scene((Group(n, "red", "circle"),), "grass") for n in (1, 2, 3)]
    images = [render(s, k, 96).image for k, s in enumerate(scenes)]
    prompt = "two red circles on a grass background"
    items = png_items(images, prompt)
    with serve_stack(tmp_path, tmp_path / "repositories", head="", precision="int8") as stack:
        prov = json.loads((stack.repository / "provenance.json").read_text())
        with client_for(stack) as client:
            body = client.post("/v1/score", json={"items": items}).json()
    assert prov["options"]["precision"] == "int8"
    assert body["provenance"]["exporter"]["precision"] == "int8"
    assert body["provenance"]["export_sha256"] == prov["export_sha256"]
    served = np.array([r["raw"] for r in body["results"]])
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    # In process, each image alone: the gateway's batch (three images; the prompt padded to
    # its token bucket) quantizes activations together, which moves a reward by ~1e-3.
    int8 = served_raw_rewards(stack.repository, arrays, [prompt] * len(images))
    assert np.abs(served - int8).max() <= 5e-3
    fp32 = served_raw_rewards(fp32_repo, arrays, [prompt] * len(images))
    assert np.abs(served - fp32).max() <= contract.RAW_TOLERANCE["int8"]


def test_baselines_int8_flag_quantizes_their_linear_layers(shipped_model):
    """`bench serving --baseline-precision int8`: the baselines' torch model, every Linear
    dynamically quantized, rewards within the int8 tolerance of fp32 (not equal to them)."""
    import torch

    from loadtest.baselines.naive_server import load_model, pixel_values, raw_rewards, token_ids

    fp32, int8 = load_model(shipped_model), load_model(shipped_model, "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    assert any(isinstance(m, torch.nn.Linear) for m in fp32.model.modules())
    bench = build_benchmark(seed=3, prompts_per_category=1, images_per_prompt=4)
    images = [item.image(size=64) for p in bench for item in p.items]
    prompts = [p.prompt for p in bench for _ in p.items]
    rewards = [
        np.array(raw_rewards(b, pixel_values(b, images), token_ids(b, prompts)))
        for b in (fp32, int8)
    ]
    diff = np.abs(rewards[0] - rewards[1]).max()
    assert 0 < diff <= contract.RAW_TOLERANCE["int8"]


def test_a_repository_overrides_reward_precision_and_says_so(repos, caplog):
    """With REWARD_REPOSITORY the export is served as it is: an explicit REWARD_PRECISION that
    differs from its towers is ignored with a warning naming both; an unset or matching one
    is silent."""
    from service.launcher import ensure_repository, export_precision
    from service.settings import Settings

    assert [export_precision(repos[p]) for p in ("fp32", "int8")] == ["fp32", "int8"]
    for repo, asked, warned in (
        (repos["fp32"], "int8", True),
        (repos["int8"], "fp32", True),
        (repos["int8"], "int8", False),
    ):
        caplog.clear()
        assert ensure_repository(Settings(repository=str(repo), precision=asked)) == repo
        messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(messages) == warned, (repo, asked, messages)
        if warned:
            (message,) = messages
            assert f"REWARD_PRECISION={asked} is ignored" in message
            assert f"serves {export_precision(repo)} towers" in message
    caplog.clear()
    ensure_repository(Settings(repository=str(repos["int8"])))  # precision not set: no opinion
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_bench_serving_reports_the_served_exports_precision(repos, tmp_path, monkeypatch):
    """`bench serving` with REWARD_REPOSITORY: the report's precision (and parity tolerances)
    are the served export's, and a --precision the repository does not serve is refused before
    anything starts."""
    from loadtest.serving import SAME_EXPORT_TOLERANCE, bench_serving
    from service.settings import get_settings

    monkeypatch.setenv("REWARD_REPOSITORY", str(repos["int8"]))
    monkeypatch.delenv("REWARD_PRECISION", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ValueError, match="--precision fp32: .* serves int8 towers"):
            bench_serving(tmp_path / "refused", systems=("ceiling",), precision="fp32")
        result = bench_serving(
            tmp_path / "served",
            systems=("ceiling",),
            workloads=("rl",),
            concurrency=(1,),
            seconds=0.2,
            runs=1,
            warmup_s=0.1,
            image_px=64,
        )
    finally:
        get_settings.cache_clear()
    assert result["meta"]["precision"] == "int8"
    assert result["meta"]["repository"] == str(repos["int8"])
    assert result["parity"]["reference"] == "ceiling"
    assert result["parity"]["tolerance"] == {"ceiling": SAME_EXPORT_TOLERANCE["int8"]}


def test_serve_caches_each_precision_in_its_own_folder(tmp_path):
    """`serve` exports into a folder named by its settings: int8 and fp32 never share one (a
    cache hit must not serve the other precision)."""
    from service.launcher import repository_dir
    from service.settings import Settings

    fp32 = Settings(repositories_dir=str(tmp_path), precision="fp32")
    int8 = fp32.model_copy(update={"precision": "int8"})
    assert repository_dir(fp32) != repository_dir(int8)
