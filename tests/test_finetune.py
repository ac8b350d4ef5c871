"""The fine-tuning side (issue 12): DDIM log-probabilities, the stat tracker, the shipped judge,
and 2-step DDPO / reward-weighted-likelihood runs against the real stack (`serve` on loopback,
started once for this module), with rescoring of the logged images and resuming."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from finetune import run_dir as rd  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.ddim import ddim_step_with_logprob, ddim_timesteps, guided_eps, sample  # noqa: E402
from finetune.generator import load_generator, noise_scheduler  # noqa: E402
from finetune.judge import alignment, load_judge  # noqa: E402
from finetune.reward_client import ServiceReward  # noqa: E402
from finetune.stat_tracker import PerPromptStatTracker  # noqa: E402
from finetune.trainers import Trainer, run_finetune  # noqa: E402
from finetune.world_data import (  # noqa: E402
    ATTRIBUTE_NAMES,
    SHIPPED_GENERATOR_DIR,
    SHIPPED_JUDGE_DIR,
    rendered_set,
)
from service.triton_server import free_ports  # noqa: E402
from tests.test_serving import API_KEY, stack  # noqa: E402,F401  (the real-stack fixture)

ACP = noise_scheduler().alphas_cumprod


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread, as the commands default to (2 threads spin on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- DDIM log-probabilities ---------------------------------------------------------------------
def _step_inputs(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn((n, 3, 8, 8), generator=g)
    eps = torch.randn((n, 3, 8, 8), generator=g)
    t = ddim_timesteps(10)[[2, 5, 9]][:n]
    return x_t, eps, t, t - 100


def _direct_gaussian(x_t, eps, t, prev_t, eta, x_prev):
    """DDIM's step distribution written out from the DDIM paper, scored by torch.distributions."""
    a_t = ACP[t].view(-1, 1, 1, 1)
    a_prev = torch.where(prev_t >= 0, ACP[prev_t.clamp(min=0)], ACP[0]).view(-1, 1, 1, 1)
    x0 = ((x_t - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)).clamp(-1, 1)
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev - sigma**2) * eps
    dist = torch.distributions.Normal(mean, sigma.expand_as(mean))
    return dist.log_prob(x_prev).mean(dim=(1, 2, 3)), mean, sigma


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_log_prob_matches_direct_gaussian_density(eta: float) -> None:
    x_t, eps, t, prev_t = _step_inputs(0)
    drawn, lp = ddim_step_with_logprob(
        ACP, eps, t, prev_t, x_t, eta, generator=torch.Generator().manual_seed(1)
    )
    expected, mean, sigma = _direct_gaussian(x_t, eps, t, prev_t, eta, drawn)
    torch.testing.assert_close(lp, expected, rtol=1e-4, atol=1e-4)
    # The draw is the Gaussian's: standardised residuals are ~N(0, 1).
    z = (drawn - mean) / sigma
    assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1) < 0.15
    # Scoring a given sample gives the same density, and a far-off sample a lower one.
    _, again = ddim_step_with_logprob(ACP, eps, t, prev_t, x_t, eta, prev_sample=drawn)
    torch.testing.assert_close(again, lp)
    _, worse = ddim_step_with_logprob(ACP, eps, t, prev_t, x_t, eta, prev_sample=drawn + 0.5)
    assert (worse < lp).all()


def test_ddim_needs_eta_and_keeps_the_last_step_stochastic() -> None:
    x_t, eps, t, prev_t = _step_inputs(2)
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(ACP, eps, t, prev_t, x_t, 0.0)
    steps = ddim_timesteps(10)
    assert steps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    _, _, sigma = _direct_gaussian(x_t[:1], eps[:1], steps[-1:], steps[-1:] - 100, 1.0, x_t[:1])
    assert float(sigma) > 0  # the final step to ᾱ_0 keeps a variance: finite log-probabilities


@pytest.fixture(scope="module")
def generator_model():
    unet, _ = load_generator(SHIPPED_GENERATOR_DIR)
    return unet.eval()


def test_sampled_trajectory_log_probs_are_what_the_policy_assigns(generator_model) -> None:
    """DDPO's old log-probabilities: rescoring a stored trajectory step by step under the same
    model gives them back (importance ratio 1 before any update)."""
    g = torch.Generator().manual_seed(0)
    cond, null = torch.randn(2, 16, 128, generator=g), torch.zeros(16, 128)
    traj = sample(generator_model, ACP, cond, null, 3, 1.0, 2.0, torch.Generator().manual_seed(3))
    assert traj.latents.shape == (2, 4, 3, 32, 32) and traj.log_probs.shape == (2, 3)
    assert torch.isfinite(traj.log_probs).all()
    with torch.no_grad():
        for j, t in enumerate(traj.timesteps):
            eps = guided_eps(generator_model, traj.latents[:, j], t, cond, null, 2.0)
            _, lp = ddim_step_with_logprob(
                ACP, eps, t.expand(2), (t - 333).expand(2), traj.latents[:, j], 1.0,
                prev_sample=traj.latents[:, j + 1],
            )  # fmt: skip
            torch.testing.assert_close(lp, traj.log_probs[:, j], rtol=1e-4, atol=1e-3)


