"""One exported model file, run in this process the way its repository serves it.

A CPU export names, in each model's bundled config (`configs/bundled.pbtxt`), the runtime that
serves the model's `model.onnx`:
- `onnxruntime`: fp32 and int8 exports, and the reward head of every export;
- `openvino` at `inference_precision` bf16: the towers of a `--precision bf16` export. The
  ONNX file is the fp32 one; OpenVINO runs its MatMuls in bfloat16 on CPUs with AMX or
  AVX-512 BF16 (and in fp32 elsewhere: `OpenVinoModel.effective_precision` says which).

The gateway's in-process backend (`gateway --onnx`), `verify` and the benchmark's ceiling open
models here, so they run what Triton runs (`model_repository/python_onnx/model.py` makes the same
choice inside Triton). Both runtimes are imported only when a model needs them. Torch-free.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service import model_contract as contract

RUNTIMES = ("onnxruntime", "openvino")
OPENVINO_PRECISIONS = ("f32", "bf16")  # OpenVINO's names for its inference precision hint
# ONNX Runtime's session config keys that let idle pool threads spin before they sleep
SPINNING_CONFIG_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
# `parameters { key: "K" value { string_value: "V" } }`, with or without the optional colons
_PARAMETER = re.compile(
    r'parameters\s*:?\s*\{\s*key:\s*"([^"]+)"\s*value\s*:?\s*\{\s*string_value:\s*"([^"]*)"'
)


@dataclass(frozen=True)
class Runtime:
    """How one model's `model.onnx` is run: the bundled config's `runtime` and
    `inference_precision` parameters."""

    name: str = "onnxruntime"  # onnxruntime | openvino
    inference_precision: str = "f32"  # openvino only: f32 | bf16

    def __post_init__(self) -> None:
        if self.name not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.name!r}")
        if self.inference_precision not in OPENVINO_PRECISIONS:
            raise ValueError(
                f"inference_precision must be one of {', '.join(OPENVINO_PRECISIONS)}, "
                f"got {self.inference_precision!r}"
            )
        if self.name == "onnxruntime" and self.inference_precision != "f32":
            raise ValueError("ONNX Runtime runs the file as it is: inference_precision f32")

    def parameters(self) -> dict[str, str]:
        """The bundled config's parameters that name this runtime."""
        return {"runtime": self.name, "inference_precision": self.inference_precision}


ONNX_RUNTIME = Runtime()
OPENVINO_BF16 = Runtime("openvino", "bf16")


class OnnxModel(Protocol):
    """An opened model: `run` takes feeds by input name and returns the outputs in order."""

    runtime: str  # onnxruntime | openvino
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtModel:
    """ONNX Runtime's CPU provider; `threads` intra-op threads (0: every core).

    Idle threads sleep instead of spinning, as in the bundled Triton's Python backend
    (`python_onnx/model.py`; the NGC image's native onnxruntime backend has no per-session
    switch for it and keeps ONNX Runtime's default): every session has its own pool,
    and a pool that spins after its call takes the cores from the next session's call. With
    spinning, an image call followed by a text call (ViT-B/32, batch 1, 2 cores) took
    113–119 ms against 65 ms without, while each call alone took the same either way."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        for pool in SPINNING_CONFIG_KEYS:
            options.add_session_config_entry(pool, "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(self.output_names), feeds)


class OpenVinoModel:
    """OpenVINO's CPU plugin at `precision` (one stream, latency hint: Triton batches for it).
    Thread-safe: every call gets its own infer request."""

    runtime = "openvino"

    def __init__(self, path: Path, precision: str = "bf16", threads: int = 0) -> None:
        import openvino as ov

        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": precision,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # as in Triton (`python_onnx/model.py`)
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.input_names = tuple(p.get_any_name() for p in self.compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self.compiled.outputs)
        # what the CPU really runs: bf16 only where the CPU has native bfloat16
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.effective_precision = hint.get_type_name()  # "bf16" or "f32"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.compiled.create_infer_request().infer(feeds)
        return [np.asarray(results[port]) for port in self.compiled.outputs]


def open_model(path: Path, runtime: Runtime = ONNX_RUNTIME, threads: int = 0) -> OnnxModel:
    """`path` (an ONNX file) under `runtime`; a clear error when that runtime is not installed."""
    if importlib.util.find_spec(runtime.name) is None:
        raise ValueError(
            f"{path} runs on {runtime.name}, which is not installed: pip install {runtime.name} "
            "(the `triton` or `export` extra of textnorm-reward-service has it)"
        )
    if runtime.name == "openvino":
        return OpenVinoModel(path, runtime.inference_precision, threads)
    return OrtModel(path, threads)


def served_runtime(repository: Path, model: str) -> Runtime:
    """The runtime `model`'s bundled config names (repositories exported before the runtime
    parameter existed: ONNX Runtime)."""
    config = Path(repository) / model / "configs" / f"{contract.BUNDLED_CONFIG_NAME}.pbtxt"
    params = dict(_PARAMETER.findall(config.read_text())) if config.is_file() else {}
    return Runtime(
        params.get("runtime", ONNX_RUNTIME.name),
        params.get("inference_precision", ONNX_RUNTIME.inference_precision),
    )


def open_served_model(repository: Path, model: str, threads: int = 0) -> OnnxModel:
    """`model` of an exported CPU repository, under the runtime its repository serves it with."""
    path = contract.version_dir(Path(repository), model) / "model.onnx"
    if not path.is_file():
        raise ValueError(f"not an exported repository (missing {path})")
    return open_model(path, served_runtime(repository, model), threads)
