"""The direct-gRPC BLS model's own bookkeeping (model_repository/score/model.py), with a
stand-in for Triton's `triton_python_backend_utils`; the model served by the real Triton:
tests/test_serving.py."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np

from tests.conftest import REPO_ROOT

EOS, D = 9, 8


def _score_model(monkeypatch, cache_entries: int = 100):
    utils = types.ModuleType("triton_python_backend_utils")
    utils.TRITONSERVER_MEMORY_CPU = 1
    utils.PreferredMemory = lambda kind, device: (kind, device)
    utils.sent = []  # every nested request's arguments

    rng = np.random.default_rng(0)

    class InferenceRequest:  # a text encoder answering random embeddings
        def __init__(self, **kwargs) -> None:
            utils.sent.append(kwargs)
            self.ids = dict(kwargs["inputs"])["INPUT_IDS"]

        def exec(self):
            out = rng.standard_normal((len(self.ids), D)).astype(np.float32)
            return types.SimpleNamespace(has_error=lambda: False, outputs={"TEXT_EMBEDS": out})

    utils.InferenceRequest = InferenceRequest
    utils.Tensor = lambda name, value: (name, value)
    utils.get_output_tensor_by_name = lambda response, name: types.SimpleNamespace(
        as_numpy=lambda: response.outputs[name]
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    path = REPO_ROOT / "model_repository" / "score" / "model.py"
    spec = importlib.util.spec_from_file_location("score_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    params = {"eos_token_id": EOS, "vocab_size": 100, "token_bucket": 4,
              "text_cache_entries": cache_entries, "text_max_batch": 64}  # fmt: skip
    config = {"parameters": {k: {"string_value": str(v)} for k, v in params.items()}, "output": []}
    model.initialize({"model_config": json.dumps(config)})
    return module, model


def test_text_cache_entries_own_their_rows_and_bls_calls_ask_for_host_memory(monkeypatch):
    """A cached embedding is a copy, not a row view of its batch's array (one reused row kept
    the whole batch alive: ~4 MB per batch at max batch 64, unbounded by the entry limit);
    the nested calls ask for host memory (the GPU flavour's TensorRT outputs are on the GPU)."""
    module, model = _score_model(monkeypatch)
    utils = module.pb_utils
    rows = np.full((6, 77), EOS, np.int64)
    rows[:, 0] = 1
    rows[:, 1] = np.arange(10, 16)
    first = model._text_embeddings(rows)
    (sent,) = utils.sent
    assert sent["model_name"] == "text_encoder" and sent["preferred_memory"] == (1, 0)
    assert all(value.base is None and value.flags.owndata for value in model.cache.values())
    again = model._text_embeddings(rows[::-1])  # from the cache, in the asked order
    assert len(utils.sent) == 1 and np.array_equal(again, first[::-1])
