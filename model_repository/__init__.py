"""Triton model code that `reward-service export` copies into every repository (package data).

- `python_onnx/model.py`: the bundled CPU `tritonserver` has only the Python backend, so there
  each model is this file running its `model.onnx` with ONNX Runtime;
- `score/model.py`: the one-call BLS pipeline (images + token ids → every reward) for trainers
  that speak KServe v2 gRPC to Triton directly.

These files run inside Triton (they import `triton_python_backend_utils`): never import them.
"""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent
PYTHON_ONNX_MODEL = TEMPLATES_DIR / "python_onnx" / "model.py"
SCORE_MODEL = TEMPLATES_DIR / "score" / "model.py"
