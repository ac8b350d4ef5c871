"""`reward-service verify DIR`: exported files vs the PyTorch reference, on held-out inputs.

The exported ONNX files run under ONNX Runtime; the reference is the HF image processor + torch
CLIP + torch head + numpy TextNorm. Three comparisons, each a max absolute difference:
- embeddings (image and text towers, preprocessing included);
- rewards end to end (exported embeddings → exported head vs reference embeddings → reference);
- the reward-head graph alone, fed the reference embeddings (isolates the head from the towers).
TextNorm is a min-max normalised softmax: where an image's rewards for its prompts are nearly
tied it amplifies tiny embedding differences, so its end-to-end difference is reported but
checked only through the head-graph comparison.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.clip_model import (
    ClipBundle,
    checkpoint_hash,
    image_embeddings,
    load_clip,
    local_checkpoint_dir,
    text_embeddings,
    tokenize,
)
from export.repository import head_hash, read_provenance
from export.reward_head import load_head
from service import model_contract as contract
from service.contrastive import CONTRASTIVE_RULES
from service.onnx_models import OnnxModel, open_served_model
from service.textnorm import ensemble_mean, ensemble_uncertainty, textnorm
from shapes_world.benchmark import CATEGORIES, build_benchmark

# fp32: the 1e-4 on rewards. Embeddings: one grey level of preprocessing difference
# moves a unit embedding by ~1e-5..1e-4 per component; 1e-3 leaves margin yet catches real bugs.
# int8 towers (`export --precision int8`): measured on the shipped model, 35 held-out cases,
# embeddings 5.0e-3, raw 6.3e-3, head 1.8e-2 (a batch's activations share one scale, so this
# includes batch-mates moving an embedding, up to 2.7e-3); served over the 2,500 benchmark
# images, raw up to 1.2e-2. Tolerances: two to three times that. A wrong tower, weights or
# preprocessing moves unit embeddings by 0.1 or more. The reward head is fp32 in every
# flavour: its graph keeps the fp32 tolerance.
TOLERANCES = {
    "fp32": {
        "image_embeds": 1e-3,
        "text_embeds": 1e-4,
        "raw": contract.RAW_TOLERANCE["fp32"],
        "head": 1e-4,
        "head_graph": 1e-5,
    },
    "int8": {
        "image_embeds": 2e-2,
        "text_embeds": 2e-2,
        "raw": contract.RAW_TOLERANCE["int8"],
        "head": 5e-2,
        "head_graph": 1e-5,
    },
    "bf16": {
        "image_embeds": 2e-2,
        "text_embeds": 2e-2,
        "raw": contract.RAW_TOLERANCE["bf16"],
        "head": 5e-2,
        "head_graph": 1e-5,
    },
}
# Sizes (width, height): square, tall, wide, tiny (< 64 px and < 224 px), large, odd.
IMAGE_SIZES = ((128, 128), (90, 300), (300, 90), (17, 23), (150, 150), (2048, 2048), (333, 517))


@dataclass
class VerifyReport:
    max_diff: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    cases: int = 0

    @property
    def ok(self) -> bool:
        return all(self.max_diff[k] <= tol for k, tol in self.tolerances.items())

    def update(self, name: str, diff: float) -> None:
        self.max_diff[name] = max(self.max_diff.get(name, 0.0), float(diff))

    def scoped(self, prefix: str) -> _ScopedReport:
        return _ScopedReport(self, prefix)


@dataclass
class _ScopedReport:
    """One model's view of the report: its names under `prefix` (cases counted once)."""

    report: VerifyReport
    prefix: str

    def update(self, name: str, diff: float) -> None:
        self.report.update(self.prefix + name, diff)

    def count_case(self) -> None:
        if not self.prefix:
            self.report.cases += 1


def _session(repo: Path, model: str) -> OnnxModel:
    """`model` under the runtime the repository serves it with (ONNX Runtime, or OpenVINO)."""
    return open_served_model(repo, model)