def test_stat_tracker_normalises_per_prompt() -> None:
    tracker = PerPromptStatTracker(buffer_size=16, min_count=2)
    prompts = ["a", "a", "a", "b", "b", "b"]
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 10.5, 11.0])
    adv = tracker.update(prompts, rewards)
    for p in ("a", "b"):
        mine = adv[[q == p for q in prompts]]
        assert abs(mine.mean()) < 1e-9 and abs(mine.std() - 1) < 1e-4
    # Below min_count the whole batch's statistics are used.
    fresh = PerPromptStatTracker(buffer_size=16, min_count=5)
    adv = fresh.update(["x", "y"], np.array([0.0, 2.0]))
    np.testing.assert_allclose(adv, [-1, 1], atol=1e-5)
    restored = PerPromptStatTracker(16, 2)
    restored.load_state(json.loads(json.dumps(tracker.state())))
    assert restored.state() == tracker.state()


def test_only_the_newest_checkpoints_are_kept(tmp_path) -> None:
    for step in (1, 2, 3, 4):
        (rd.checkpoint_dir(tmp_path, step)).mkdir(parents=True)
        (rd.checkpoint_dir(tmp_path, step) / "trainer_state.json").write_text("{}")
    rd.checkpoint_dir(tmp_path, 5).mkdir()  # an unfinished one (no trainer_state.json)
    removed = rd.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_0001", "step_0002"]
    assert rd.latest_checkpoint(tmp_path) == (4, rd.checkpoint_dir(tmp_path, 4))
    assert rd.checkpoint_dir(tmp_path, 3).is_dir()


def test_a_checkpoint_from_another_device_type_resumes_with_reseeded_generators(tmp_path) -> None:
    """A CUDA generator's state (seed + offset, 16 bytes) cannot be set on a CPU generator
    (5,056 bytes), nor the reverse: `--device` may change on resume, so those are reseeded."""
    from safetensors.torch import load_file, save_file

    unet = load_generator(SHIPPED_GENERATOR_DIR)[0]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gens = {"sample": torch.Generator().manual_seed(3), "train": torch.Generator().manual_seed(4)}
    rng = np.random.default_rng(0)
    path = rd.save_checkpoint(tmp_path, 6, unet, opt, gens, rng, {"tracker": {}})
    tensors = load_file(path / "trainer_state.safetensors")
    tensors["rng.sample"] = torch.tensor([3, 0, 0, 0, 0, 0, 0, 0] * 2, dtype=torch.uint8)  # CUDA's
    save_file(tensors, path / "trainer_state.safetensors")
    train_state = gens["train"].get_state()

    fresh = {"sample": torch.Generator().manual_seed(3), "train": torch.Generator().manual_seed(4)}
    state = rd.load_checkpoint(path, unet, opt, fresh, np.random.default_rng(1))
    assert state["reseeded"] == ["sample"] and state["step"] == 6
    assert torch.equal(fresh["train"].get_state(), train_state)  # same device type: restored
    expected = torch.Generator().manual_seed(3 + 7919 * 6)  # from its seed and the step
    assert torch.equal(fresh["sample"].get_state(), expected.get_state())


# -- the judge ----------------------------------------------------------------------------------
def test_shipped_judge_reads_attributes_of_fresh_renders() -> None:
    judge = load_judge(SHIPPED_JUDGE_DIR)
    fresh = rendered_set(600, seed=424_242)  # a seed no training set used
    acc = alignment(judge, fresh.images, fresh.labels)
    assert set(ATTRIBUTE_NAMES) <= set(acc)
    for attribute in ATTRIBUTE_NAMES:
        assert acc[attribute] >= JUDGE_MIN_ACCURACY[attribute], (attribute, acc)
    # And it is not reading the prompt: shuffled labels score near chance.
    shuffled = alignment(judge, fresh.images, np.random.default_rng(0).permutation(fresh.labels))
    assert shuffled["colour"] < 0.4 and shuffled["count"] < 0.4


JUDGE_MIN_ACCURACY = {"count": 0.95, "colour": 0.95, "shape": 0.95, "background": 0.95}


# -- fine-tuning against the real stack -------------------------------------------------------
def _tiny(algorithm: str, reward: str, url: str, steps: int) -> FinetuneConfig:
    return FinetuneConfig(
        algorithm=algorithm, reward=reward, service_url=url, steps=steps, seed=5, prompts=2,
        sample_batch_size=2, batches_per_step=2, ddim_steps=2, train_batch_size=4,
        rwl_pretrain_pool=8, lr=1e-3,
    )  # fmt: skip


def _params(unet) -> list[torch.Tensor]:
    return [p.detach().clone() for p in unet.parameters()]


