"""Tokenizer in CLIP's format, checkpoint save/load round trip, and loading errors."""

import json

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from export.clip_model import (
    ClipBundle,
    ModelLoadError,
    image_embeddings,
    image_processor,
    load_clip,
    save_clip,
    text_embeddings,
    tiny_clip_config,
    tokenize,
)
from export.tokenizer_build import BOS, EOS, save_clip_tokenizer, train_bpe

CORPUS = ["three red triangles on a grass background", "an orange star", "two blue crosses"] * 50


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    vocab, merges = train_bpe(CORPUS, vocab_size=600)
    save_clip_tokenizer(vocab, merges, out)
    return out


def test_clip_tokenizer_loads_our_bpe(tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok("Three  RED triangles")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [BOS, "three</w>", "red</w>", "triangles</w>", EOS]
    assert tok.eos_token_id == max(json.loads((tokenizer_dir / "vocab.json").read_text()).values())
    # Unseen words still tokenize (byte fallback), never to unknown tokens.
    odd = tok("zebra ☃")["input_ids"]
    assert len(odd) > 3 and odd.count(tok.eos_token_id) == 1
    assert tok.model_max_length == 77


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, image_size=32)
    bundle = ClipBundle(CLIPModel(config).eval(), tok, image_processor(32), "test")
    out = tmp_path_factory.mktemp("ckpt") / "clip"
    save_clip(bundle, out)
    return bundle, out


def test_save_load_round_trip(checkpoint):
    bundle, path = checkpoint
    loaded = load_clip(path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    px = bundle.processor(images=images, return_tensors="pt")["pixel_values"]
    assert px.shape == (3, 3, 32, 32)
    px2 = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px, px2)
    ids = tokenize(bundle.tokenizer, ["a red circle", "two stars"])
    torch.testing.assert_close(tokenize(loaded.tokenizer, ["a red circle", "two stars"]), ids)
    torch.testing.assert_close(
        image_embeddings(loaded.model, px), image_embeddings(bundle.model, px)
    )
    torch.testing.assert_close(
        text_embeddings(loaded.model, ids), text_embeddings(bundle.model, ids)
    )
    assert torch.allclose(text_embeddings(loaded.model, ids).norm(dim=-1), torch.ones(2))


def test_text_embedding_ignores_padding_after_eos(checkpoint):
    bundle, _ = checkpoint
    ids = tokenize(bundle.tokenizer, ["three red triangles"])
    n = int((ids != bundle.tokenizer.eos_token_id).sum()) + 1
    torch.testing.assert_close(
        text_embeddings(bundle.model, ids), text_embeddings(bundle.model, ids[:, :n])
    )


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_clip(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not CLIP"):
        load_clip(tmp_path)
