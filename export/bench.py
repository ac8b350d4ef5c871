"""`reward-service bench encoders`: image-encoder throughput, PyTorch eager vs ONNX Runtime.

Both paths start from the same uint8 images, so preprocessing is included in both: the HF
image processor + torch model, and the exported graph (preprocessing in-graph) under ONNX
Runtime. Images/s is the median over several timed runs after a warm-up. This is the in-process
ceiling that serving benchmarks are compared against.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.clip_model import ClipBundle, image_embeddings

BATCH_SIZES = (1, 8, 32)


def _median_rate(fn: Callable[[], object], items: int, runs: int, min_seconds: float) -> float:
    fn()  # warm-up
    rates = []
    for _ in range(runs):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append(n * items / elapsed)
    return statistics.median(rates)


def bench_image_encoder(
    bundle: ClipBundle,
    onnx_path: Path,
    image_px: int = 256,
    runs: int = 5,
    min_seconds: float = 0.5,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    bf16: bool = False,
) -> dict[str, dict[int, float]]:
    """{"torch": {batch: images/s}, "onnxruntime": {...}} on random uint8 images, and
    "max_abs_diff_onnxruntime": {batch: max |Δ|} of its unit embeddings to torch's.

    `bf16`: also torch under bf16 autocast ("torch_bf16", and "max_abs_diff_torch_bf16" to the
    fp32 embeddings) — on CPUs with AMX-BF16 the reach of a lower-precision flavour, which the
    served fp32 paths do not use (they keep rewards within 1e-4 of the reference)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    names = ["torch", "onnxruntime", "max_abs_diff_onnxruntime"]
    if bf16:
        names += ["torch_bf16", "max_abs_diff_torch_bf16"]
    out: dict[str, dict[int, float]] = {name: {} for name in names}
    for b in batch_sizes:
        images = rng.integers(0, 256, (b, image_px, image_px, 3), dtype=np.uint8)
        px = bundle.processor(images=list(images), return_tensors="pt")["pixel_values"]

        def eager(images=images) -> torch.Tensor:
            px = bundle.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return image_embeddings(bundle.model, px)

        def onnx(images=images) -> list:
            return session.run(None, {"IMAGE": images})

        def eager_bf16(images=images) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return eager(images).float()

        out["torch"][b] = _median_rate(eager, b, runs, min_seconds)
        out["onnxruntime"][b] = _median_rate(onnx, b, runs, min_seconds)
        reference = image_embeddings(bundle.model, px).numpy()
        out["max_abs_diff_onnxruntime"][b] = float(np.abs(onnx()[0] - reference).max())
        if bf16:
            out["torch_bf16"][b] = _median_rate(eager_bf16, b, runs, min_seconds)
            low = eager_bf16().numpy()
            out["max_abs_diff_torch_bf16"][b] = float(np.abs(low - reference).max())
    return out


def vit_b32_checkpoint(out: Path, like: ClipBundle) -> Path:
    """A ViT-B/32-sized CLIP with random weights (OpenAI's shapes: 224 px, patch 32, 12 layers
    of width 768 / 512), saved with `like`'s tokenizer and a 224-px processor."""
    from transformers import CLIPConfig, CLIPModel

    from export.clip_model import ClipBundle as Bundle
    from export.clip_model import image_processor, save_clip

    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(like.tokenizer),
            "bos_token_id": like.tokenizer.bos_token_id,
            "eos_token_id": like.tokenizer.eos_token_id,
            "pad_token_id": like.tokenizer.eos_token_id,
        },
        vision_config={"image_size": 224, "patch_size": 32},
        projection_dim=512,
    )
    save_clip(Bundle(CLIPModel(config).eval(), like.tokenizer, image_processor(224), "random"), out)
    return out