def _assert_rescored(run, cfg: FinetuneConfig) -> None:
    """The logged rewards are what the service returns for the logged images, now."""
    rows = rd.read_metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(1, cfg.steps + 1))
    options = cfg.textnorm_options()
    with ServiceReward(cfg.service_url, cfg.reward, api_key=API_KEY, textnorm=options) as reward:
        for row in rows:
            logged = rd.load_samples(run, int(row["step"]))
            again = reward(logged["images"], [str(p) for p in logged["prompts"]])
            np.testing.assert_allclose(logged["rewards"], again.rewards, rtol=1e-5, atol=1e-6)
            assert float(row["mean_reward"]) == pytest.approx(float(logged["rewards"].mean()))
            assert logged["images"].shape == (4, 32, 32, 3)
    state = json.loads((rd.checkpoint_dir(run, cfg.steps) / "trainer_state.json").read_text())
    assert state["config"]["reward"] == cfg.reward and state["step"] == cfg.steps
    assert state["provenance"]["export_sha256"] == again.provenance["export_sha256"]
    if cfg.reward not in ("raw", "head"):  # each prompt's set, kept for the next resume
        logged = {str(p) for row in rows for p in rd.load_samples(run, int(row["step"]))["prompts"]}
        assert set(state["contrastive_sets"]) == logged
        assert all(len(sha) == 64 for sha in state["contrastive_sets"].values())


