"""The learned reward head: training lowers its loss, save/load round trip, the shipped head."""

import json

import pytest
import torch

from evaluation.evaluate import EvalSettings, evaluate, score_benchmark
from export.clip_model import checkpoint_hash, load_clip
from export.reward_head import RewardHead, load_head, save_head
from export.train_head import HeadConfig, train_head
from service.settings import SHIPPED_HEAD_DIR
from shapes_world.benchmark import build_benchmark


@pytest.fixture(scope="module")
def bundle(shipped_model):
    return load_clip(shipped_model)


@pytest.mark.slow
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_training_reduces_the_loss(bundle, lam):
    cfg = HeadConfig(prompts=40, images_per_prompt=8, steps=150, lam=lam, n_prompts=5)
    _, stats = train_head(bundle, cfg)
    before, after = stats["loss_before"], stats["loss_after"]
    assert after["mse"] < 0.8 * before["mse"]
    if lam > 0:
        assert after["prompt_classification"] < 0.8 * before["prompt_classification"]
    assert 0.3 < stats["feedback_positive_rate"] < 0.7


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    head = RewardHead(16, hidden=8)
    save_head(head, tmp_path, {"clip_sha256": "abc"})
    loaded, config = load_head(tmp_path)
    img, txt = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(loaded(img, txt), head(img, txt))
    assert config["clip_sha256"] == "abc" and config["embed_dim"] == 16
    assert ((head(img, txt) > 0) & (head(img, txt) < 1)).all()


def test_load_rejects_other_directories(tmp_path):
    with pytest.raises(ValueError, match="not a reward-head directory"):
        load_head(tmp_path)


def test_shipped_head_matches_shipped_clip(shipped_model):
    config = json.loads((SHIPPED_HEAD_DIR / "head_config.json").read_text())
    assert config["clip_sha256"] == checkpoint_hash(shipped_model)


@pytest.mark.slow
def test_shipped_head_reproduces_its_reported_auroc(bundle):
    head, config = load_head(SHIPPED_HEAD_DIR)
    reported = config["reported_auroc"]
    scored = score_benchmark(bundle, build_benchmark(seed=reported["benchmark_seed"]), head)
    report = evaluate(scored, EvalSettings())
    for reward in ("head", "textnorm_head"):
        for category, value in reported[reward].items():
            assert report[reward][category] == pytest.approx(value, abs=0.02), (reward, category)
