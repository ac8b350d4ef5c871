"""The naive baseline: FastAPI + eager `transformers` CLIP, one request at a time.

What most hand-written reward servers look like: an `async def` endpoint that decodes the
base64 images, runs the Hugging Face processor and tokenizer, and calls the model inline — so the
event loop serves exactly one request at a time, with no batching across requests and no caching.
Torch uses every core. It returns the raw CLIP cosine only (no TextNorm) in the gateway's shape:

    POST /v1/score {"items": [{"image": "<base64>", "prompt": "..."}], ...}
        → {"results": [{"raw": float}, ...]}

Fields it does not use (``textnorm``, ``request_id``) are accepted and ignored, so the benchmark
sends every system the same body. ``GET /healthz`` answers once the model is loaded.
``--threads`` overrides torch's thread count (default: every core, as torch does by itself).
``--precision int8``: the model's Linear layers under torch's dynamic int8 quantization;
``--precision bf16``: inference under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (oneDNN's
AMX / AVX-512 BF16 kernels). Each is one line, what a user of such a server would try first: the
like-for-like baselines of an int8 or a bf16 export.

    python -m loadtest.baselines.naive_server --model DIR_OR_HUB_ID --port 8100
"""

from __future__ import annotations

import argparse
import base64
import io
import os
from collections.abc import Sequence

import torch
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, ConfigDict

from export.clip_model import ClipBundle, image_embeddings, load_clip, text_embeddings

CONTEXT_LENGTH = 77


class Item(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str
    prompt: str


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    items: list[Item]


def all_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def decode_image(b64: str) -> Image.Image:
    """A base64 PNG/JPEG/WebP → RGB PIL image."""
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def pixel_values(bundle: ClipBundle, images: Sequence[Image.Image]) -> torch.Tensor:
    """The HF image processor's CLIP preprocessing, [N, 3, S, S]."""
    return bundle.processor(images=list(images), return_tensors="pt")["pixel_values"]


def token_ids(bundle: ClipBundle, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the longest prompt of the batch (what `padding=True` gives)."""
    return bundle.tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=CONTEXT_LENGTH,
        return_tensors="pt",
    )["input_ids"]


PRECISIONS = ("fp32", "int8", "bf16")


@torch.inference_mode()
def raw_rewards(
    bundle: ClipBundle, pixels: torch.Tensor, ids: torch.Tensor, precision: str = "fp32"
) -> list[float]:
    """Cosine of each image with its own prompt (row i with row i); `precision` bf16: under
    CPU autocast to bfloat16."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        image = image_embeddings(bundle.model, pixels).float()
        text = text_embeddings(bundle.model, ids).float()
    return (image * text).sum(dim=-1).tolist()


def load_model(model: str, precision: str = "fp32") -> ClipBundle:
    """The CLIP checkpoint; with `precision` int8, every Linear quantized by torch (dynamic:
    int8 weights, activations quantized per call)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bundle = load_clip(model)
    if precision == "int8":
        bundle.model = torch.ao.quantization.quantize_dynamic(
            bundle.model, {torch.nn.Linear}, dtype=torch.qint8
        )
    return bundle


def create_app(model: str, threads: int | None = None, precision: str = "fp32") -> FastAPI:
    torch.set_num_threads(threads or all_cores())
    bundle = load_model(model, precision)
    app = FastAPI(title="naive CLIP reward server (baseline)")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> dict[str, list[dict[str, float]]]:
        # Inline, on the event loop: one request at a time, as such wrappers do.
        images = [decode_image(item.image) for item in body.items]
        raws = raw_rewards(
            bundle,
            pixel_values(bundle, images),
            token_ids(bundle, [i.prompt for i in body.items]),
            precision,
        )
        return {"results": [{"raw": r} for r in raws]}

    return app


def server_arguments(
    description: str, default_port: int, argv: Sequence[str] | None
) -> argparse.Namespace:
    """--model, --host, --port, --threads and --precision: the command line of both baselines."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="CLIP checkpoint directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [all cores]")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="int8: torch dynamic int8 Linear layers; bf16: CPU autocast to bfloat16",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = server_arguments(__doc__.splitlines()[0], 8100, argv)
    import uvicorn

    app = create_app(args.model, args.threads, args.precision)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