def _resume_and_check(run, cfg: FinetuneConfig) -> Trainer:
    """Run 1 step, then resume to 2: the step counter continues from the checkpoint."""
    first = run_finetune(replace(cfg, steps=1), run, api_key=API_KEY)
    assert first.step == 1 and rd.latest_checkpoint(run)[0] == 1
    after_one = _params(first.unet)
    reopened = Trainer(cfg, run)
    reopened.open_run()
    assert reopened.step == 1 and reopened.tracker.state() == first.tracker.state()
    for a, b in zip(_params(reopened.unet), after_one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    second = run_finetune(cfg, run, api_key=API_KEY)
    assert second.step == 2 and rd.latest_checkpoint(run)[0] == 2
    return second


def test_ddpo_two_steps_against_the_service_and_resume(stack, tmp_path) -> None:  # noqa: F811
    cfg = replace(_tiny("ddpo", "textnorm", stack.url, steps=2), textnorm_rule="counting")
    resumed = _resume_and_check(tmp_path / "resumed", cfg)
    initial = _params(load_generator(SHIPPED_GENERATOR_DIR)[0])
    changed = [not torch.equal(a, b) for a, b in zip(_params(resumed.unet), initial, strict=True)]
    assert sum(changed) > len(changed) // 2, "DDPO left most parameters unchanged"
    assert float(rd.read_metrics(tmp_path / "resumed")[-1]["distance_to_init"]) > 0
    _assert_rescored(tmp_path / "resumed", cfg)
    logged = rd.load_samples(tmp_path / "resumed", 2)  # the rule reached the service
    with ServiceReward(cfg.service_url, cfg.reward, api_key=API_KEY) as default_rule:
        auto = default_rule(logged["images"], [str(p) for p in logged["prompts"]]).rewards
    assert not np.allclose(logged["rewards"], auto, atol=1e-4)
    # A straight 2-step run reaches the same model: the checkpoint held the whole state.
    straight = run_finetune(cfg, tmp_path / "straight", api_key=API_KEY)
    for a, b in zip(_params(straight.unet), _params(resumed.unet), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reward_weighted_likelihood_two_steps_against_the_service(stack, tmp_path) -> None:  # noqa: F811
    cfg = _tiny("rwl", "raw", stack.url, steps=2)
    trainer = _resume_and_check(tmp_path / "rwl", cfg)
    initial = _params(load_generator(SHIPPED_GENERATOR_DIR)[0])
    changed = [not torch.equal(a, b) for a, b in zip(_params(trainer.unet), initial, strict=True)]
    assert sum(changed) > len(changed) // 2, "RWL left most parameters unchanged"
    _assert_rescored(tmp_path / "rwl", cfg)


def test_compare_trains_runs_in_parallel_and_judges_them_at_equal_steps(stack, tmp_path) -> None:  # noqa: F811
    from finetune.compare import FixedSet, compare, judged_steps
    from finetune.evaluate import judge_generator
    from finetune.text_encoder import TextConditioner

    cfg = _tiny("ddpo", "raw", stack.url, steps=2)
    fixed = FixedSet(prompts=2, per_prompt=2, prompt_seeds=(0, 1), ddim_steps=2)
    out = tmp_path / "compare"
    compare(cfg, ["raw", "textnorm"], [5], out, API_KEY, jobs=2, fixed=fixed)
    assert judged_steps(cfg) == (1, 2)
    # Two processes train what one process trains (same seed, same service).
    straight = run_finetune(cfg, tmp_path / "straight", api_key=API_KEY)
    parallel = load_generator(rd.checkpoint_dir(out / "raw_seed5", 2) / "unet")[0]
    for a, b in zip(_params(parallel), _params(straight.unet), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # training moved them ~1e-3

    with (out / "fixed_set.csv").open() as f:
        rows = list(csv.DictReader(f))
    keys = [(r["generator"], r["seed"], r["step"], r["prompt_seed"]) for r in rows]
    assert keys == [("start", "-", "0", "0"), ("start", "-", "0", "1")] + [
        (reward, "5", step, ps) for reward in ("raw", "textnorm") for step in "12" for ps in "01"
    ]
    # A row is the judge's alignment of that checkpoint on that fixed set, recomputed here.
    row = rows[-1]  # textnorm, step 2, prompt set 1
    unet = load_generator(rd.checkpoint_dir(out / "textnorm_seed5", 2) / "unet")[0]
    again, _, _ = judge_generator(
        unet, TextConditioner(), load_judge(SHIPPED_JUDGE_DIR), 2, 2, prompt_seed=1, seed=0,
        ddim_steps=2,
    )  # fmt: skip
    assert {a: float(row[a]) for a in again} == pytest.approx(again, abs=1e-4)
    table = (out / "fixed_set.md").read_text()
    assert "| start | 0 |" in table and "| textnorm | 2 |" in table
    # How many judged prompts were trained on, per set: all of set 0 (prefix-stable draws)
    from finetune.world_data import prompt_of, prompt_set

    trained = {prompt_of(s) for s in prompt_set(cfg.prompts, cfg.prompt_seed)}
    for ps in (0, 1):
        want = sum(prompt_of(s) in trained for s in prompt_set(2, ps))
        assert {r["training_prompts"] for r in rows if r["prompt_seed"] == str(ps)} == {str(want)}
        assert f"seed {ps}: 2 prompts x 2 samples" in table
        assert f"; {want} of the 2 prompts are training prompts." in table
    assert {r["training_prompts"] for r in rows if r["prompt_seed"] == "0"} == {"2"}
    summary = (out / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["raw", "textnorm"]
    assert (out / "compare.png").is_file() and (out / "grids" / "raw_seed5_step_0002.png").is_file()


def test_compare_asks_the_service_once_before_any_run(tmp_path) -> None:
    """An unreachable service fails compare at once, before any worker loads a model: the
    client's own error (the CLI prints it in one line), no output folder."""
    from textnorm_reward_client import RewardServiceError

    from finetune.compare import compare

    port = free_ports(1)[0]  # nothing listens there
    cfg = _tiny("ddpo", "raw", f"http://127.0.0.1:{port}", steps=2)
    with pytest.raises(RewardServiceError) as failed:
        compare(cfg, ["raw", "textnorm"], [5], tmp_path / "out", API_KEY, jobs=2)
    assert failed.value.code == "unreachable"
    assert not (tmp_path / "out").exists()


def test_compare_names_the_run_that_failed_and_stops(stack, tmp_path) -> None:  # noqa: F811
    """A run that fails in its worker process (the single-model stack serves no two-model
    ensemble reward) stops compare, which names it, with the worker's error as the cause, and
    writes no summary."""
    from finetune.compare import compare

    cfg = _tiny("ddpo", "raw", stack.url, steps=2)
    with pytest.raises(RuntimeError, match=r"run ensemble_models_uw_seed5 failed") as failed:
        compare(cfg, ["raw", "ensemble_models_uw"], [5], tmp_path / "out", API_KEY, jobs=2)
    cause = failed.value.__cause__
    assert isinstance(cause, ValueError) and "ensemble_models_uw" in str(cause), cause
    assert not (tmp_path / "out" / "summary.csv").exists()


# 32 (a GENERATOR_STEPS generator judged by the shipped judge) passes too (2 min 16 s, run by
# hand 2026-12-07); left out of CI for time: the script's loop is the same at both sizes.
@pytest.mark.serial  # its runs are stopped at a time budget: they need the machine alone
@pytest.mark.parametrize("size", [64])
def test_gpu_compare_script_stops_at_its_budget_and_reports_the_last_common_step(
    tmp_path, size: int
) -> None:
    """finetune/gpu-compare.sh end to end on CPU: a generator trained first (64 px: and its
    judge; 32 px with GENERATOR_STEPS: judged by the shipped judge), its own `gateway --onnx`,
    parallel runs of that generator stopped at the time budget, every run reported at the last
    step all of them checkpointed."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = tmp_path / "gpu"
    env = {
        **os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "SEEDS": "0", "STEPS": "60",
        "BUDGET_S": "45", "CHECKPOINT_EVERY": "1", "PROMPTS": "2", "SAMPLE_BATCH": "2",
        "BATCHES": "1", "TRAIN_BATCH": "2", "JUDGE_PROMPTS": "2", "JUDGE_PER_PROMPT": "1",
        "SIGNAL_SETTINGS": "default,counting", "SIGNAL_PER_PROMPT": "2",
        "TEXTNORM_RULE": "counting", "GENERATOR_SIZE": str(size), "GENERATOR_STEPS": "2",
        "GENERATOR_IMAGES": "64", "JUDGE_IMAGES": "256", "JUDGE_EPOCHS": "1",
    }  # fmt: skip
    res = subprocess.run(
        ["bash", str(REPO_ROOT / "finetune" / "gpu-compare.sh"), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "budget reached: stopped the runs" in res.stdout
    signal = json.loads((out / "reward_signal" / "reward_signal.json").read_text())
    assert signal["settings"] == {"default": None, "counting": {"rule": "counting"}}
    judge = str(out / "judge-64") if size == 64 else str(SHIPPED_JUDGE_DIR)
    assert signal["samples"]["size"] == size
    assert signal["samples"]["generator"] == str(out / f"generator-{size}")
    assert signal["samples"]["judge"] == judge
    config = json.loads((out / "textnorm_seed0" / "config.json").read_text())
    assert config["textnorm_rule"] == "counting"
    assert (config["generator"], config["judge"]) == (str(out / f"generator-{size}"), judge)
    assert not list(out.glob("*.partial"))  # trained into scratch folders, then moved
    done = int((out / "steps.txt").read_text())
    assert 2 <= done < 60
    with (out / "fixed_set.csv").open() as f:
        steps = {(r["generator"], int(r["step"])) for r in csv.DictReader(f)}
    half = done // 2
    assert steps == {("start", 0)} | {(r, s) for r in ("raw", "textnorm") for s in (half, done)}
    with (out / "summary.csv").open() as f:
        assert [int(r["last_step"]) for r in csv.DictReader(f)] == [done, done]
    url = next(w for w in res.stdout.split() if w.startswith("http://127.0.0.1:"))
    with pytest.raises(httpx.TransportError):  # the script stopped the gateway it started
        httpx.get(f"{url}/healthz", timeout=2)


def test_a_run_refuses_rewards_from_another_reward_model() -> None:
    """A resume against a service serving another export (or calibration file), or a service
    redeployed mid-run: the run stops naming both, rather than mixing two reward models."""
    from types import SimpleNamespace

    check = Trainer._check_same_reward_model
    first = {"export_sha256": "a" * 64, "textnorm": {"calibration_sha256": "c" * 64}}
    run = SimpleNamespace(provenance=first)
    check(run, json.loads(json.dumps(first)))  # the same model: fine
    check(SimpleNamespace(provenance=None), {"export_sha256": "b" * 64})  # a new run: fine
    for other, named in (
        ({**first, "export_sha256": "b" * 64}, f"export {'b' * 64}, calibration"),
        ({**first, "textnorm": {"calibration_sha256": "d" * 64}}, f"calibration {'d' * 64}"),
    ):
        with pytest.raises(ValueError, match="now serves") as refused:
            check(run, other)
        assert named in str(refused.value)
        assert f"came from export {'a' * 64}, calibration {'c' * 64}" in str(refused.value)


def test_a_run_refuses_another_contrastive_set_for_a_prompt() -> None:
    """The gateway's contrastive settings (max_contrastive_prompts, a prompt-sets file) change
    TextNorm without changing the export or calibration hash: each prompt's set must stay the
    one its first reward used; a set-free reward (raw) does not care."""
    from types import SimpleNamespace

    check = Trainer._check_same_contrastive_sets
    run = SimpleNamespace(cfg=SimpleNamespace(reward="textnorm"), contrastive_sets={})
    check(run, ["two cats", "a dog"], ["a" * 64, "b" * 64])
    check(run, ["a dog", "two cats"], ["b" * 64, "a" * 64])  # the same sets: fine
    with pytest.raises(ValueError, match=r"scores 'a dog' against another contrastive set"):
        check(run, ["a dog"], ["c" * 64])
    with pytest.raises(ValueError, match=r"\(none, was aaaaaaaaaaaa\)"):
        check(run, ["two cats"], [None])  # the service built no set for it any more
    raw = SimpleNamespace(cfg=SimpleNamespace(reward="raw"), contrastive_sets={})
    check(raw, ["a dog"], ["b" * 64])
    check(raw, ["a dog"], ["c" * 64])
    assert raw.contrastive_sets == {}


def test_accumulated_minibatches_make_one_optimizer_step_over_the_whole_round(tmp_path) -> None:
    """DDPO with gradient_accumulation = 2 over two minibatches of 2 makes the one step a
    single minibatch of 4 makes, with the same gradient (each minibatch weighs 1/2), every
    ratio scored at the sampling policy; without it the second minibatch is trained after a
    first step, and its ratios leave the clip range."""
    # max_grad_norm out of the way: the gradients are compared as accumulated, not clipped
    tiny = _tiny("ddpo", "textnorm", "http://127.0.0.1:9", steps=1)
    base = replace(tiny, lr=1e-3, max_grad_norm=1e9)
    whole = Trainer(replace(base, train_batch_size=4), tmp_path / "whole")
    accumulated = Trainer(
        replace(base, train_batch_size=2, gradient_accumulation=2), tmp_path / "a"
    )
    stepwise = Trainer(replace(base, train_batch_size=2), tmp_path / "s")
    # minibatches of 3 and 1: each weighs by its samples, not 1/2 each
    uneven = Trainer(replace(base, train_batch_size=3, gradient_accumulation=2), tmp_path / "u")
    groups = accumulated._accumulation_groups(torch.arange(5))
    assert [[mb.tolist() for mb in group] for group in groups] == [[[0, 1], [2, 3]], [[4]]]
    batches = [whole._sample_batch() for _ in range(base.batches_per_step)]
    rewards = np.array([0.9, 0.1, 0.6, 0.3])
    gradients: dict[str, list[list[torch.Tensor]]] = {}
    for name, trainer in (("whole", whole), ("accumulated", accumulated), ("uneven", uneven)):
        seen = gradients.setdefault(name, [])
        params = list(trainer.unet.parameters())
        trainer.opt.step = lambda params=params, seen=seen: seen.append(  # the step it would take
            [p.grad.clone() for p in params]
        )
    stats = {name: t._ddpo_update(batches, rewards) for name, t in
             (("whole", whole), ("accumulated", accumulated), ("uneven", uneven),
              ("stepwise", stepwise))}  # fmt: skip
    assert [len(gradients[n]) for n in ("whole", "accumulated", "uneven")] == [1, 1, 1]
    for name in ("accumulated", "uneven"):
        for a, b in zip(gradients[name][0], gradients["whole"][0], strict=True):
            # float32 sums in another order, batches of other sizes: within 1e-3 of each
            # tensor's largest gradient (a minibatch misweighted is off by ~0.4)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    assert sum(float(g.abs().sum()) for g in gradients["whole"][0]) > 0
    assert stats["accumulated"]["clipfrac"] == stats["whole"]["clipfrac"] == 0.0
    assert stats["stepwise"]["clipfrac"] > 0.0  # its second minibatch, after a first step


def test_a_non_finite_gradient_stops_the_run_before_the_update(tmp_path) -> None:
    """Weights gone NaN (or an inf loss): the update is refused before the optimizer step, so
    the run stops with finite checkpoints kept, instead of training on black images."""
    cfg = _tiny("ddpo", "textnorm", "http://127.0.0.1:9", steps=1)
    trainer = Trainer(cfg, tmp_path / "run")
    batches = [trainer._sample_batch() for _ in range(cfg.batches_per_step)]
    rewards = np.linspace(0.1, 0.9, sum(len(b.prompts) for b in batches))
    first = next(trainer.unet.parameters())
    with torch.no_grad():
        first.view(-1)[0] = float("nan")
    before = _params(trainer.unet)
    with pytest.raises(ValueError, match="step 1: the gradient is not finite"):
        trainer._ddpo_update(batches, rewards)
    for a, b in zip(_params(trainer.unet), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # not stepped
    assert not trainer.opt.state  # Adam never took a step


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"eta": 1.5}, r"eta must be in \(0, 1\], got 1.5"),
        ({"eta": 0.0}, r"eta must be in \(0, 1\], got 0.0"),
        ({"ddim_steps": 1000}, r"ddim_steps must be in 1..999, got 1000"),
        ({"lr": 0.0}, r"lr must be > 0, got 0.0"),
        ({"clip_range": -1e-4}, r"clip_range must be > 0"),
        ({"gradient_accumulation": 0}, r"gradient_accumulation must be >= 1, got 0"),
    ],
)
def test_sampler_and_optimiser_settings_are_checked_when_the_config_is_built(setting, message):
    """eta > 1 gives a negative variance (silently clamped: not DDIM), eta 0 no log-probability,
    1000 DDIM steps a timestep past the schedule: refused before any model loads."""
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**setting)
    assert ddim_timesteps(999).max() == 999  # the most steps the schedule has room for


def test_a_run_directory_refuses_other_settings(tmp_path) -> None:
    cfg = _tiny("rwl", "raw", "http://127.0.0.1:9", steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"algorithm": "ddpo"}))
    with pytest.raises(ValueError, match="other settings: algorithm"):
        Trainer(cfg, tmp_path / "run").open_run()
    # A run begun before a setting existed (its config.json lacks it) used its default: it
    # resumes with the default, and is refused with another value.
    older = {k: v for k, v in asdict(cfg).items() if k != "gradient_accumulation"}
    (tmp_path / "run" / "config.json").write_text(json.dumps(older))
    Trainer(cfg, tmp_path / "run").open_run()
    (tmp_path / "run" / "config.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match="other settings: gradient_accumulation$"):
        Trainer(replace(cfg, gradient_accumulation=2), tmp_path / "run").open_run()


# -- the commands -------------------------------------------------------------------------------
def test_train_commands_reproduce_loadable_artifacts_from_a_seed(tmp_path) -> None:
    from tests.conftest import run_cli

    gen_out, judge_out = tmp_path / "generator", tmp_path / "judge"
    args = ("--steps", "2", "--images", "64", "--batch-size", "4", "--seed", "3")
    res = run_cli("train-generator", "--out", str(gen_out), *args)
    assert res.returncode == 0, res.stderr
    unet, meta = load_generator(gen_out)
    assert meta["config"]["seed"] == 3 and meta["config"]["steps"] == 2
    assert unet.config.sample_size == 32 and unet.config.cross_attention_dim == 128
    res = run_cli("train-judge", "--out", str(judge_out), "--images", "256", "--epochs", "1")
    assert res.returncode == 0, res.stderr
    assert "held-out accuracy count" in res.stdout
    judge = load_judge(judge_out)
    stats = json.loads((judge_out / "judge_config.json").read_text())
    fresh = rendered_set(64, seed=99)
    assert set(stats["held_out_accuracy"]) == {*ATTRIBUTE_NAMES, "all"}
    assert set(alignment(judge, fresh.images, fresh.labels)) == {*ATTRIBUTE_NAMES, "all"}


def test_a_64_px_generator_and_judge_train_sample_and_read_each_other(tmp_path) -> None:
    """`--size 64`: the generator draws 64 px (attention still at 16 and 8 px), a judge trained
    at 64 px reads its samples, the shipped 32 px judge refuses them, and so does a fine-tune
    pairing the two (before any step); a size the networks cannot take is refused in one line."""
    from finetune.evaluate import generate
    from finetune.judge import predict
    from finetune.text_encoder import TextConditioner
    from tests.conftest import run_cli

    gen_out, judge_out = tmp_path / "generator-64", tmp_path / "judge-64"
    res = run_cli(
        "train-generator", "--size", "64", "--out", str(gen_out), "--steps", "2",
        "--images", "64", "--batch-size", "4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    unet, meta = load_generator(gen_out)
    assert unet.config.sample_size == meta["image_size"] == meta["config"]["size"] == 64
    assert list(unet.config.down_block_types[-2:]) == ["CrossAttnDownBlock2D"] * 2
    assert list(unet.config.down_block_types[:2]) == ["DownBlock2D"] * 2
    images = generate(unet, TextConditioner(), ["two red circles on a grass background"] * 3, 2)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    res = run_cli("train-judge", "--size", "64", "--out", str(judge_out), "--images", "256",
                  "--epochs", "1")  # fmt: skip
    assert res.returncode == 0, res.stderr
    judge = load_judge(judge_out)
    assert judge.size == 64
    verdicts = predict(judge, images)
    assert verdicts.shape == (3, len(ATTRIBUTE_NAMES)) and verdicts.dtype == np.int64
    fresh = rendered_set(32, seed=98, size=64)
    assert set(alignment(judge, fresh.images, fresh.labels)) == {*ATTRIBUTE_NAMES, "all"}
    with pytest.raises(ValueError, match=r"reads 32 px .* train-judge --size 64"):
        predict(load_judge(SHIPPED_JUDGE_DIR), images)
    cfg = replace(_tiny("ddpo", "raw", "http://127.0.0.1:9", 1), generator=str(gen_out))
    with pytest.raises(ValueError, match=r"reads 32 px images, the generator draws 64 px"):
        Trainer(cfg, tmp_path / "run")
    res = run_cli("train-generator", "--size", "48", "--out", str(tmp_path / "g48"))
    assert res.returncode != 0 and "--size must be one of 32, 64, 128" in res.stderr
    assert not (tmp_path / "g48").exists()
    shipped = {p.name: p.stat().st_mtime_ns for p in SHIPPED_GENERATOR_DIR.iterdir()}
    res = run_cli("train-generator", "--size", "64", "--steps", "1")  # no --out: not shipped/
    assert res.returncode != 0 and "--size 64 needs --out DIR" in res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in SHIPPED_GENERATOR_DIR.iterdir()} == shipped


def test_the_32_px_unet_is_the_shipped_generators() -> None:
    """Sizes other than 32 px must not change the shipped generator's architecture (its
    `train-generator` reproduction)."""
    from finetune.generator import unet_config

    shipped = json.loads((SHIPPED_GENERATOR_DIR / "generator.json").read_text())["unet"]
    assert json.loads(json.dumps(unet_config(128, 32))) == shipped


def test_finetune_run_rejects_an_unknown_reward_in_one_line(tmp_path) -> None:
    from tests.conftest import run_cli

    res = run_cli("finetune", "run", "--run", str(tmp_path / "r"), "--reward", "clip")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: unknown reward 'clip'; known: raw, textnorm")
    assert not (tmp_path / "r").exists()


# -- does a reward order the policy's own samples as the judge does ----------------------------
def test_per_prompt_auroc_is_the_mann_whitney_probability_with_ties_half() -> None:
    from evaluation.auroc import mean_per_prompt_auroc
    from finetune.reward_signal import per_prompt_auroc

    rng = np.random.default_rng(3)
    rewards = rng.integers(0, 5, 60).astype(np.float64)  # many ties
    correct = rng.random(60) < 0.4
    ids = np.repeat(np.arange(6), 10)
    correct[ids == 5] = True  # a prompt whose samples are all right says nothing: left out
    want = mean_per_prompt_auroc([(rewards[ids == p], correct[ids == p]) for p in range(6)])
    assert per_prompt_auroc(rewards, correct, ids) == pytest.approx(want) and want[1] == 5
    assert per_prompt_auroc(correct.astype(np.float64), correct, ids)[0] == 1.0
    assert per_prompt_auroc(-correct.astype(np.float64), correct, ids)[0] == 0.0


def test_reward_signal_settings_verdicts_and_rows() -> None:
    from finetune.reward_signal import (
        ATTRIBUTES,
        judged_correct,
        parse_settings,
        per_prompt_auroc,
        signal_rows,
    )

    settings = parse_settings("default, counting@5,attributes")
    assert [(s.label, s.textnorm) for s in settings] == [
        ("default", None),
        ("counting@5", {"rule": "counting", "scale": 5.0}),
        ("attributes", {"rule": "attributes"}),
    ]
    for bad in ("counting@x", "counting@0", "default,default", " , "):
        with pytest.raises(ValueError):
            parse_settings(bad)
    labels = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [1, 1, 2, 3], [0, 0, 0, 0]])
    predicted = np.array([[0, 1, 2, 3], [1, 1, 2, 3], [1, 1, 2, 3], [0, 0, 0, 1]])
    assert judged_correct(predicted, labels).tolist() == [
        [True, True, True, True, True],
        [False, True, True, True, False],
        [True, True, True, True, True],
        [True, True, True, False, False],
    ]
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(4), 8)
    correct = rng.random((32, len(ATTRIBUTES))) < 0.5
    raw, default_tn, counting_tn = rng.random((3, 32))
    scored = {
        "default": {"raw": raw, "textnorm": default_tn, "head": np.full(32, np.nan)},
        "counting": {"raw": raw, "textnorm": counting_tn, "head": np.full(32, np.nan)},
    }
    rows = signal_rows(scored, correct, ids)
    assert [(r["reward"], r["setting"]) for r in rows] == [
        ("raw", "any"),  # setting-free: once; the unserved head: not at all
        ("textnorm", "default"),
        ("textnorm", "counting"),
    ]
    for i, attribute in enumerate(ATTRIBUTES):
        value, used = per_prompt_auroc(counting_tn, correct[:, i], ids)
        assert rows[2]["auroc"][attribute] == value and rows[2]["prompts"][attribute] == used
    none_right = signal_rows(scored, np.zeros_like(correct), ids)[0]
    assert none_right["auroc"]["count"] is None and none_right["prompts"]["count"] == 0


def test_reward_signal_against_the_service(stack, tmp_path) -> None:  # noqa: F811
    """The command's rewards are the service's for its samples under each setting, and every
    AUROC is the per-prompt AUROC of those rewards against the judge's verdicts."""
    from textnorm_reward_client import RewardClient

    from evaluation.auroc import mean_per_prompt_auroc
    from finetune.reward_signal import ATTRIBUTES
    from tests.conftest import run_cli

    res = run_cli(
        "finetune", "reward-signal", "--url", stack.url, "--api-key", API_KEY, "--prompts", "6",
        "--per-prompt", "4", "--ddim-steps", "2", "--settings", "default,counting@5",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "reward_signal.json").read_text())
    samples = np.load(tmp_path / "samples.npz")  # no pickle
    assert report["settings"] == {"default": None, "counting@5": {"rule": "counting", "scale": 5}}
    with RewardClient(stack.url, api_key=API_KEY) as client:
        prompts = [str(p) for p in samples["prompts"]]
        again = client.score(samples["images"], prompts, {"rule": "counting", "scale": 5.0})
    counting = samples["rewards/counting@5/textnorm"]
    np.testing.assert_allclose(counting, again.rewards("textnorm"), rtol=1e-5, atol=1e-6)
    assert not np.allclose(counting, samples["rewards/default/textnorm"], atol=1e-4)
    ids, correct = samples["prompt_ids"], samples["correct"]
    assert {(r["reward"], r["setting"]) for r in report["rows"]} >= {
        ("raw", "any"), ("textnorm", "default"), ("textnorm", "counting@5"),
    }  # fmt: skip
    for row in report["rows"]:
        setting = "default" if row["setting"] == "any" else row["setting"]
        values = samples[f"rewards/{setting}/{row['reward']}"]
        for i, attribute in enumerate(ATTRIBUTES):
            per_prompt = [(values[ids == p], correct[ids == p, i]) for p in range(6)]
            value, used = mean_per_prompt_auroc(per_prompt)
            assert row["prompts"][attribute] == used
            assert row["auroc"][attribute] == (None if used == 0 else pytest.approx(value))
    assert report["alignment"]["count"] == pytest.approx(correct[:, 0].mean())
    assert "| `textnorm` | counting@5 |" in res.stdout
