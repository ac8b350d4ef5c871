"""The in-process ONNX Runtime sessions (`service.onnx_models.OrtModel`: the gateway's `--onnx`
backend, `verify`, the benchmark's ceiling) are configured as Triton's Python-backend model
(`model_repository/python_onnx/model.py`) configures its own: idle threads sleep."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.onnx_models import SPINNING_CONFIG_KEYS, OrtModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def doubling_model(tmp_path: Path) -> Path:
    """Y = X + X, float32 [N]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "X"], ["Y"])],
        "double",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def _spinning(session) -> dict[str, str]:
    options = session.get_session_options()
    return {key: options.get_session_config_entry(key) for key in SPINNING_CONFIG_KEYS}


def _triton_model_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """`python_onnx/model.py`, imported with a stand-in for the module only Triton's stub has."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("pb_utils"))
    path = ROOT / "model_repository" / "python_onnx" / "model.py"
    spec = importlib.util.spec_from_file_location("python_onnx_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_process_sessions_do_not_spin(doubling_model: Path) -> None:
    model = OrtModel(doubling_model, threads=2)
    assert _spinning(model.session) == dict.fromkeys(SPINNING_CONFIG_KEYS, "0")
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(model.run({"X": x})[0], 2 * x)


def test_in_process_sessions_match_tritons(doubling_model: Path, monkeypatch) -> None:
    run, _errors, _precision = _triton_model_module(monkeypatch)._onnxruntime(
        str(doubling_model), 2
    )
    triton_session = run.__self__
    assert _spinning(triton_session) == _spinning(OrtModel(doubling_model, threads=2).session)
    assert triton_session.get_session_options().intra_op_num_threads == 2
