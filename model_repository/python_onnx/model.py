"""Triton Python-backend model that runs one ONNX file with ONNX Runtime (the CPU flavour).

The bundled `tritonserver` only has the Python backend, so on CPU every model of the repository
is this file next to its `model.onnx`. Dynamic batching hands `execute` several requests at
once: requests whose inputs share a shape past the batch dimension are concatenated into one
ONNX Runtime call and split back, so batching really reaches the model. Inputs and outputs are
the names in `config.pbtxt`; nothing here is specific to one model.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        # Several models share the CPU inside one server: idle ONNX Runtime threads must sleep,
        # not spin, or they starve the other models' processes under load.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            os.path.join(version_dir, params.get("onnx_file", "model.onnx")),
            options,
            providers=["CPUExecutionProvider"],
        )
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
        results = self.session.run(self.outputs, feeds)
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
        except (
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
        ) as exc:
            code = pb_utils.TritonError.INVALID_ARG
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"onnxruntime: {exc}", code)
            )
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {exc}"))