def _held_out(n_prompts: int, seed: int) -> list[tuple[list[Image.Image], list[str]]]:
    """Per prompt: its images and [prompt, contrastive...] texts, from a held-out benchmark:
    `n_prompts` of them, the categories taken in turn."""
    per_category = -(-n_prompts // len(CATEGORIES))
    bench = build_benchmark(
        seed=seed, prompts_per_category=per_category, images_per_prompt=len(IMAGE_SIZES)
    )
    by_category: dict[str, list] = {}
    for p in bench:
        by_category.setdefault(p.category, []).append(p)
    in_turn = [p for row in itertools.zip_longest(*by_category.values()) for p in row if p]
    cases = []
    for p in in_turn[:n_prompts]:
        texts = [p.prompt, *CONTRASTIVE_RULES[p.category](p.prompt)][: contract.MAX_PROMPTS]
        images = [
            item.image(size=max(w, h)).resize((w, h), Image.Resampling.BICUBIC)
            for item, (w, h) in zip(p.items, IMAGE_SIZES, strict=True)
        ]
        cases.append((images, texts))
    return cases


def verify_repository(
    repo: Path, n_prompts: int = 5, seed: int = 99, max_batch_check: bool = True
) -> VerifyReport:
    prov = read_provenance(repo)
    if prov is None:
        raise ValueError(f"not an exported repository (no readable provenance.json): {repo}")
    if prov.get("options", {}).get("target") != "cpu":
        raise ValueError(
            "verify runs the ONNX files of a --target cpu repository; GPU engines "
            "are checked by the `gpu` tests (tests/test_export.py)"
        )
    tolerances = TOLERANCES[prov["options"].get("precision", "fp32")]
    scale = prov["textnorm_defaults"]["scale"]
    lam = prov["textnorm_defaults"]["ensemble_lambda"]
    report = VerifyReport()
    members = [(m["index"], m, None) for m in prov.get("members") or []]
    for member, model, head_entry in [(0, prov["model"], prov["head"]), *members]:
        bundle = _load_source(model)
        head = None
        if head_entry:
            if head_hash(Path(head_entry["source"])) != head_entry["sha256"]:
                raise ValueError(f"head {head_entry['source']} changed since export: re-export")
            head = load_head(Path(head_entry["source"]))[0]
        # member k's differences under "member{k}.<name>"; the first model's as they were
        prefix = "" if member == 0 else f"member{member}."
        report.tolerances |= {
            prefix + name: tol for name, tol in tolerances.items() if head or name != "head"
        }
        sessions = _Sessions(
            *(_session(repo, contract.member_model(m, member)) for m in contract.MEMBER_ROLES)
        )
        _verify_model(sessions, bundle, head, scale, lam, n_prompts, seed, report.scoped(prefix))
        if max_batch_check:
            _check_max_batch(prov, sessions, bundle, report.scoped(prefix))
    return report


def _load_source(model: dict) -> ClipBundle:
    """The checkpoint an export's model (or member) came from, unchanged since."""
    source = model["source"]
    if checkpoint_hash(local_checkpoint_dir(source)) != model["checkpoint_sha256"]:
        raise ValueError(f"{source} changed since this repository was exported: re-export it")
    return load_clip(source)


@dataclass(frozen=True)
class _Sessions:
    """One model's three opened ONNX files, in `contract.MEMBER_ROLES` order."""

    image: OnnxModel
    text: OnnxModel
    head: OnnxModel


def _verify_model(
    sessions: _Sessions,
    bundle: ClipBundle,
    head,
    scale: float,
    lam: float,
    n_prompts: int,
    seed: int,
    report: _ScopedReport,
) -> None:
    """One model's ONNX files against its PyTorch reference on held-out cases."""
    outputs = list(sessions.head.output_names)
    for images, texts in _held_out(n_prompts, seed):
        ids = tokenize(bundle.tokenizer, texts)
        txt_ref = text_embeddings(bundle.model, ids).numpy()
        txt_onnx = sessions.text.run({"INPUT_IDS": ids.numpy()})[0]
        report.update("text_embeds", np.abs(txt_onnx - txt_ref).max())
        for image in images:  # one size per batch: each image is its own batch
            px = bundle.processor(images=[image], return_tensors="pt")["pixel_values"]
            img_ref = image_embeddings(bundle.model, px).numpy()
            img_onnx = sessions.image.run({"IMAGE": np.asarray(image)[None]})[0]
            report.update("image_embeds", np.abs(img_onnx - img_ref).max())
            ref = _reference_rewards(img_ref[0], txt_ref, head, scale, lam)
            got = _run_head(sessions.head, img_onnx[0], txt_onnx, scale, lam, outputs)
            graph = _run_head(sessions.head, img_ref[0], txt_ref, scale, lam, outputs)
            report.update("raw", abs(got["RAW"] - ref["RAW"]))
            report.update("textnorm_end_to_end", abs(got["TEXTNORM"] - ref["TEXTNORM"]))
            if head is not None:
                report.update("head", abs(got["HEAD"] - ref["HEAD"]))
            report.update("head_graph", max(abs(graph[k] - ref[k]) for k in ref))
            report.count_case()


def _check_max_batch(prov, sessions: _Sessions, bundle, report: _ScopedReport) -> None:
    """A full `--max-batch` batch gives the same embeddings as one item at a time."""
    n = prov["options"]["max_batch"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 96, 80, 3), dtype=np.uint8)
    image_s, text_s = sessions.image, sessions.text
    batched = image_s.run({"IMAGE": images})[0]
    singles = np.concatenate([image_s.run({"IMAGE": images[i : i + 1]})[0] for i in range(n)])
    report.update("image_embeds", np.abs(batched - singles).max())
    ids = tokenize(bundle.tokenizer, [f"{i} red circles" for i in range(n)]).numpy()
    batched = text_s.run({"INPUT_IDS": ids})[0]
    singles = np.concatenate([text_s.run({"INPUT_IDS": ids[i : i + 1]})[0] for i in range(n)])
    report.update("text_embeds", np.abs(batched - singles).max())


