"""Scoring orchestration: contrastive sets → text embeddings (cached) → image embeddings → rewards.

Per item the contrastive prompts come from, in order of precedence: the item's explicit list,
the item's prompt-set id, the request's explicit list, the request's prompt-set id, a set
registered for the item's prompt, and finally the request's rule (default "auto"; a rule's
output is cut to the first `max_contrastive_prompts`). A prompt with no contrastive prompts is a
422 naming the item, unless the client allowed missing sets (then TextNorm fields are null: the
1/|P| = 1.0 of a one-prompt set would be misleading).

Per request: every unique prompt (true and contrastive, compared after the tokenizer's own
normalisation) is looked up in the embedding cache and only the misses are encoded, in one
batch; images are grouped by size (one size per encode call); all items' rewards come from one
`rewards` call with the prompt sets padded to MAX_PROMPTS and masked. (`GuardedBackend` splits
any call over the exported model's maximum batch into concurrent calls.)

A multi-model export (settings.members) scores every item with each model concurrently — its
own text and image embeddings (cached under its own checkpoint hash) and reward head, the same
tokens, contrastive set, c and λ — and adds each model's raw and TextNorm rewards and the mean
and uncertainty-regularised ensembles of the models' TextNorm probabilities (DESIGN.md 2.3).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from textnorm_reward_client.clip_tokenizer import ClipTokenizer, Tokenized

from service import model_contract as contract
from service.contrastive import NoContrastivePrompts, Vocabulary, contrastive_prompts
from service.contrastive.dedupe import normalise as normalise_prompt
from service.contrastive.errors import quote_prompt
from service.gateway.backend import GuardedBackend, gather_or_cancel
from service.gateway.calibration import Calibration, ScaleChoice, choose_scale
from service.gateway.embedding_cache import CacheKey, EmbeddingCache
from service.gateway.errors import ApiError
from service.gateway.metrics import GatewayMetrics
from service.gateway.prompt_set_registry import PromptSet, PromptSetRegistry, contrastive_set_sha256
from service.gateway.provenance import ProvenanceInfo
from service.gateway.schemas import ItemResult, MemberReward, TextNormOptions
from service.textnorm import ensemble_mean, ensemble_uncertainty

_OUTPUTS = {
    "HEAD": "head",
    "TEXTNORM_HEAD": "textnorm_head",
    "ENSEMBLE_MEAN": "ensemble_mean",
    "ENSEMBLE_UW": "ensemble_uw",
}
RULE_CACHE_ENTRIES = 4096  # (prompt, rule) → contrastive prompts (misses rebuild; exact)
_NEED_CONTRASTIVE = {"TEXTNORM_HEAD", "ENSEMBLE_MEAN", "ENSEMBLE_UW"}


@dataclass
class ContrastivePlan:
    prompts: list[str]
    source: str  # "explicit" | "prompt_set" | "rule" | "none"
    set_id: str | None = None
    field: str = ""  # the request field the contrastive prompts came from
    rule: str | None = None  # the rule that built the set (source "rule")

    @property
    def metric_label(self) -> str:
        return self.set_id if self.source == "prompt_set" and self.set_id else self.source


@dataclass
class PlannedItem:
    """One (image, prompt) to score, with everything decided before any backend call."""

    prompt: str
    plan: ContrastivePlan
    prompt_field: str
    image_field: str
    prompt_truncated: bool = False
    contrastive_truncated: int = 0
    keys: list[str] = field(default_factory=list)  # normalised [prompt, *contrastive]


@dataclass
class TextPlan:
    """Unique prompts of a request, keyed by the tokenizer's normalisation."""

    texts: dict[str, str] = field(default_factory=dict)  # normalised → first original text
    tokens: dict[str, int] = field(default_factory=dict)  # normalised → row in `tokenized`
    tokenized: Tokenized | None = None


ImageBatch = tuple[list[int], np.ndarray]  # item indices, their images stacked [B, H, W, 3]


@dataclass(frozen=True)
class ScoringModel:
    """One model of the (possibly multi-model) export, as the scorer calls it."""

    name: str
    checkpoint_sha256: str  # its embeddings are cached under this
    embed_dim: int
    backend: GuardedBackend


