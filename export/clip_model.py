"""Build, load and score with Hugging Face `CLIPModel` checkpoints.

Everything downstream treats the shipped shapes-world model exactly like
openai/clip-vit-base-patch32: `load_clip` accepts a local `save_pretrained` directory or a hub id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # no torchvision needed
from transformers.utils import logging as hf_logging

from export.sources import ModelLoadError, check_local_source, is_local
from export.tokenizer_build import CONTEXT_LENGTH

hf_logging.disable_progress_bar()  # our own progress bars cover long steps

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ClipBundle:
    """A CLIP model with the tokenizer and image processor that belong to it."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    processor: CLIPImageProcessor
    source: str


def tiny_clip_config(
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    image_size: int = 64,
    patch_size: int = 8,
    vision_layers: int = 4,
) -> CLIPConfig:
    """The shapes-world model: CLIP's architecture at a size that trains on two CPU cores
    (the second ensemble member changes the image tower: resolution, patch size, depth)."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def image_processor(image_size: int) -> CLIPImageProcessor:
    """CLIP's preprocessing (shortest side → size, bicubic, centre crop, CLIP mean/std)."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # PIL bicubic, as OpenAI CLIP
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def check_clip_source(source: str | Path) -> CLIPConfig:
    """Check (without loading weights) that `source` is a CLIP checkpoint; return its config.

    Raises `ModelLoadError` with a one-line message for a missing directory, a directory that is
    not a CLIP checkpoint, or a hub id that cannot be fetched.
    """
    source = str(source)
    check_local_source(source)
    try:
        config = CLIPConfig.from_pretrained(source)
    except OSError as exc:
        raise ModelLoadError(f"cannot load {source!r}: {str(exc).splitlines()[0]}") from exc
    if config.model_type != "clip":
        raise ModelLoadError(f"{source!r} is a {config.model_type!r} checkpoint, not CLIP")
    return config


def load_clip(source: str | Path) -> ClipBundle:
    """Load a CLIP checkpoint (model, tokenizer, processor) from a local directory or a hub id;
    errors as `check_clip_source`."""
    source = str(source)
    check_clip_source(source)
    try:
        model = CLIPModel.from_pretrained(source).eval()
        tokenizer = CLIPTokenizer.from_pretrained(source)
        processor = CLIPImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {source!r}: {str(exc).splitlines()[0]}") from exc
    return ClipBundle(model=model, tokenizer=tokenizer, processor=processor, source=source)


def check_member(first: ClipBundle, member: ClipBundle) -> None:
    """ValueError unless `member` can serve beside `first` in one multi-model ensemble: the
    same tokenizer (one tokenisation feeds every text encoder), text context and end token."""
    first_tok = first.tokenizer.backend_tokenizer.to_str()
    if member.tokenizer.backend_tokenizer.to_str() != first_tok:
        raise ValueError(
            f"member {member.source} has another tokenizer than {first.source}: ensemble "
            "members must share the first model's tokenizer (one tokenisation feeds every "
            "text encoder)"
        )
    ours, theirs = first.model.config.text_config, member.model.config.text_config
    for key in ("max_position_embeddings", "eos_token_id"):
        if getattr(ours, key) != getattr(theirs, key):
            raise ValueError(
                f"member {member.source}: text_config.{key} is {getattr(theirs, key)}, "
                f"{first.source}'s is {getattr(ours, key)} (members share one tokenisation)"
            )


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a local checkpoint's files (names and bytes), in sorted order."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != "training.json"):
        digest.update(f.name.encode() + b"\0")
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def local_checkpoint_dir(source: str | Path) -> Path:
    """The directory holding a checkpoint's files: the path itself, or the hub cache snapshot
    that `from_pretrained` downloaded for a hub id."""
    source = str(source)
    if is_local(source):
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=source, local_files_only=True))
    except Exception as exc:  # the hub library raises several unrelated types here
        raise ModelLoadError(f"{source!r} is not in the local hub cache: {exc}") from exc


def save_clip(bundle: ClipBundle, out_dir: Path) -> None:
    """`save_pretrained` the model, tokenizer and processor into one directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(str(out_dir), safe_serialization=True)
    bundle.tokenizer.save_pretrained(str(out_dir))
    bundle.processor.save_pretrained(str(out_dir))


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to CLIP's 77-token context (truncating longer prompts)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=CONTEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    )["input_ids"]


@torch.no_grad()
def image_embeddings(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings."""
    out = model.get_image_features(pixel_values=pixel_values)
    emb = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def text_embeddings(model: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings."""
    out = model.get_text_features(input_ids=input_ids)
    emb = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.nn.functional.normalize(emb, dim=-1)