def _head_inputs(img: np.ndarray, txt: np.ndarray, scale: float, lam: float) -> dict:
    p, d = contract.MAX_PROMPTS, img.shape[-1]
    prompts = np.zeros((1, p, d), np.float32)
    prompts[0, : len(txt)] = txt
    mask = np.zeros((1, p), bool)
    mask[0, : len(txt)] = True
    return {
        "IMAGE_EMBEDS": img[None].astype(np.float32),
        "PROMPT_EMBEDS": prompts,
        "PROMPT_MASK": mask,
        "TEXTNORM_SCALE": np.full((1, 1), scale, np.float32),
        "ENSEMBLE_LAMBDA": np.full((1, 1), lam, np.float32),
    }


def _run_head(session, img, txt, scale, lam, outputs) -> dict[str, float]:
    values = dict(
        zip(session.output_names, session.run(_head_inputs(img, txt, scale, lam)), strict=True)
    )
    return {name: float(values[name][0, 0]) for name in outputs}


def _reference_rewards(img, txt, head, scale, lam) -> dict[str, float]:
    sims = (txt @ img).astype(np.float64)
    tn = float(textnorm(sims, scale))
    out = {"RAW": float(sims[0]), "TEXTNORM": tn}
    if head is None:
        return out
    with torch.no_grad():
        logits = head.logits(torch.from_numpy(img)[None], torch.from_numpy(txt)).double()
    scores = torch.sigmoid(logits).numpy()
    tn_head = float(textnorm(logits.numpy(), scale))
    probs = np.array([tn, tn_head])
    out |= {
        "HEAD": float(scores[0]),
        "TEXTNORM_HEAD": tn_head,
        "ENSEMBLE_MEAN": float(ensemble_mean(probs)),
        "ENSEMBLE_UW": float(ensemble_uncertainty(probs, lam)),
    }
    return out
