"""CLIP tokenisation without transformers: HF `tokenizers` on the model's tokenizer.json.

Shared by the gateway and the direct gRPC client (needs the `grpc` or `numpy` extra's numpy and
`tokenizers`), so both send Triton exactly the same token ids.

Matches `CLIPTokenizer(prompts, padding="max_length", max_length=77, truncation=True)` (the
exporter's `export.clip_model.tokenize`): `<|startoftext|>` … `<|endoftext|>`, a prompt over the
context keeps its first 75 tokens and the end token, and rows are padded to 77 with the end
token's id (the text encoder pools at the first end token, so padding never changes the
embedding). Whether a prompt was truncated is reported, never silently hidden.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

CONTEXT_LENGTH = 77  # CLIP's text context (= service.model_contract.CONTEXT_LENGTH, tested)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray  # int64 [N, 77]
    truncated: np.ndarray  # bool [N]
    lengths: np.ndarray  # int [N], tokens before truncation (special tokens included)

    def distinct(self, index: list[int]) -> list[int]:
        """Positions in `index` whose row no earlier one equals: cut to the context, texts that
        differ only past the cut have the same ids, so the same embedding."""
        seen: set[bytes] = set()
        first = []
        for position, row in enumerate(index):
            if (ids := self.ids[row].tobytes()) not in seen:
                seen.add(ids)
                first.append(position)
        return first

    def rows(self, index: list[int] | np.ndarray, bucket: int) -> np.ndarray:
        """ids of `index`, only as many columns as the longest of them needs, rounded up to a
        multiple of `bucket` (fewer distinct shapes, so Triton's batcher can merge calls).
        Exact: every row keeps its end token, and the text tower never looks past it."""
        needed = int(np.minimum(self.lengths[index], self.ids.shape[1]).max(initial=2))
        width = min(self.ids.shape[1], -(-needed // bucket) * bucket)
        return self.ids[index, :width]


class ClipTokenizer:
    def __init__(
        self, path: str | Path, context_length: int = CONTEXT_LENGTH, memo_entries: int = 50_000
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"tokenizer file not found: {self.path}")
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own exception types
            raise ValueError(f"cannot load tokenizer {self.path}: {exc}") from exc
        self._tok.no_truncation()
        self._tok.no_padding()
        self.bos_id = self._tok.token_to_id(BOS)
        self.eos_id = self._tok.token_to_id(EOS)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{self.path}: not a CLIP tokenizer (no {BOS} / {EOS} tokens)")
        self.context_length = context_length

        # An RL run repeats its prompts and their contrastive sets on every request: remember
        # what they normalise and tokenise to (bounded: the oldest entries go first).
        self._normalised: OrderedDict[str, str] = OrderedDict()
        self._tokens: OrderedDict[str, list[int]] = OrderedDict()
        self.memo_entries = memo_entries
        self._memo_lock = threading.Lock()  # a lookup and an eviction may race across threads
        # Special tokens are matched in the raw text, before normalisation: a prompt holding
        # one in another letter case normalises like one holding it exactly, but tokenises
        # unlike it, so `normalise` could not key the embedding cache for either.
        added = self._tok.get_added_tokens_decoder().values()
        self._special = {self.normalise(t.content): t.content for t in added if t.special}

    def _remember(self, memo: OrderedDict, key: str, value):
        with self._memo_lock:
            memo[key] = value
            while len(memo) > self.memo_entries:
                memo.popitem(last=False)
        return value

    def normalise(self, prompt: str) -> str:
        """The tokenizer's own normalisation (CLIP: NFC, whitespace collapsed, lower case):
        prompts equal after it have the same token ids, so it keys the embedding cache."""
        if (known := self._normalised.get(prompt)) is not None:
            return known
        normalizer = self._tok.normalizer
        value = normalizer.normalize_str(prompt) if normalizer is not None else prompt
        return self._remember(self._normalised, prompt, value)

    def special_token_in(self, prompt: str) -> str | None:
        """The special token (such as <|endoftext|>) `prompt` holds in any letter case, if
        any: no prompt needs one, and the gateway refuses such prompts."""
        text = self.normalise(prompt)
        return next((token for key, token in self._special.items() if key in text), None)

    def _token_lists(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt with the start and end tokens, untruncated."""
        found = {p: t for p in prompts if (t := self._tokens.get(p)) is not None}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        encoded = self._tok.encode_batch(missing, add_special_tokens=True) if missing else []
        for prompt, encoding in zip(missing, encoded, strict=True):
            tokens = list(encoding.ids)
            if not tokens or tokens[0] != self.bos_id:  # a tokenizer.json without the template
                tokens.insert(0, self.bos_id)
            if tokens[-1] != self.eos_id or len(tokens) == 1:
                tokens.append(self.eos_id)
            found[prompt] = self._remember(self._tokens, prompt, tokens)
        return [found[p] for p in prompts]

    def encode(self, prompts: list[str]) -> Tokenized:
        n, ctx = len(prompts), self.context_length
        ids = np.full((n, ctx), self.eos_id, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        lengths = np.zeros(n, dtype=np.int64)
        for row, tokens in enumerate(self._token_lists(prompts)):
            lengths[row] = len(tokens)
            if len(tokens) > ctx:
                tokens = tokens[: ctx - 1] + [self.eos_id]
                truncated[row] = True
            ids[row, : len(tokens)] = tokens
        return Tokenized(ids=ids, truncated=truncated, lengths=lengths)
