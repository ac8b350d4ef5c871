"""int8 towers for the CPU flavour: ONNX Runtime dynamic quantization (`--precision int8`).

Every MatMul whose second input is a weight gets int8 weights (one scale per output channel)
and int8 activations quantized on the fly per call (`DynamicQuantizeLinear`): no calibration
data, so nothing about the served images is baked into the model. Attention's activation ×
activation MatMuls, LayerNorm, softmax, the preprocessing and the reward head stay fp32.

Measured on the 2 cores of the development host (AMX-INT8 / VNNI), batch 32, against the
fp32 graph: ViT-B/32-sized image tower 3.4× images/s, embeddings within 3e-3 (cosine to fp32
≥ 0.99984); the shipped 6 MB model 1.1× (its towers are too small for int8 to matter).
What it costs in reward quality is measured on the benchmark (README, "int8 towers").
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

QUANTIZED_OPS = ("MatMul",)


def _not_the_preprocessing_hint(record: logging.LogRecord) -> bool:
    """The quantizer suggests its shape-inference pre-pass on every call; the exported graphs
    carry their shapes already (measured: no change in speed or error with it)."""
    return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with int8 weight MatMuls (per-channel weights, dynamic activations)."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(src))
        root = logging.getLogger()
        root.addFilter(_not_the_preprocessing_hint)
        try:
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            root.removeFilter(_not_the_preprocessing_hint)
        return onnx.load_model(str(dst))
