"""Triton Python-backend model that runs one ONNX file on the CPU (the CPU flavour).

The bundled `tritonserver` only has the Python backend, so on CPU every model of the repository
is this file next to its `model.onnx`. The config's `runtime` parameter picks the runtime:
`onnxruntime` (default), or `openvino` with `inference_precision` bf16 (a `--precision bf16`
export's towers: bfloat16 MatMuls on CPUs with AMX / AVX-512 BF16; `service/onnx_models.py` runs
the same choice in process). Only the chosen runtime is imported, so the NGC image, which runs
bf16 towers through this file too, needs `openvino` and not `onnxruntime`. Dynamic batching
hands `execute` several requests at once: requests whose inputs share a shape past the batch
dimension are concatenated into one call and split back, so batching really reaches the model.
Inputs and outputs are the names in `config.pbtxt`; nothing here is specific to one model.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _onnxruntime(path, threads):
    """(run(outputs, feeds) → arrays, the error types of a bad input, the precision it runs
    in), by ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Several models share the CPU inside one server: idle ONNX Runtime threads must sleep,
    # not spin, or they starve the other models' processes under load.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    state = ort.capi.onnxruntime_pybind11_state
    return session.run, (state.InvalidArgument, state.InvalidGraph), "as the file"


def _openvino(path, threads, precision):
    """(run(outputs, feeds) → arrays, no input-error types: OpenVINO raises RuntimeError for
    everything, the precision it runs in: bf16 only on CPUs with native bfloat16), by
    OpenVINO's CPU plugin at `precision` (one stream)."""
    import openvino as ov

    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        # Unpinned, as ONNX Runtime's threads: pinned threads stall behind the gateway's and
        # the other models' work on the same cores (measured: README "bf16 towers").
        "ENABLE_CPU_PINNING": False,
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    effective = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run(outputs, feeds):  # one instance runs one batch at a time: one request suffices
        results = request.infer(feeds)
        return [np.asarray(results[name]) for name in outputs]

    return run, (), effective


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        threads = int(params.get("intra_op_threads", "0"))
        runtime = self.runtime = params.get("runtime", "onnxruntime")
        if runtime == "openvino":
            precision = params.get("inference_precision", "f32")
            self.run, self.input_errors, effective = _openvino(path, threads, precision)
        elif runtime == "onnxruntime":
            self.run, self.input_errors, effective = _onnxruntime(path, threads)
        else:
            raise pb_utils.TritonModelException(f"unknown runtime {runtime!r}")
        name = args["model_name"]
        pb_utils.Logger.log_info(f"{name}: runtime {runtime}, inference precision {effective}")
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def _run(self, requests):
        feeds = {
            name: np.concatenate(
                [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            )
            for name in self.inputs
        }
        sizes = [
            pb_utils.get_input_tensor_by_name(r, self.inputs[0]).as_numpy().shape[0]
            for r in requests
        ]
        results = self.run(self.outputs, feeds)
        responses, start = [], 0
        for n in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + n]))
                for name, value in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def execute(self, requests):
        # Group requests whose per-item input shapes agree (e.g. images of one size).
        groups = {}
        for index, request in enumerate(requests):
            key = tuple(
                pb_utils.get_input_tensor_by_name(request, name).as_numpy().shape[1:]
                for name in self.inputs
            )
            groups.setdefault(key, []).append(index)
        responses = [None] * len(requests)
        for indices in groups.values():
            try:
                batch = self._run([requests[i] for i in indices])
            except Exception:
                # One client's bad input must not fail the requests batched with it: retry alone.
                batch = [self._run_alone(requests[i]) for i in indices]
            for index, response in zip(indices, batch, strict=True):
                responses[index] = response
        return responses

    def _run_alone(self, request):
        try:
            return self._run([request])[0]
        except self.input_errors as exc:
            code = pb_utils.TritonError.INVALID_ARG
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{self.runtime}: {exc}", code)
            )
        except Exception as exc:  # OpenVINO raises RuntimeError for what it cannot run
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.runtime}: {exc}"))