def cut_to_the_prompt(where: str, prompt: str, context_length: int) -> ApiError:
    """422: every contrastive prompt has the prompt's token ids once cut to the context."""
    return ApiError(
        422,
        "no_contrastive_prompts",
        f"{where}: cut to CLIP's {context_length}-token context, every contrastive prompt is "
        f"the prompt {quote_prompt(prompt)} (they differ only past the cut)",
        field=where,
        limit=context_length,
    )


class Scorer:
    def __init__(
        self,
        *,
        backend: GuardedBackend,
        tokenizer: ClipTokenizer,
        cache: EmbeddingCache,
        registry: PromptSetRegistry,
        metrics: GatewayMetrics,
        provenance: ProvenanceInfo,
        max_prompt_chars: int,
        max_contrastive: int,
        truncate_long_prompts: bool,
        vocabulary: Vocabulary | None = None,
        token_bucket: int = 4,
        calibration: Calibration | None = None,
        members: Sequence[ScoringModel] = (),
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.cache = cache
        self.registry = registry
        self.metrics = metrics
        self.provenance = provenance
        self.max_prompt_chars = max_prompt_chars
        self.max_contrastive = min(max_contrastive, contract.MAX_PROMPTS - 1)
        self.truncate_long_prompts = truncate_long_prompts
        self.vocabulary = vocabulary  # of the attribute-swap rules (None: the shapes world's)
        self.token_bucket = token_bucket  # text batches are padded to a multiple of this
        self.calibration = calibration  # calibrated c/λ (service/gateway/calibration.py)
        # An RL run sends the same prompts every step: each (prompt, rule) is built once.
        self._rule_prompts = functools.lru_cache(maxsize=RULE_CACHE_ENTRIES)(self._build_rule)
        first = ScoringModel(
            provenance.model.name, provenance.checkpoint_sha256, provenance.embed_dim, backend
        )
        self.models = (first, *members)  # every model scores every item; [0] the first
        self.member_checkpoints = tuple(m.checkpoint_sha256 for m in members)

    # -- checks --------------------------------------------------------------------------------
    def check_prompt(self, prompt: str, field_name: str) -> str:
        """An item's prompt: not empty, within the character limit, no special token, and
        (unless the server truncates) within CLIP's context, checked before any contrastive
        rule runs on it (a rule's work grows with the prompt's words)."""
        if not prompt.strip():
            raise ApiError(
                422, "empty_prompt", f"{field_name}: the prompt is empty", field=field_name
            )
        self._check_text(prompt, field_name)
        if not self.truncate_long_prompts:
            tokens = self.tokenizer.encode([prompt])
            if tokens.truncated[0]:
                raise self._too_long(field_name, "the prompt", int(tokens.lengths[0]))
        return prompt

    def _too_long(self, where: str, what: str, n_tokens: int) -> ApiError:
        ctx = self.tokenizer.context_length
        return ApiError(
            422,
            "prompt_too_long",
            f"{where}: {what} has {n_tokens} tokens, over CLIP's {ctx}-token context "
            "(the server is configured to refuse rather than truncate)",
            field=where,
            limit=ctx,
        )

    def _check_text(self, text: str, field_name: str) -> None:
        """A prompt's length, and no tokenizer special token in it (in any letter case: the
        tokenizer matches them before normalising, so the cache key would not be exact)."""
        if len(text) > self.max_prompt_chars:
            raise ApiError(
                422,
                "prompt_too_many_characters",
                f"{field_name}: {len(text)} characters, over the limit of {self.max_prompt_chars}",
                field=field_name,
                limit=self.max_prompt_chars,
            )
        if (token := self.tokenizer.special_token_in(text)) is not None:
            raise ApiError(
                422,
                "special_token_in_prompt",
                f"{field_name}: holds the tokenizer's special token {token} (in some letter "
                "case); prompts are plain text",
                field=field_name,
            )

    def check_contrastive_list(self, prompts: list[str], field_name: str) -> None:
        if len(prompts) > self.max_contrastive:
            raise ApiError(
                422,
                "too_many_contrastive_prompts",
                f"{field_name}: {len(prompts)} contrastive prompts, over the limit of "
                f"{self.max_contrastive}",
                field=field_name,
                limit=self.max_contrastive,
            )
        for j, text in enumerate(prompts):
            self._check_text(text, f"{field_name}[{j}]")

    def _set_for_id(self, set_id: str, prompt: str, field_name: str) -> PromptSet:
        found = self.registry.get(set_id)
        if found is None:
            raise ApiError(
                422,
                "unknown_prompt_set",
                f"{field_name}: no prompt set with id {set_id!r}",
                field=field_name,
            )
        if found.content_key[0] != normalise_prompt(prompt):
            raise ApiError(
                422,
                "prompt_set_mismatch",
                f"{field_name}: prompt set {set_id!r} is for {quote_prompt(found.prompt)}, "
                f"not {quote_prompt(prompt)}",
                field=field_name,
            )
        return found

    # -- planning ------------------------------------------------------------------------------
    def plan_contrastive(
        self,
        prompt: str,
        prompt_field: str,
        options: TextNormOptions,
        item_prefix: str | None = None,
        item_contrastive: list[str] | None = None,
        item_set: str | None = None,
    ) -> ContrastivePlan:
        """The contrastive prompts of one item (see the module docstring for the order)."""
        if item_contrastive is not None:
            where = f"{item_prefix}.contrastive"
            return self._explicit(prompt, prompt_field, item_contrastive, where, options)
        if item_set is not None:
            where = f"{item_prefix}.prompt_set"
            found = self._set_for_id(item_set, prompt, where)
            return ContrastivePlan(list(found.contrastive), "prompt_set", found.id, where)
        if options.contrastive is not None:
            where = "textnorm.contrastive"
            return self._explicit(prompt, prompt_field, options.contrastive, where, options)
        if options.prompt_set is not None:
            where = "textnorm.prompt_set"
            found = self._set_for_id(options.prompt_set, prompt, where)
            return ContrastivePlan(list(found.contrastive), "prompt_set", found.id, where)
        registered = self.registry.for_prompt(prompt)
        if registered is not None:
            return ContrastivePlan(
                list(registered.contrastive), "prompt_set", registered.id, prompt_field
            )
        try:
            generated = self._rule_prompts(prompt, options.rule)
        except NoContrastivePrompts as exc:
            return self._missing(prompt_field, prompt, options, f"rule {options.rule!r}: {exc}")
        return ContrastivePlan(list(generated), "rule", field=prompt_field, rule=options.rule)

    def _build_rule(self, prompt: str, rule: str) -> tuple[str, ...]:
        """The rule's prompts, cut to `max_contrastive` before they are cached: a long prompt
        can make thousands, and the cache holds RULE_CACHE_ENTRIES prompts' worth."""
        generated = contrastive_prompts(prompt, rule, vocabulary=self.vocabulary)
        return tuple(generated[: self.max_contrastive])

    def _explicit(
        self,
        prompt: str,
        prompt_field: str,
        candidates: list[str],
        field_name: str,
        options: TextNormOptions,
    ) -> ContrastivePlan:
        self.check_contrastive_list(candidates, field_name)
        try:
            cleaned = PromptSetRegistry.clean(prompt, candidates)
        except NoContrastivePrompts as exc:
            return self._missing(prompt_field, prompt, options, f"{field_name}: {exc}")
        return ContrastivePlan(list(cleaned), "explicit", field=field_name)

    def _missing(
        self, where: str, prompt: str, options: TextNormOptions, reason: str
    ) -> ContrastivePlan:
        if options.allow_missing:
            return ContrastivePlan([], "none")
        raise ApiError(
            422,
            "no_contrastive_prompts",
            f"{where}: no contrastive prompts for prompt {quote_prompt(prompt)} ({reason}); "
            "TextNorm over the prompt alone would be a meaningless 1.0. Supply "
            "textnorm.contrastive or a prompt_set, pick another textnorm.rule, or set "
            "textnorm.allow_missing to get null TextNorm fields",
            field=where,
        )

    def plan_texts(self, items: Sequence[PlannedItem]) -> TextPlan:
        """Tokenise every unique prompt once; enforce (or record) the context length.

        Contrastive prompts the tokenizer cannot tell from the prompt or from an earlier one
        (same cache key, so the same embedding) are dropped: the true prompt twice in P would
        cap TextNorm near 1/2."""
        plan = TextPlan()
        for item in items:
            item.keys = [self.tokenizer.normalise(item.prompt)]
            kept = []
            for text in item.plan.prompts:
                key = self.tokenizer.normalise(text)
                if key not in item.keys:
                    item.keys.append(key)
                    kept.append(text)
            if len(kept) < len(item.plan.prompts):
                if not kept:
                    where = item.plan.field or item.prompt_field
                    raise ApiError(
                        422,
                        "no_contrastive_prompts",
                        f"{where}: every contrastive prompt tokenises the same as the prompt "
                        f"{quote_prompt(item.prompt)}",
                        field=where,
                    )
                item.plan = replace(item.plan, prompts=kept)
            for key, text in zip(item.keys, (item.prompt, *kept), strict=True):
                plan.texts.setdefault(key, text)
        keys = list(plan.texts)
        plan.tokenized = self.tokenizer.encode([plan.texts[k] for k in keys])
        plan.tokens = {k: i for i, k in enumerate(keys)}
        for item in items:
            rows = [plan.tokens[k] for k in item.keys]
            truncated = plan.tokenized.truncated[rows]
            if truncated.any() and self.truncate_long_prompts:
                rows = self._drop_cut_repeats(item, plan, rows)
                truncated = plan.tokenized.truncated[rows]
            if truncated.any() and not self.truncate_long_prompts:
                j = int(np.argmax(truncated))
                n_tokens = int(plan.tokenized.lengths[rows[j]])
                if j == 0:
                    where, what = item.prompt_field, "the prompt"
                else:
                    where = item.plan.field or item.prompt_field
                    what = f"contrastive prompt {quote_prompt(item.plan.prompts[j - 1])}"
                raise self._too_long(where, what, n_tokens)
            item.prompt_truncated = bool(truncated[0])
            item.contrastive_truncated = int(truncated[1:].sum())
        if self.truncate_long_prompts:  # texts `_drop_cut_repeats` dropped are not encoded
            used = {key for item in items for key in item.keys}
            for key in [k for k in plan.texts if k not in used]:
                del plan.texts[key]
        return plan

    def _drop_cut_repeats(self, item: PlannedItem, plan: TextPlan, rows: list[int]) -> list[int]:
        """Cut to CLIP's context, texts that differ only past the cut have the same token ids,
        so the same embedding: contrastive prompts that became the prompt's or an earlier
        one's tokens are dropped, as repeats are before tokenising. The rows left."""
        assert plan.tokenized is not None
        first = plan.tokenized.distinct(rows)  # position 0, the prompt, is always first
        if len(first) == len(rows):
            return rows
        if len(first) == 1:
            where = item.plan.field or item.prompt_field
            raise cut_to_the_prompt(where, item.prompt, self.tokenizer.context_length)
        item.keys = [item.keys[j] for j in first]
        item.plan = replace(item.plan, prompts=[item.plan.prompts[j - 1] for j in first[1:]])
        return [rows[j] for j in first]

    # -- backend work --------------------------------------------------------------------------
    def cache_key(self, normalised: str, model: ScoringModel | None = None) -> CacheKey:
        return ((model or self.models[0]).checkpoint_sha256, normalised)

    async def text_embeddings(
        self, plan: TextPlan, model: ScoringModel | None = None
    ) -> dict[str, np.ndarray]:
        """normalised prompt → embedding of `model` (None: the first), from the cache or one
        encode of the misses."""
        model = model or self.models[0]
        found: dict[str, np.ndarray] = {}
        misses: list[str] = []
        for key in plan.texts:
            value = self.cache.get(self.cache_key(key, model))
            if value is None:
                misses.append(key)
            else:
                found[key] = value
        self.metrics.cache_hits.inc(len(found))
        self.metrics.cache_misses.inc(len(misses))
        if misses:
            assert plan.tokenized is not None
            rows = [plan.tokens[k] for k in misses]
            if self.provenance.dynamic_tokens:
                ids = plan.tokenized.rows(rows, self.token_bucket)
            else:  # an export whose text encoder takes the full context only
                ids = plan.tokenized.ids[rows]
            embeds = await model.backend.encode_texts(ids)
            for key, emb in zip(misses, embeds, strict=True):
                self.cache.put(self.cache_key(key, model), emb)
                found[key] = emb
            self.metrics.cache_entries.set(len(self.cache))
        return found

    @staticmethod
    async def image_batches(images: Sequence[np.ndarray]) -> list[ImageBatch]:
        """The images grouped by size (one encode call each), stacked once for every model."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)

        async def stack(idx: list[int]) -> ImageBatch:
            # the batch copy (tens of MB for a large request) runs off the event loop
            return idx, await asyncio.to_thread(np.stack, [images[i] for i in idx])

        return await gather_or_cancel(*(stack(idx) for idx in groups.values()))

    async def image_embeddings(
        self, batches: Sequence[ImageBatch], n: int, model: ScoringModel | None = None
    ) -> np.ndarray:
        """[n, D] of `model` (None: the first) in item order, from :meth:`image_batches`."""
        model = model or self.models[0]
        parts = await gather_or_cancel(*(model.backend.encode_images(b) for _, b in batches))
        out = np.empty((n, model.embed_dim), np.float32)
        for (idx, _), emb in zip(batches, parts, strict=True):
            out[idx] = emb
        return out

    async def score(
        self,
        items: Sequence[PlannedItem],
        text_plan: TextPlan,
        images: Sequence[np.ndarray],
        scale: float | None,
        lam: float | None,
    ) -> list[ItemResult]:
        """Rewards of every item; `scale`/`lam`: the request's (None: each item's calibrated
        value, else the model's default; service/gateway/calibration.py)."""
        shas = [
            contrastive_set_sha256(it.prompt, it.plan.prompts) if it.plan.prompts else None
            for it in items
        ]
        choices = [
            choose_scale(
                self.calibration,
                it.prompt,
                sha,
                it.plan.source,
                scale,
                lam,
                self.provenance.default_scale,
                self.provenance.default_lambda,
                rule=it.plan.rule or "auto",
                members=self.member_checkpoints,
            )
            for it, sha in zip(items, shas, strict=True)
        ]
        n = len(items)
        # each model's c per item: the first model's, then each member's own (calibration.py)
        per_item = np.array([c.model_scales for c in choices], np.float32)
        per_item = per_item.reshape(n, len(self.models))
        scales = [per_item[:, [k]] for k in range(len(self.models))]  # [n, 1] copies
        lambdas = np.array([c.ensemble_lambda for c in choices], np.float32).reshape(n, 1)
        # stacked once for every model, off the loop, while the text embeddings are looked up
        batches = asyncio.ensure_future(self.image_batches(images))
        outs = await gather_or_cancel(
            *(
                self._model_rewards(model, items, text_plan, batches, model_scales, lambdas)
                for model, model_scales in zip(self.models, scales, strict=True)
            )
        )
        out = outs[0]
        results = []
        for i, item in enumerate(items):
            has_set = bool(item.plan.prompts)
            values = {
                "raw": float(out["RAW"][i]),
                "textnorm": float(out["TEXTNORM"][i]) if has_set else None,
            }
            for name, key in _OUTPUTS.items():
                if name in out and (has_set or name not in _NEED_CONTRASTIVE):
                    values[key] = float(out[name][i])
            if len(self.models) > 1:
                values |= self._model_ensemble(outs, i, has_set, choices[i])
            results.append(
                ItemResult(
                    **values,
                    contrastive_count=len(item.plan.prompts),
                    contrastive_source=item.plan.source,
                    prompt_set=item.plan.set_id,
                    contrastive_sha256=shas[i],
                    textnorm_scale=choices[i].scale if has_set else None,
                    ensemble_lambda=choices[i].ensemble_lambda if has_set else None,
                    textnorm_scale_source=choices[i].source if has_set else None,
                    prompt_truncated=item.prompt_truncated,
                    contrastive_truncated=item.contrastive_truncated,
                    export_sha256=self.provenance.data.get("export_sha256"),
                )
            )
            if has_set:
                self.metrics.observe_textnorm(item.plan.metric_label, values["textnorm"])
            if item.prompt_truncated:
                self.metrics.prompts_truncated.inc()
        return results

    async def _model_rewards(
        self,
        model: ScoringModel,
        items: Sequence[PlannedItem],
        text_plan: TextPlan,
        batches: Awaitable[list[ImageBatch]],
        scales: np.ndarray,
        lambdas: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Every item's reward-head outputs of one model (`batches`: the shared image_batches
        task, awaited by every model)."""
        n, p = len(items), contract.MAX_PROMPTS

        async def image_embeds_of() -> np.ndarray:
            # shielded: this model's failure cancels this task, not the other models' batches
            return await self.image_embeddings(await asyncio.shield(batches), n, model)

        texts, image_embeds = await gather_or_cancel(
            self.text_embeddings(text_plan, model), image_embeds_of()
        )
        prompt_embeds = np.zeros((n, p, model.embed_dim), np.float32)
        mask = np.zeros((n, p), bool)
        for i, item in enumerate(items):
            for j, key in enumerate(item.keys):
                prompt_embeds[i, j] = texts[key]
            mask[i, : len(item.keys)] = True
        return await model.backend.rewards(image_embeds, prompt_embeds, mask, scales, lambdas)

    def _model_ensemble(
        self, outs: Sequence[dict[str, np.ndarray]], i: int, has_set: bool, choice: ScaleChoice
    ) -> dict[str, object]:
        """Item `i`'s per-model rewards and the ensembles of the models' TextNorm (DESIGN 2.3),
        each model's TextNorm at its own c, the ensemble at the models' λ."""
        members = [
            MemberReward(
                name=model.name,
                raw=float(out["RAW"][i]),
                textnorm=float(out["TEXTNORM"][i]) if has_set else None,
                textnorm_scale=c if has_set else None,
            )
            for model, out, c in zip(self.models, outs, choice.model_scales, strict=True)
        ]
        if not has_set:
            return {"members": members}
        lam = choice.ensemble_models_lambda
        probs = np.array([[out["TEXTNORM"][i]] for out in outs], np.float64)
        return {
            "members": members,
            "ensemble_models_mean": float(ensemble_mean(probs)[0]),
            "ensemble_models_uw": float(ensemble_uncertainty(probs, lam=lam)[0]),
            "ensemble_models_lambda": lam,
        }

    async def pre_encode(self, texts: Sequence[str]) -> None:
        """Encode and cache `texts` (registered sets) now, with every model; backend errors
        propagate. They are tokenised in a worker thread: an import may bring 100,000s."""
        plan = await asyncio.to_thread(self._plan_for, texts)
        await gather_or_cancel(*(self.text_embeddings(plan, model) for model in self.models))

    def _plan_for(self, texts: Sequence[str]) -> TextPlan:
        keys: dict[str, str] = {}
        for text in texts:
            keys.setdefault(self.tokenizer.normalise(text), text)
        plan = TextPlan(texts=keys)
        plan.tokenized = self.tokenizer.encode(list(keys.values()))
        plan.tokens = {k: i for i, k in enumerate(keys)}
        return plan

    def set_cache_keys(self, prompt_set: PromptSet) -> list[CacheKey]:
        return self.cache_keys(prompt_set.prompt, prompt_set.contrastive)

    def cache_keys(self, prompt: str, contrastive: Sequence[str]) -> list[CacheKey]:
        """The cache keys of a prompt and its set under every model (thread-safe)."""
        keys = [self.tokenizer.normalise(t) for t in (prompt.strip(), *contrastive)]
        return list(dict.fromkeys(self.cache_key(k, m) for m in self.models for k in keys))
