"""A small byte-level BPE in CLIP's format, trained on shapes-world text.

The result is a `vocab.json` + `merges.txt` pair that `transformers.CLIPTokenizer` loads like
OpenAI's: same normalizer and pre-tokenizer, `</w>` end-of-word suffix, every byte (with and
without the suffix) in the base vocabulary so any text tokenizes, and the two special tokens last
(so `<|endoftext|>` has the largest id, as in OpenAI's vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77  # CLIP's text context; kept so every later stage treats us like OpenAI CLIP
_CLIP_SPLIT = (  # OpenAI CLIP's word split, as transformers' CLIPTokenizer uses it
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
    r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _clip_pipeline(model: BPE) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 1024) -> tuple[dict[str, int], list[str]]:
    """Train merges on `texts`; return (vocab, merges) in CLIP's layout."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = _clip_pipeline(BPE(end_of_word_suffix="</w>", unk_token=EOS))
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer)
    merges = [" ".join(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    tokens = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in seen:
            tokens.append(merged)
            seen.add(merged)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_clip_tokenizer(vocab: dict[str, int], merges: list[str], out_dir: Path) -> None:
    """Write the tokenizer as `CLIPTokenizer.save_pretrained` does (loadable by it)."""
    from transformers import CLIPTokenizer

    pairs = [tuple(m.split(" ")) for m in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=CONTEXT_LENGTH)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
