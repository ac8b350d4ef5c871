"""ONNX → TensorRT engines for the GPU flavour, built where they run, through a cache.

`reward-service export --target gpu` writes the ONNX files and `engines.json` (which engines,
profiles, precision); `build_engines` (`reward-service build-engines REPO --cache DIR`, run on
the GPU node, e.g. in an init container) builds each engine into the repository. An engine is
specific to the GPU model and the TensorRT version, so the cache is keyed by GPU name +
TensorRT version + ONNX hash (+ precision and profiles): a pod on the same kind of node reuses
it, any other gets a fresh build. Needs the `tensorrt` package (the `gpu` extra) and an NVIDIA
GPU; without them the error is one line (`TensorRTUnavailable`). The TensorRT version must match
the Triton server that loads the engines (TensorRT 10.5 for the 24.10 NGC image).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ENGINES_FILE = "engines.json"  # written by export --target gpu


class TensorRTUnavailable(ValueError):
    """No TensorRT or no GPU here; the message says which (a user error, not a crash)."""


@dataclass(frozen=True)
class Profile:
    """Shapes (batch included) of one input: min / opt / max."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


# The text encoder's variable token dimension: min, opt (a typical prompt set), max (CLIP's 77).
TOKEN_RANGE = (2, 16, 77)


def batch_profile(
    item_dims: tuple[int, ...], max_batch: int, opt: int = 32, variable=TOKEN_RANGE
) -> Profile:
    """Batch from 1 to `max_batch` (optimised for `opt`); a variable item dimension (-1, the
    text encoder's tokens) over `variable` = (min, opt, max)."""

    def dims(i: int) -> tuple[int, ...]:
        return tuple(variable[i] if d == -1 else d for d in item_dims)

    return Profile((1, *dims(0)), (min(opt, max_batch), *dims(1)), (max_batch, *dims(2)))


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed: --target gpu needs the tensorrt package and an NVIDIA GPU "
            "(build inside the NGC Triton or TensorRT container)"
        ) from exc
    if shutil.which("nvidia-smi") is None:
        raise TensorRTUnavailable("no NVIDIA GPU found (nvidia-smi is missing): use --target cpu")
    return trt


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profiles: dict[str, Profile],
    fp16: bool = True,
    timing_cache: Path | None = None,
    workspace_gb: float = 4.0,
) -> None:
    """Parse `onnx_path`, build a serialized engine into `plan_path`."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT ≥ 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    else:  # TensorRT computes fp32 layers in TF32 (10-bit mantissa) unless told not to
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(engine))
    if cache is not None and timing_cache is not None:  # atomic: builders may share the cache
        partial = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.partial")
        partial.write_bytes(bytes(cache.serialize()))
        partial.rename(timing_cache)


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def gpu_name() -> str:
    """The first GPU's product name (e.g. "NVIDIA H200"), from nvidia-smi."""
    _tensorrt()
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        raise TensorRTUnavailable(f"nvidia-smi found no GPU: {out.stderr.strip()[:200]}")
    return names[0]


def engine_key(gpu: str, trt_version: str, onnx_sha256: str, entry: dict) -> str:
    """Cache key of one engine: what makes a serialized engine valid or different."""
    payload = {
        "gpu": gpu,
        "tensorrt": trt_version,
        "onnx_sha256": onnx_sha256,
        "precision": entry["precision"],
        "tf32": entry["precision"] != "fp32",  # fp32 engines built before had TF32 on
        "profiles": entry["profiles"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


Builder = Callable[..., None]  # build_engine's signature


def build_engines(
    repo: Path,
    cache_dir: Path,
    *,
    builder: Builder | None = None,
    gpu: str | None = None,
    trt_version: str | None = None,
) -> list[dict]:
    """Build (or take from `cache_dir`) every engine `repo/engines.json` lists, into `repo`.

    Each ONNX file must still have the hash provenance.json recorded (an engine is never built
    from a file the export did not write). Returns one report per engine: model, key, reused.
    `builder`, `gpu` and `trt_version` default to TensorRT and this machine's GPU."""
    from export.repository import read_provenance, sha256_file
    from service.model_contract import version_dir

    repo, cache_dir = Path(repo), Path(cache_dir)
    spec = repo / ENGINES_FILE
    if not spec.is_file():
        raise ValueError(f"{repo} lists no engines (no {ENGINES_FILE}): export with --target gpu")
    if builder is None:
        trt = _tensorrt()
        builder, trt_version = build_engine, trt_version or trt.__version__
    gpu = gpu or gpu_name()
    assert trt_version is not None
    artifacts = (read_provenance(repo) or {}).get("artifacts") or {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    timing = (
        cache_dir / f"timing-{hashlib.sha256(f'{gpu}|{trt_version}'.encode()).hexdigest()[:16]}"
    )
    reports = []
    for entry in json.loads(spec.read_text()):
        folder = version_dir(repo, entry["model"])
        onnx_path = folder / entry["onnx"]
        onnx_sha = sha256_file(onnx_path)
        rel = str(onnx_path.relative_to(repo))
        if artifacts.get(rel) != onnx_sha:
            raise ValueError(f"{rel} does not match provenance.json: re-export {repo}")
        key = engine_key(gpu, trt_version, onnx_sha, entry)
        cached = cache_dir / f"{key}.plan"
        reused = cached.is_file()
        if not reused:
            partial = cache_dir / f".{key}.{os.getpid()}.partial"
            profiles = {
                name: Profile(**{k: tuple(v) for k, v in p.items()})
                for name, p in entry["profiles"].items()
            }
            builder(
                onnx_path, partial, profiles, fp16=entry["precision"] == "fp16", timing_cache=timing
            )
            partial.rename(cached)  # atomic: a concurrent builder never reads half an engine
        shutil.copyfile(cached, folder / entry["plan"])
        reports.append({"model": entry["model"], "key": key, "reused": reused})
    return reports
