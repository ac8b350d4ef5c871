"""ONNX → TensorRT engines (`--target gpu`), with batch optimisation profiles and a timing cache.

Needs the `tensorrt` Python package and an NVIDIA GPU (the NGC TensorRT/Triton containers have
both). Without them `build_engine` raises `TensorRTUnavailable` with a one-line reason. The
engine's TensorRT version must match the Triton server that loads it: build inside the same
container release.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


class TensorRTUnavailable(ValueError):
    """No TensorRT or no GPU here; the message says which (a user error, not a crash)."""


@dataclass(frozen=True)
class Profile:
    """Shapes (batch included) of one input: min / opt / max."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def batch_profile(item_dims: tuple[int, ...], max_batch: int, opt: int = 32) -> Profile:
    """Profile over the batch dimension only: min 1, opt `opt` (≤ max), max `max_batch`."""
    return Profile((1, *item_dims), (min(opt, max_batch), *item_dims), (max_batch, *item_dims))


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
    if cache is not None and timing_cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__
