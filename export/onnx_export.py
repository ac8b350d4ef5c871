"""PyTorch → ONNX for the three models of the tensor contract (`service.model_contract`).

- image encoder: uint8 NHWC images → CLIP preprocessing (`onnx_preprocess`, in-graph) →
  vision tower → L2-normalised embeddings;
- text encoder: token ids → L2-normalised embeddings;
- reward head: embeddings → raw CLIP reward, TextNorm, and (with a learned head) the head's
  reward, TextNorm over it and the two ensembles — the torch TextNorm of `textnorm_torch`.

Every graph has a symbolic batch dimension, opset 18, and is a single file (no external data)
unless it is over 2 GB.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnxscript.ir.passes.common import ClearMetadataAndDocStringPass
from torch import nn

from export.clip_model import ClipBundle
from export.reward_head import RewardHead
from export.textnorm_torch import (
    ensemble_mean_torch,
    ensemble_uncertainty_torch,
    textnorm_torch,
)
from service import model_contract as contract

OPSET = 18
# torch.onnx logs one line per torchvision op it cannot register (no torchvision here).
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
TWO_GB = 2**31


class ImageTower(nn.Module):
    def __init__(self, bundle: ClipBundle) -> None:
        super().__init__()
        self.model = bundle.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        return nn.functional.normalize(out.pooler_output, dim=-1)


class TextTower(nn.Module):
    def __init__(self, bundle: ClipBundle) -> None:
        super().__init__()
        self.model = bundle.model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids)
        return nn.functional.normalize(out.pooler_output, dim=-1)


class RewardGraph(nn.Module):
    """Embeddings → rewards, in the order of `contract.reward_head(...).outputs`."""

    def __init__(self, head: RewardHead | None) -> None:
        super().__init__()
        self.head = head

    def forward(
        self,
        image_embeds: torch.Tensor,  # [B, D]
        prompt_embeds: torch.Tensor,  # [B, P, D]
        prompt_mask: torch.Tensor,  # [B, P] bool
        textnorm_scale: torch.Tensor,  # [B, 1]
        ensemble_lambda: torch.Tensor,  # [B, 1]
    ) -> tuple[torch.Tensor, ...]:
        sims = torch.einsum("bd,bpd->bp", image_embeds, prompt_embeds)
        scale = textnorm_scale[:, 0]
        tn_clip = textnorm_torch(sims, scale, prompt_mask)
        outputs = (sims[:, :1], tn_clip[:, None])
        if self.head is None:
            return outputs
        logits = self.head.logits(image_embeds[:, None, :], prompt_embeds)  # [B, P]
        tn_head = textnorm_torch(logits, scale, prompt_mask)
        probs = torch.stack([tn_clip, tn_head])
        return outputs + (
            torch.sigmoid(logits[:, :1]),
            tn_head[:, None],
            ensemble_mean_torch(probs)[:, None],
            ensemble_uncertainty_torch(probs, ensemble_lambda[:, 0])[:, None],
        )


def _export(
    module: nn.Module,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    tokens: bool = False,
) -> onnx.ModelProto:
    """torch.onnx (dynamo) with dim 0 of every input symbolic (and, with `tokens`, dim 1 of
    the first: the text encoder's sequence length); returns the in-memory model.

    The exporter's debug metadata (every node's Python stack trace, with the absolute paths of
    this checkout and its site-packages) is cleared: the same checkpoint and code must export
    to the same bytes, hence the same `model_version`, wherever the code is checked out."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = [{0: batch} for _ in args]
    if tokens:
        dynamic[0][1] = torch.export.Dim("tokens", min=2, max=contract.CONTEXT_LENGTH)
    dynamic = tuple(dynamic)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.optimize()
    ClearMetadataAndDocStringPass()(program.model)
    model = program.model_proto
    for value in model.graph.input:  # name the symbolic batch dim the same everywhere
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    if tokens:
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"
    return model


def export_text_encoder(bundle: ClipBundle, int8: bool = False) -> onnx.ModelProto:
    """Token ids [B, T] → TEXT_EMBEDS, T from 2 to 77 (the tokens the batch needs); `int8`:
    int8 weight MatMuls (`onnx_quantize`).

    Exact for any T that keeps each row's end token: CLIP's text tower is causal and pools at
    the first end token, so positions after it never reach the embedding, and the padding a
    shorter T drops changes nothing."""
    spec = contract.text_encoder(bundle.model.config.projection_dim)
    ids = torch.full((2, 16), bundle.tokenizer.eos_token_id, dtype=torch.long)
    ids[:, 0] = bundle.tokenizer.bos_token_id
    names = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    tower = _export(TextTower(bundle), (ids,), *names, tokens=True)
    return _quantized(tower) if int8 else tower


def export_image_tower(bundle: ClipBundle) -> onnx.ModelProto:
    """The vision tower alone: preprocessed PIXEL_VALUES [B, 3, S, S] → IMAGE_EMBEDS."""
    spec = contract.image_encoder(bundle.model.config.projection_dim)
    size = bundle.model.config.vision_config.image_size
    return _export(
        ImageTower(bundle),
        (torch.zeros(2, 3, size, size),),
        ["PIXEL_VALUES"],
        [t.name for t in spec.outputs],
    )


def export_image_encoder(bundle: ClipBundle, int8: bool = False) -> onnx.ModelProto:
    """uint8 IMAGE → in-graph CLIP preprocessing → vision tower → IMAGE_EMBEDS, one graph;
    `int8`: the tower's weight MatMuls in int8 (`onnx_quantize`; the preprocessing stays as
    it is: the quantizer reorders the nodes of its If/Loop subgraphs out of topological order)."""
    from export.onnx_preprocess import build_preprocess_model

    tower = export_image_tower(bundle)
    if int8:
        tower = _quantized(tower)
    tower = onnx.compose.add_prefix(tower, "tower/", rename_inputs=False, rename_outputs=False)
    merged = onnx.compose.merge_models(
        build_preprocess_model(bundle.processor),
        tower,
        io_map=[("PIXEL_VALUES", "PIXEL_VALUES")],
        doc_string="image encoder: CLIP preprocessing + vision tower",
    )
    return _dedupe_opsets(merged)


def _quantized(tower: onnx.ModelProto) -> onnx.ModelProto:
    """int8 weight MatMuls; ONNX Runtime's quantizer is imported only when asked for."""
    from export.onnx_quantize import quantize_int8

    return quantize_int8(tower)


def _dedupe_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Import each opset domain once (`onnx.compose.merge_models` lists a shared domain once
    per merged model)."""
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        if versions.setdefault(opset.domain, opset.version) != opset.version:
            raise ValueError(f"opset {opset.domain!r} imported at two versions")
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    return model


def export_reward_head(embed_dim: int, head: RewardHead | None) -> onnx.ModelProto:
    spec = contract.reward_head(embed_dim, head is not None)
    b, p = 2, contract.MAX_PROMPTS
    args = (
        torch.randn(b, embed_dim),
        torch.randn(b, p, embed_dim),
        torch.ones(b, p, dtype=torch.bool),
        torch.ones(b, 1),
        torch.ones(b, 1),
    )
    return _export(
        RewardGraph(head), args, [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    )


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Check and write one ONNX file (external data only past protobuf's 2 GB limit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() >= TWO_GB:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
        onnx.checker.check_model(str(path))
        return
    onnx.checker.check_model(model, full_check=True)
    buffer = io.BytesIO()
    onnx.save_model(model, buffer)
    path.write_bytes(buffer.getvalue())
