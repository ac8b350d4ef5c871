"""GPU checks for deploy/gpu-check.sh: fp16 TensorRT engines against their fp32 ONNX, and speed.

    python deploy/gpu_parity.py parity REPO [--report-only NAME,...]
    python deploy/gpu_parity.py bench-tower REPO [--batches 1,8,32,64] [--peak-tflops T]
    python deploy/gpu_parity.py bench-triton --url HOST:PORT --image-size S [--concurrency 8,32]
    python deploy/gpu_parity.py bench-torch [--towers vit-b32,vit-l14] [--batches 1,8,32,64,256]

`parity` feeds shapes-world images and their prompt sets (true prompt + rule-made contrastive
prompts) to a GPU-flavour repository whose engines `reward-service build-engines` built. The
reference is the fp32 ONNX of every engine (`engines.json`), on ONNX Runtime's CPU provider;
the candidate is each TensorRT engine. Both sides share the ONNX preprocessing (it is ONNX
Runtime in serving too) and the fp32 reward head, so the difference is the engines' alone.
Exit status 1 when an embedding differs by more than --embed-tol or a reward by more than
--reward-tol.

GPU memory is handled with the CUDA driver API through ctypes (libcuda.so.1, which every
NVIDIA driver installs), so neither a CUDA build of torch nor cuda-python is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.model_contract import version_dir

CONTEXT_LENGTH = 77  # service.model_contract.CONTEXT_LENGTH
MAX_PROMPTS = 33  # service.model_contract.MAX_PROMPTS
# Rewards that min-max normalise over the prompt set: a random-init CLIP scores every prompt
# almost alike, so their fp16 error is divided by a spread near zero and says nothing.
TEXTNORM_OUTPUTS = ("TEXTNORM", "TEXTNORM_HEAD", "ENSEMBLE_MEAN", "ENSEMBLE_UW")
# Dense FP16/BF16 tensor-core peaks (TFLOP/s, NVIDIA datasheets, no sparsity); the first
# substring of the GPU's name that matches wins, so the specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("T4", 65.0),
)


# -- CUDA (driver API) -------------------------------------------------------------------------
class Cuda:
    """Device 0's primary context, one stream, and device buffers (ints: CUdeviceptr)."""

    def __init__(self, device: int = 0) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise SystemExit(f"error: no CUDA driver (libcuda.so.1): {exc}") from None
        u64, size, vp = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
        signatures: dict[str, list[Any]] = {
            "cuInit": [ctypes.c_uint],
            "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
            "cuDeviceGetName": [ctypes.c_char_p, ctypes.c_int, ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), ctypes.c_int],
            "cuCtxSetCurrent": [vp],
            "cuStreamCreate": [ctypes.POINTER(vp), ctypes.c_uint],
            "cuStreamSynchronize": [vp],
            "cuMemAlloc_v2": [ctypes.POINTER(u64), size],
            "cuMemFree_v2": [u64],
            "cuMemcpyHtoD_v2": [u64, vp, size],
            "cuMemcpyDtoH_v2": [vp, u64, size],
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self._lib = lib
        self._check(lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._check(lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        name = ctypes.create_string_buffer(256)
        self._check(lib.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
        self.name = name.value.decode()
        ctx = ctypes.c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtx")
        self._check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._stream = ctypes.c_void_p()
        # Flags 0: a blocking stream, ordered after the synchronous copies below.
        self._check(lib.cuStreamCreate(ctypes.byref(self._stream), 0), "cuStreamCreate")

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {(name.value or b'?').decode()} ({result})")

    @property
    def stream(self) -> int:
        return self._stream.value or 0

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(self._lib.cuMemAlloc_v2(ctypes.byref(ptr), max(nbytes, 1)), "cuMemAlloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self._lib.cuMemFree_v2(ptr), "cuMemFree")

    def upload(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._check(self._lib.cuMemcpyHtoD_v2(ptr, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")

    def download(self, array: np.ndarray, ptr: int) -> None:
        assert array.flags.c_contiguous
        self._check(self._lib.cuMemcpyDtoH_v2(array.ctypes.data, ptr, array.nbytes), "cuMemcpyDtoH")

    def synchronize(self) -> None:
        self._check(self._lib.cuStreamSynchronize(self._stream), "cuStreamSynchronize")


# -- TensorRT ----------------------------------------------------------------------------------
class Engine:
    """One serialized TensorRT engine (one optimisation profile over the batch)."""

    def __init__(self, plan: Path, cuda: Cuda) -> None:
        import tensorrt as trt

        self._trt, self.cuda = trt, cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot load {plan} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def bind(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """Upload `feeds`, set shapes and addresses; returns (device buffers, host outputs)."""
        buffers: dict[str, int] = {}
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtype(name))
            self.context.set_input_shape(name, array.shape)
            buffers[name] = self.cuda.alloc(array.nbytes)
            self.cuda.upload(buffers[name], array)
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self.dtype(name))
            buffers[name] = self.cuda.alloc(outputs[name].nbytes)
        for name, ptr in buffers.items():
            self.context.set_tensor_address(name, ptr)
        return buffers, outputs

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for `feeds`, in chunks of at most the profile's max batch."""
        total = len(next(iter(feeds.values())))
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, total, self.max_batch):
            chunk = {k: v[start : start + self.max_batch] for k, v in feeds.items()}
            buffers, outputs = self.bind(chunk)
            try:
                self.execute()
                self.cuda.synchronize()
                for name, array in outputs.items():
                    self.cuda.download(array, buffers[name])
            finally:
                for ptr in buffers.values():
                    self.cuda.free(ptr)
            parts.append(outputs)
        return {name: np.concatenate([p[name] for p in parts]) for name in self.outputs}


# -- inputs --------------------------------------------------------------------------------------
def tokenize(tokenizer_json: Path, prompts: Sequence[str]) -> np.ndarray:
    """CLIP token ids [N, 77]: <|startoftext|> … <|endoftext|>, padded with the end token (as the
    gateway and the exporter's CLIPTokenizer do; a longer prompt keeps 75 tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    ids = np.full((len(prompts), CONTEXT_LENGTH), eos, dtype=np.int64)
    for row, encoding in enumerate(tok.encode_batch(list(prompts))):
        tokens = list(encoding.ids)
        if not tokens or tokens[0] != bos:
            tokens.insert(0, bos)
        if tokens[-1] != eos or len(tokens) == 1:
            tokens.append(eos)
        if len(tokens) > CONTEXT_LENGTH:
            tokens = tokens[: CONTEXT_LENGTH - 1] + [eos]
        ids[row, : len(tokens)] = tokens
    return ids


def shapes_cases(n: int, size: int = 128, seed: int = 0) -> list[tuple[np.ndarray, list[str]]]:
    """n (image, [prompt, contrastive prompts...]) cases; every other image is one attribute off."""
    from service.contrastive import contrastive_prompts
    from shapes_world.grammar import describe
    from shapes_world.perturb import perturb
    from shapes_world.render import render
    from shapes_world.sampling import random_scene
    from shapes_world.scene import Caption
    from shapes_world.vocab import ATTRIBUTES

    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        scene = random_scene(rng, 1)
        prompt = describe(Caption.of(scene))
        shown = perturb(scene, ATTRIBUTES[i // 2 % len(ATTRIBUTES)], rng) if i % 2 else scene
        image = np.asarray(render(shown, seed * 1000 + i, size).image.convert("RGB"), np.uint8)
        try:
            contrastive = contrastive_prompts(prompt, "auto")[: MAX_PROMPTS - 1]
        except ValueError:
            contrastive = []
        cases.append((image, [prompt, *contrastive]))
    return cases


# -- parity --------------------------------------------------------------------------------------
def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_run(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _file(repo: Path, entry: dict, key: str) -> Path:
    """An engines.json entry's ONNX ("onnx") or engine ("plan"), in its model's version folder."""
    return version_dir(repo, entry["model"]) / entry[key]


def _engines(repo: Path) -> dict[str, dict]:
    spec = repo / "engines.json"
    if not spec.is_file():
        raise SystemExit(f"error: {repo} has no engines.json (export it with --target gpu)")
    entries = {e["model"]: e for e in json.loads(spec.read_text())}
    for entry in entries.values():
        if not _file(repo, entry, "plan").is_file():
            raise SystemExit(
                f"error: {_file(repo, entry, 'plan')} missing: run build-engines first"
            )
    return entries


def parity(repo: Path, n: int, embed_tol: float, reward_tol: float, report_only: set[str]) -> bool:
    """Print max |fp16 engine − fp32 ONNX| per tensor; True when all are within tolerance."""
    cuda = Cuda()
    entries = _engines(repo)
    provenance = json.loads((repo / "provenance.json").read_text())
    defaults = provenance.get("textnorm_defaults", {})
    cases = shapes_cases(n)
    images = np.stack([image for image, _ in cases])
    pixels = _ort_run(_ort(version_dir(repo, "image_preprocess") / "model.onnx"), {"IMAGE": images})
    pixels_in = {"PIXEL_VALUES": pixels["PIXEL_VALUES"]}

    unique = sorted({p for _, prompts in cases for p in prompts})
    ids = tokenize(repo / "tokenizer.json", unique)
    tower = entries["image_tower"]
    text = entries["text_encoder"]
    results: dict[str, dict[str, np.ndarray]] = {}
    for side in ("onnx", "tensorrt"):
        if side == "onnx":
            img = _ort_run(_ort(_file(repo, tower, "onnx")), pixels_in)["IMAGE_EMBEDS"]
            txt = _ort_run(_ort(_file(repo, text, "onnx")), {"INPUT_IDS": ids})["TEXT_EMBEDS"]
        else:
            img = Engine(_file(repo, tower, "plan"), cuda).run(pixels_in)["IMAGE_EMBEDS"]
            txt = Engine(_file(repo, text, "plan"), cuda).run({"INPUT_IDS": ids})["TEXT_EMBEDS"]
        results[side] = {"IMAGE_EMBEDS": img.astype(np.float32), "TEXT_EMBEDS": txt}
    # The gateway and the score model send only the columns a batch needs (a multiple of 4):
    # the engine's profile from 2 tokens up, checked against the full-width fp32 reference.
    width = min(CONTEXT_LENGTH, -(-int((ids == ids[:, -1:]).argmax(axis=1).max() + 1) // 4) * 4)
    trimmed = Engine(_file(repo, text, "plan"), cuda).run({"INPUT_IDS": ids[:, :width].copy()})
    results["tensorrt"]["TEXT_EMBEDS_TRIMMED"] = trimmed["TEXT_EMBEDS"]
    results["onnx"]["TEXT_EMBEDS_TRIMMED"] = results["onnx"]["TEXT_EMBEDS"]

    dim = results["onnx"]["IMAGE_EMBEDS"].shape[1]
    row = {p: i for i, p in enumerate(unique)}
    mask = np.zeros((n, MAX_PROMPTS), dtype=bool)
    for i, (_, prompts) in enumerate(cases):
        mask[i, : len(prompts)] = True
    head = _ort(version_dir(repo, "reward_head") / "model.onnx")
    for res in results.values():
        prompt_embeds = np.zeros((n, MAX_PROMPTS, dim), dtype=np.float32)
        for i, (_, prompts) in enumerate(cases):
            prompt_embeds[i, : len(prompts)] = res["TEXT_EMBEDS"][[row[p] for p in prompts]]
        feeds = {
            "IMAGE_EMBEDS": res["IMAGE_EMBEDS"],
            "PROMPT_EMBEDS": prompt_embeds,
            "PROMPT_MASK": mask,
            "TEXTNORM_SCALE": np.full((n, 1), defaults.get("scale", 5.0), np.float32),
            "ENSEMBLE_LAMBDA": np.full((n, 1), defaults.get("ensemble_lambda", 1.0), np.float32),
        }
        res.update(_ort_run(head, feeds))

    ref, got = results["onnx"], results["tensorrt"]
    print(
        f"parity on {cuda.name}: {repo.name}, {n} images, {len(unique)} prompts "
        f"(trimmed to {width} tokens)"
    )
    spread = [
        float(np.ptp(ref["TEXT_EMBEDS"][[row[p] for p in ps]] @ ref["IMAGE_EMBEDS"][i]))
        for i, (_, ps) in enumerate(cases)
    ]
    print(f"  median spread of raw rewards over a prompt set: {statistics.median(spread):.4f}")
    ok = True
    for name in ref:
        diff = float(np.max(np.abs(got[name] - ref[name])))
        tol = embed_tol if "_EMBEDS" in name else reward_tol
        gated = name not in report_only
        verdict = ("ok" if diff <= tol else "FAIL") if gated else "reported"
        ok = ok and (diff <= tol or not gated)
        print(f"  {name:14s} max |fp16 - fp32| {diff:.2e}  tolerance {tol:.0e}  {verdict}")
    return ok


# -- benchmarks ----------------------------------------------------------------------------------
def vit_macs(vision: dict, projection_dim: int | None = None) -> float:
    """Multiply-adds of one image through a CLIP ViT: patch embedding, the transformer layers
    (QKV + output projection, MLP, attention scores and weighting) and the projection."""
    size, patch = vision["image_size"], vision["patch_size"]
    d, ff, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    patches = (size // patch) ** 2
    tokens = patches + 1  # + class token
    embed = patches * 3 * patch * patch * d
    per_layer = tokens * (4 * d * d + 2 * d * ff) + 2 * tokens * tokens * d
    return float(embed + layers * per_layer + d * (projection_dim or d))


def peak_tflops(gpu: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key in gpu), None)


def _median_rate(
    step: Callable[[], None], sync: Callable[[], None], items: int, runs: int, min_seconds: float
) -> float:
    """Median items/s over `runs` timed runs of enough back-to-back `step`s to last about
    `min_seconds` (calls are queued on the stream, then synchronised once per run)."""
    for _ in range(3):  # warm-up
        step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    calls = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        rates.append(calls * items / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_tower(repo: Path, batches: Sequence[int], runs: int, peak: float | None) -> None:
    """Images/s of the image tower's engine (pixels in, embeddings out) against the GPU's bound."""
    cuda = Cuda()
    entry = _engines(repo)["image_tower"]
    provenance = json.loads((repo / "provenance.json").read_text())
    config_file = Path(provenance["model"]["source"]) / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"error: {config_file} not found (the exported checkpoint's config)")
    config = json.loads(config_file.read_text())
    macs = vit_macs(config["vision_config"], config.get("projection_dim"))
    peak = peak or peak_tflops(cuda.name)
    engine = Engine(_file(repo, entry, "plan"), cuda)
    size = config["vision_config"]["image_size"]
    bound = f"{peak:.0f} TFLOP/s dense fp16" if peak else "unknown peak (pass --peak-tflops)"
    print(
        f"image tower, TensorRT {entry['precision']}, on {cuda.name} ({bound}); "
        f"{macs / 1e9:.2f} G multiply-adds per {size}-px image"
    )
    rng = np.random.default_rng(0)
    for b in batches:
        if b > engine.max_batch:
            print(f"  batch {b:3d}: over the engine's max batch {engine.max_batch}, skipped")
            continue
        pixels = rng.standard_normal((b, 3, size, size)).astype(np.float32)
        buffers, _ = engine.bind({"PIXEL_VALUES": pixels})
        try:
            rate = _median_rate(engine.execute, cuda.synchronize, b, runs, 0.3)
        finally:
            for ptr in buffers.values():
                cuda.free(ptr)
        achieved = rate * 2 * macs / 1e12
        share = f", {100 * achieved / peak:.1f}% of peak" if peak else ""
        ceiling = f" (bound {peak * 1e12 / (2 * macs):,.0f} img/s)" if peak else ""
        print(f"  batch {b:3d}: {rate:10,.0f} images/s = {achieved:6.1f} TFLOP/s{share}{ceiling}")


# OpenAI's CLIP image towers (transformers' CLIPVisionConfig fields): the sizes `bench-torch`
# measures with random weights (speed does not depend on the values).
VIT_TOWERS: dict[str, dict[str, int]] = {
    "vit-b32": dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, projection_dim=512),
    "vit-l14": dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
}  # fmt: skip


def bench_torch(
    towers: Sequence[str], batches: Sequence[int], runs: int, peak: float | None
) -> None:
    """Images/s of CLIP image towers in PyTorch on the GPU (fp16, SDPA attention, no TensorRT):
    the rate a TensorRT engine of the same tower should beat, against the GPU's bound."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    name = torch.cuda.get_device_name(0)
    peak = peak or peak_tflops(name)
    bound = f"{peak:.0f} TFLOP/s dense fp16" if peak else "unknown peak (pass --peak-tflops)"
    print(f"image towers in PyTorch {torch.__version__} fp16 on {name} ({bound})")
    for tower in towers:
        config = CLIPVisionConfig(**VIT_TOWERS[tower], attn_implementation="sdpa")
        model = CLIPVisionModelWithProjection(config).half().cuda().eval()
        macs = vit_macs(VIT_TOWERS[tower], VIT_TOWERS[tower]["projection_dim"])
        print(f"{tower}: {macs / 1e9:.2f} G multiply-adds per {config.image_size}-px image")
        for b in batches:
            pixels = torch.randn(b, 3, config.image_size, config.image_size, device="cuda").half()

            @torch.inference_mode()
            def step(pixels=pixels, model=model) -> None:
                model(pixel_values=pixels)

            rate = _median_rate(step, torch.cuda.synchronize, b, runs, 0.3)
            achieved = rate * 2 * macs / 1e12
            share = f", {100 * achieved / peak:.1f}% of peak" if peak else ""
            ceiling = f" (bound {peak * 1e12 / (2 * macs):,.0f} img/s)" if peak else ""
            print(
                f"  batch {b:4d}: {rate:10,.0f} images/s = {achieved:6.1f} TFLOP/s{share}{ceiling}"
            )
        del model
        torch.cuda.empty_cache()


async def _triton_rates(
    url: str, model: str, image_size: int, levels: Sequence[int], seconds: float, runs: int
) -> dict[int, float]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3), np.uint8)
        inp = grpcclient.InferInput("IMAGE", list(image.shape), "UINT8")
        inp.set_data_from_numpy(image)
        out = [grpcclient.InferRequestedOutput("IMAGE_EMBEDS")]

        async def worker(deadline: float) -> int:
            done = 0
            while time.perf_counter() < deadline:
                await client.infer(model, [inp], outputs=out)
                done += 1
            return done

        rates = {}
        for level in levels:
            await asyncio.gather(*(worker(time.perf_counter() + 1.0) for _ in range(level)))
            window = []
            for _ in range(runs):
                start = time.perf_counter()
                counts = await asyncio.gather(*(worker(start + seconds) for _ in range(level)))
                window.append(sum(counts) / (time.perf_counter() - start))
            rates[level] = statistics.median(window)
        return rates
    finally:
        await client.close()


def bench_triton(
    url: str, image_size: int, levels: Sequence[int], seconds: float, runs: int
) -> None:
    """End-to-end images/s through Triton's gRPC `image_encoder` (preprocessing + engine)."""
    rates = asyncio.run(_triton_rates(url, "image_encoder", image_size, levels, seconds, runs))
    print(
        f"Triton gRPC image_encoder, one {image_size}-px uint8 image per request "
        f"(median of {runs} x {seconds:.0f} s):"
    )
    for level, rate in rates.items():
        print(f"  concurrency {level:3d}: {rate:10,.0f} images/s")


# -- command line ------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="fp16 engines vs fp32 ONNX")
    p.add_argument("repo", type=Path)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--embed-tol", type=float, default=1e-2)
    p.add_argument("--reward-tol", type=float, default=5e-3)
    p.add_argument("--report-only", default="", help="comma-separated outputs not gated")
    b = sub.add_parser("bench-tower", help="images/s of the image tower's engine")
    b.add_argument("repo", type=Path)
    b.add_argument("--batches", type=_ints, default=[1, 8, 32, 64])
    b.add_argument("--runs", type=int, default=7)
    b.add_argument("--peak-tflops", type=float, default=None)
    g = sub.add_parser("bench-torch", help="images/s of CLIP image towers in PyTorch fp16")
    g.add_argument("--towers", default="vit-b32,vit-l14", help=f"of {', '.join(VIT_TOWERS)}")
    g.add_argument("--batches", type=_ints, default=[1, 8, 32, 64, 256])
    g.add_argument("--runs", type=int, default=5)
    g.add_argument("--peak-tflops", type=float, default=None)
    t = sub.add_parser("bench-triton", help="images/s through Triton gRPC")
    t.add_argument("--url", required=True)
    t.add_argument("--image-size", type=int, default=224)
    t.add_argument("--concurrency", type=_ints, default=[8, 32])
    t.add_argument("--seconds", type=float, default=5.0)
    t.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "parity":
        report_only = {x for x in args.report_only.split(",") if x}
        ok = parity(args.repo, args.images, args.embed_tol, args.reward_tol, report_only)
        return 0 if ok else 1
    if args.command == "bench-tower":
        bench_tower(args.repo, args.batches, args.runs, args.peak_tflops)
    elif args.command == "bench-torch":
        bench_torch(args.towers.split(","), args.batches, args.runs, args.peak_tflops)
    else:
        bench_triton(args.url, args.image_size, args.concurrency, args.seconds, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
