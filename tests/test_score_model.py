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
    _, model = _score_model(monkeypatch)
    assert model.host == (1, 0)
    rng = np.random.default_rng(0)
    encoded: list[np.ndarray] = []

    def infer(name, inputs, outputs):
        out = rng.standard_normal((len(inputs["INPUT_IDS"]), D)).astype(np.float32)
        encoded.append(out)
        return {"TEXT_EMBEDS": out}

    model._infer = infer
    rows = np.full((6, 77), EOS, np.int64)
    rows[:, 0] = 1
    rows[:, 1] = np.arange(10, 16)
    first = model._text_embeddings(rows)
    assert np.array_equal(first, encoded[0])
    assert all(value.base is None and value.flags.owndata for value in model.cache.values())
    again = model._text_embeddings(rows[::-1])  # from the cache, in the asked order
    assert len(encoded) == 1 and np.array_equal(again, encoded[0][::-1])
