"""The `reward-service` CLI as a user runs it: outputs, files, and one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from shapes_world.scene import Caption, Scene
from tests.conftest import run_cli, run_cli_in_process


def test_world_render(tmp_path):
    out = tmp_path / "x.png"
    res = run_cli(
        "world",
        "render",
        "--out",
        str(out),
        "--count",
        "3",
        "--colour",
        "orange",
        "--shape",
        "cross",
        "--background",
        "brick",
        "--seed",
        "4",
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["prompt"] == "three orange crosses on a brick background"
    assert info["matches_prompt"] is True
    assert Image.open(out).size == (128, 128)


def test_world_render_mismatch_differs_in_one_attribute(tmp_path):
    res = run_cli(
        "world",
        "render",
        "--out",
        str(tmp_path / "m.png"),
        "--count",
        "2",
        "--mismatch",
        "colour",
        "--seed",
        "1",
    )
    info = json.loads(res.stdout)
    assert info["matches_prompt"] is False
    assert info["scene"]["groups"][0]["count"] == 2
    assert info["scene"]["groups"][0]["colour"] != "red"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--colour", "pink"], "unknown colour 'pink'"),
        (["--count", "0"], "count must be between 1 and 6, got 0"),
        (["--count", "7"], "count must be between 1 and 6, got 7"),
        (["--shape", "hexagon"], "unknown shape"),
        (["--mismatch", "size"], "unknown attribute"),
    ],
)
def test_world_render_bad_input_is_one_line(tmp_path, args, message):
    res = run_cli("world", "render", "--out", str(tmp_path / "x.png"), *args)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_world_sample_ground_truth(tmp_path):
    res = run_cli(
        "world",
        "sample",
        "--out",
        str(tmp_path),
        "--n",
        "6",
        "--kinds",
        "2",
        "--mismatched",
        "0.5",
        "--seed",
        "3",
    )
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in (tmp_path / "ground_truth.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for line in lines:
        scene = Scene.from_json(line["scene"])
        assert len(scene.groups) in (1, 2)
        assert np.asarray(Image.open(tmp_path / line["file"])).shape == (128, 128, 3)
        if line["matches_prompt"]:
            from shapes_world.grammar import describe

            assert describe(Caption.of(scene)) == line["prompt"]
    assert any(not x["matches_prompt"] for x in lines)


@pytest.mark.parametrize(
    "command",
    [
        ["eval"],
        ["calibrate", "--out", "{tmp}/calibration.json"],
        ["eval-ensemble"],
        ["train-head", "--out", "{tmp}/head"],
        ["export", "--out", "{tmp}/repo"],
        ["serve"],
    ],
    ids=lambda command: command[0],
)
def test_a_missing_model_dir_is_refused_before_torch_loads(tmp_path, command):
    """export/sources.py checks a local --model path first: one line, exit 2, and no seconds of
    torch imports (or, for `serve`, of an export subprocess) before it."""
    missing = tmp_path / "nope"
    args = [a.format(tmp=tmp_path) for a in command]
    code, torch_loaded, stderr = run_cli_in_process(*args, "--model", str(missing))
    assert (code, torch_loaded) == (2, False), stderr
    assert stderr.strip() == f"error: model directory not found: {missing}"
    assert not (tmp_path / "repo").exists() and not (tmp_path / "head").exists()


def test_an_empty_model_option_still_means_the_shipped_model():
    from export.sources import check_local_source

    check_local_source("")  # `--model "$UNSET"` in a script: the default, as before
    check_local_source(None)
    check_local_source("openai/clip-vit-base-patch32")  # a hub id is checked when it loads


def test_a_directory_that_is_no_checkpoint_is_refused_before_torch_loads(tmp_path):
    code, torch_loaded, stderr = run_cli_in_process("eval", "--model", str(tmp_path))
    assert (code, torch_loaded) == (2, False), stderr
    assert stderr.strip() == f"error: not a Hugging Face checkpoint (no config.json): {tmp_path}"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--algorithm", "ppo"], "error: unknown algorithm 'ppo'; known: ddpo, rwl"),
        (["--reward", "pickscore"], "error: unknown reward 'pickscore'; known: raw, textnorm"),
        (["--device", "tpu"], "error: device must be cpu or cuda, got 'tpu'"),
        (["--textnorm-scale", "-1"], "error: textnorm_scale must be > 0, got -1.0"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_a_bad_finetune_option_is_refused_before_torch_loads(tmp_path, option, message):
    """finetune/config.py checks the run's options first: one line, exit 2, no torch, no run
    directory."""
    code, torch_loaded, stderr = run_cli_in_process(
        "finetune", "run", "--run", f"{tmp_path}/r", *option
    )
    assert (code, torch_loaded) == (2, False), stderr
    assert stderr.startswith(message) and stderr.strip().count("\n") == 0, stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train-judge", "--device", "tpu"], "error: --device must be cpu or cuda, got 'tpu'"),
        (["train-generator", "--size", "48"], "error: --size must be one of 32, 64, 128, got 48"),
        (["finetune", "evaluate", "--device", "tpu"], "error: --device must be cpu or cuda"),
        (["finetune", "reward-signal", "--device", "tpu"], "error: --device must be cpu or cuda"),
    ],
    ids=["train-judge", "train-generator", "evaluate", "reward-signal"],
)
def test_the_training_commands_refuse_a_bad_option_before_torch_loads(args, message):
    code, torch_loaded, stderr = run_cli_in_process(*args)
    assert (code, torch_loaded) == (2, False), stderr
    assert stderr.startswith(message) and stderr.strip().count("\n") == 0, stderr


def test_finetune_compare_refuses_an_unknown_reward_before_torch_loads(tmp_path):
    args = ("finetune", "compare", "--out", f"{tmp_path}/c", "--rewards", "raw,pickscore")
    code, torch_loaded, stderr = run_cli_in_process(*args)
    assert (code, torch_loaded) == (2, False), stderr
    assert stderr.startswith("error: unknown reward 'pickscore'")


def test_finetune_against_an_unreachable_service_is_one_line_before_the_models_load(tmp_path):
    """The trainer asks the service first (GET /v1/models, after the client's retries): one
    line, exit 1, no traceback, and no run directory started."""
    res = run_cli("finetune", "run", "--run", str(tmp_path / "r"), "--url", "http://127.0.0.1:1")
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(
        "error: the reward service failed: unreachable: cannot reach http://127.0.0.1:1"
    )
    assert not (tmp_path / "r").exists()


def test_finetune_compare_with_jobs_checks_the_service_once_in_one_line(tmp_path):
    out = tmp_path / "c"
    res = run_cli(
        "finetune", "compare", "--out", str(out), "--jobs", "2", "--url", "http://127.0.0.1:1"
    )
    assert res.returncode == 1, res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("error: the reward service failed: unreachable")
    )
    assert "Traceback" not in res.stderr and not out.exists()


def test_finetune_compare_refuses_a_bad_seed_list_before_torch_loads(tmp_path):
    args = ("finetune", "compare", "--out", f"{tmp_path}/c", "--seeds", "0,x")
    code, torch_loaded, stderr = run_cli_in_process(*args)
    assert (code, torch_loaded) == (2, False), stderr
    assert stderr.strip() == "error: --seeds: expected comma-separated integers, got '0,x'"


def test_integer_lists_of_every_command_are_parsed_alike() -> None:
    """One parser for `--seeds`, `--judge-prompt-seeds`, bench's `--images`/`--concurrency`."""
    from loadtest.serving import parse_csv
    from service.cli_support import integer_list

    assert integer_list(" 0, 1,,2 ", "--seeds") == [0, 1, 2]
    with pytest.raises(ValueError, match=r"^--seeds: give at least one integer$"):
        integer_list(" , ", "--seeds")
    with pytest.raises(ValueError, match=r"^--seeds: expected comma-separated integers, got '1,a'"):
        integer_list("1,a", "--seeds")
    with pytest.raises(ValueError, match=r"^--images: values must be at least 1, got '2,0'$"):
        parse_csv("2,0", "images", integers=True)
    assert parse_csv("1,8,32", "concurrency", integers=True) == [1, 8, 32]


@pytest.mark.parametrize(
    ("status", "code", "line"),
    [
        (401, 2, "error: the reward service refused the request: HTTP 401: bad key"),
        (422, 2, "error: the reward service refused the request: HTTP 422: bad key"),
        (429, 1, "error: the reward service failed: HTTP 429: bad key"),
        (408, 1, "error: the reward service failed: HTTP 408: bad key"),
        (503, 1, "error: the reward service failed: HTTP 503: bad key"),
        (None, 1, "error: the reward service failed: unauthorized: bad key"),
    ],
)
def test_user_errors_makes_a_reward_service_error_one_line_and_lets_bugs_through(
    capsys, status: int | None, code: int, line: str
):
    """A request the service refused (4xx but 408/429) is the caller's to fix: exit 2, as for
    a bad option; one it could not answer after the retries is a failure: exit 1."""
    import typer
    from textnorm_reward_client import RewardServiceError

    from service.cli_support import user_errors

    @user_errors
    def failing(exc: Exception) -> None:
        raise exc

    error = RewardServiceError(status, {"error": {"code": "unauthorized", "message": "bad key"}})
    with pytest.raises(typer.Exit) as exit_info:
        failing(error)
    assert exit_info.value.exit_code == code
    assert capsys.readouterr().err == line + "\n"
    with pytest.raises(RuntimeError, match="a bug"):  # not every exception becomes a user error
        failing(RuntimeError("a bug"))


def test_serve_reports_the_exporters_error_once(tmp_path):
    """`serve` exports in a subprocess: its "error: ..." line is not prefixed a second time."""
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = run_cli("serve", "--model", str(bert))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: ") and "error: error:" not in res.stderr
    assert "is a 'bert' checkpoint, not CLIP" in res.stderr


def test_eval_json_on_shipped_model(shipped_model):
    res = run_cli("eval", "--json", "--prompts-per-category", "3", "--images-per-prompt", "20")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert list(report["clip"]) == ["counting", "color", "background", "object", "composition"]
    assert all(0.0 <= v <= 1.0 for v in report["clip"].values())


@pytest.mark.slow
def test_train_clip_tiny_run_gives_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "clip"
    res = run_cli(
        "train-clip",
        "--out",
        str(out),
        "--steps",
        "4",
        "--images",
        "256",
        "--batch-size",
        "32",
        "--seed",
        "1",
    )
    assert res.returncode == 0, res.stderr
    stats = json.loads((out / "training.json").read_text())
    assert stats["config"]["seed"] == 1 and stats["config"]["steps"] == 4
    from export.clip_model import load_clip

    bundle = load_clip(out)
    assert bundle.model.config.vision_config.image_size == 64
    assert bundle.tokenizer("two stars")["input_ids"][-1] == bundle.tokenizer.eos_token_id


def test_serve_refuses_a_gpu_repository_in_one_line(tmp_path):
    """The bundled CPU server cannot load TensorRT engines: say so before starting anything."""
    import json

    repo = tmp_path / "gpu-repo"
    repo.mkdir()
    (repo / "provenance.json").write_text(json.dumps({"options": {"target": "gpu"}}))
    res = run_cli("serve", "--repository", str(repo), timeout=60)
    assert res.returncode == 2
    assert "GPU-flavour export" in res.stderr and res.stderr.strip().count("\n") == 0


def test_another_model_gets_no_shipped_head_from_the_environment_or_the_option(monkeypatch):
    # The shipped head is trained on the shipped CLIP. `serve --model X` dropped it, but
    # REWARD_MODEL=X kept it, and the export refused the pair: serve exited 2 every time.
    from service.cli import _settings
    from service.settings import SHIPPED_HEAD_DIR, SHIPPED_MODEL_DIR, Settings

    other = str(SHIPPED_MODEL_DIR.parent / "shapes-clip-b")
    assert Settings().head == str(SHIPPED_HEAD_DIR)  # the shipped pair
    assert Settings(model=str(SHIPPED_MODEL_DIR) + "/").head == str(SHIPPED_HEAD_DIR)
    assert _settings(model="").head == str(SHIPPED_HEAD_DIR)  # `--model "$UNSET"`: the default
    monkeypatch.setenv("REWARD_MODEL", other)
    assert Settings().head is None
    assert _settings(port=9000).head is None
    monkeypatch.setenv("REWARD_HEAD", "/heads/for-b")  # one given explicitly stays
    assert Settings().head == "/heads/for-b"
    monkeypatch.delenv("REWARD_MODEL")
    monkeypatch.delenv("REWARD_HEAD")
    assert _settings(model="openai/clip-vit-base-patch32").head is None


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["serve"], "gateway bind address [default: 127.0.0.1]"),
        (["calibrate"], "({prompt: [contrastive,"),
        (["bench", "serving"], "[all cores]"),
    ],
)
def test_help_shows_the_defaults_written_in_brackets(command, shown):
    """Help texts are plain text: a "[default: …]" in an option's help is shown as written,
    not read as a markup tag and dropped."""
    done = run_cli(*command, "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    assert shown in " ".join(done.stdout.split()), done.stdout
