"""`config.pbtxt` for each model of the contract, in the CPU or the GPU flavour.

Every config comes from the same `ModelSpec`, so tensor names, shapes and batching settings are
identical; only the backend and instance kind differ:
- cpu, `config.pbtxt`: Triton's native `onnxruntime_onnx` backend on KIND_CPU (the NGC
  `tritonserver` image on a CPU-only node); a bf16 export's towers run in its Python backend
  (as in the bundled server, with the `openvino` package the triton image adds);
- cpu, `configs/bundled.pbtxt`: the Python backend running ONNX Runtime or OpenVINO
  (`model_repository/python_onnx/model.py`, its `runtime` parameter), the only backend the
  pip-bundled `tritonserver` has; that server is started with `--model-config-name=bundled`;
- gpu: `tensorrt_plan` for the towers, `onnxruntime_onnx` on the GPU for what must stay fp32 or
  TensorRT does not take (the reward head, the image preprocessing).

Each config of an export carries the repository's content hash as the parameter
`EXPORT_HASH_PARAMETER`; the gateway reads it back from Triton and refuses to serve a model
whose hash is not the one its provenance names.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.model_contract import EXPORT_HASH_PARAMETER, ModelSpec, Tensor
from service.onnx_models import ONNX_RUNTIME, Runtime


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 64
    preferred: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 500
    instances: int = 1  # Triton instances of every model
    intra_op_threads: int = 0  # ONNX Runtime or OpenVINO threads per instance (CPU; 0 = all)


def _dims(dims: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in dims)


def _tensor(t: Tensor) -> str:
    return f'  {{ name: "{t.name}" data_type: {t.triton_dtype} dims: [ {_dims(t.dims)} ] }}'


def _io(spec: ModelSpec) -> str:
    inputs = ",\n".join(_tensor(t) for t in spec.inputs)
    outputs = ",\n".join(_tensor(t) for t in spec.outputs)
    return f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"


def _batching(b: Batching, preferred: bool = True) -> str:
    pref = [p for p in b.preferred if p <= b.max_batch_size]
    line = f"  preferred_batch_size: [ {_dims(tuple(pref))} ]\n" if preferred and pref else ""
    return (
        f"dynamic_batching {{\n{line}  max_queue_delay_microseconds: {b.max_queue_delay_us}\n}}\n"
    )


def model_config(
    spec: ModelSpec,
    backend: str,
    batching: Batching,
    kind: str = "KIND_CPU",
    params: dict[str, str] | None = None,
) -> str:
    """One model's config.pbtxt. `backend`: python | onnxruntime | tensorrt."""
    head = {
        "python": 'backend: "python"\n',
        "onnxruntime": 'platform: "onnxruntime_onnx"\n',
        "tensorrt": 'platform: "tensorrt_plan"\n',
    }[backend]
    text = f'name: "{spec.name}"\n{head}max_batch_size: {batching.max_batch_size}\n'
    text += _io(spec) + _batching(batching)
    text += f"instance_group [ {{ kind: {kind} count: {batching.instances} }} ]\n"
    return text + "".join(_parameter(k, v) for k, v in (params or {}).items())


def _parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def python_onnx_config(spec: ModelSpec, batching: Batching, runtime: Runtime = ONNX_RUNTIME) -> str:
    """Bundled CPU server: `model_repository/python_onnx/model.py` running `model.onnx` under
    `runtime`."""
    params = {"onnx_file": "model.onnx", "intra_op_threads": str(batching.intra_op_threads)}
    return model_config(spec, "python", batching, "KIND_CPU", params | runtime.parameters())


def native_cpu_config(spec: ModelSpec, batching: Batching, runtime: Runtime = ONNX_RUNTIME) -> str:
    """NGC server on a CPU node: the native onnxruntime backend runs the same `model.onnx`.
    OpenVINO towers (bf16) go through the Python backend there too, with the `openvino` package
    the triton image installs: Triton's native openvino backend fixes the batch at
    `max_batch_size` (`ov::set_batch`) and refuses, or pads to it, every smaller batch."""
    if runtime.name == "openvino":
        return python_onnx_config(spec, batching, runtime)
    params = {"intra_op_thread_count": str(batching.intra_op_threads)}
    return model_config(spec, "onnxruntime", batching, "KIND_CPU", params)


def gpu_config(spec: ModelSpec, backend: str, batching: Batching) -> str:
    return model_config(spec, backend, batching, "KIND_GPU")


def with_export_hash(config: str, export_sha256: str) -> str:
    """`config` with the repository's content hash as a parameter (the gateway checks it)."""
    return config + _parameter(EXPORT_HASH_PARAMETER, export_sha256)


def ensemble_config(
    name: str,
    spec: ModelSpec,
    steps: list[tuple[str, dict[str, str], dict[str, str]]],
    max_batch: int,
) -> str:
    """An ensemble: `steps` are (model, {model input: ensemble tensor}, {model output: tensor})."""
    text = f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n' + _io(spec)
    parts = []
    for model, inputs, outputs in steps:
        ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
        parts.append(f'  {{ model_name: "{model}" model_version: -1 {ins} {outs} }}')
    return text + "ensemble_scheduling {\n step [\n" + ",\n".join(parts) + "\n ]\n}\n"
