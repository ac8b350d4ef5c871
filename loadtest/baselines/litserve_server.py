"""The dynamic-batching baseline: the same eager `transformers` CLIP behind LitServe.

One inference worker on the CPU, dynamic batching over requests (``max_batch_size=32``,
``batch_timeout=0.01`` s), torch on every core, raw CLIP cosine only (no TextNorm), the gateway's
JSON shape at ``POST /v1/score`` (``GET /health`` is LitServe's own readiness check). The stages:

- ``decode_request``: one request's base64 images → HF processor pixels, and its prompts;
- ``batch``: the requests of a batch → one pixel tensor, one tokenised prompt batch (padded to the
  batch's longest prompt), and the item count of each request;
- ``predict``: one image-tower and one text-tower forward over the whole batch → cosines;
- ``unbatch``: the cosines split back per request; ``encode_response``: ``{"results": [...]}``.

LitServe's queue timeout (30 s by default) is disabled: at high concurrency with several images
per request a closed-loop client legitimately queues longer, and a 504 there would measure the
setting, not the server.

``--threads`` overrides torch's thread count in the worker (default: every core);
``--precision int8 | bf16`` as the naive baseline's (torch dynamic int8 Linear layers, or CPU
autocast to bfloat16).

    python -m loadtest.baselines.litserve_server --model DIR_OR_HUB_ID --port 8200
"""

from collections.abc import Sequence

import litserve as ls
import torch

from loadtest.baselines.naive_server import (
    ScoreRequest,
    all_cores,
    decode_image,
    load_model,
    pixel_values,
    raw_rewards,
    server_arguments,
    token_ids,
)

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.01

Decoded = tuple[torch.Tensor, list[str]]  # one request: pixels [n, 3, S, S], its n prompts
Batched = tuple[torch.Tensor, torch.Tensor, list[int]]  # pixels, token ids, items per request


class ClipRewardAPI(ls.LitAPI):
    """Raw CLIP reward of (image, prompt) items; requests batched by LitServe."""

    def __init__(self, model: str, threads: int | None = None, precision: str = "fp32") -> None:
        super().__init__(
            max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/v1/score"
        )
        self.model_source = model  # loaded in `setup`, inside the inference worker
        self.threads = threads
        self.precision = precision

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads or all_cores())
        self.bundle = load_model(self.model_source, self.precision)

    # LitServe reads this annotation to type the endpoint's body (so no postponed annotations
    # in this module): FastAPI parses the JSON into a ScoreRequest in the API server process.
    def decode_request(self, request: ScoreRequest) -> Decoded:
        images = [decode_image(item.image) for item in request.items]
        return pixel_values(self.bundle, images), [item.prompt for item in request.items]

    def batch(self, inputs: list[Decoded]) -> Batched:
        pixels = torch.cat([p for p, _ in inputs])
        prompts = [text for _, texts in inputs for text in texts]
        return pixels, token_ids(self.bundle, prompts), [len(texts) for _, texts in inputs]

    def predict(self, x: Batched) -> tuple[list[float], list[int]]:
        pixels, ids, sizes = x
        return raw_rewards(self.bundle, pixels, ids, self.precision), sizes

    def unbatch(self, output: tuple[list[float], list[int]]) -> list[list[float]]:
        raws, sizes = output
        parts, start = [], 0
        for n in sizes:
            parts.append(raws[start : start + n])
            start += n
        return parts

    def encode_response(self, output: list[float]) -> dict[str, list[dict[str, float]]]:
        return {"results": [{"raw": r} for r in output]}


def main(argv: Sequence[str] | None = None) -> None:
    args = server_arguments(__doc__.splitlines()[0], 8200, argv)
    api = ClipRewardAPI(args.model, args.threads, args.precision)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=False)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
