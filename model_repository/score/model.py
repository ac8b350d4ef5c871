"""Triton BLS model `score`: one call with uint8 images and token ids returns every reward.

For trainers that talk KServe v2 gRPC to Triton directly (no gateway): inputs IMAGE, INPUT_IDS
[MAX_PROMPTS, 77] (row 0 the true prompt, then contrastive prompts), PROMPT_MASK,
TEXTNORM_SCALE, ENSEMBLE_LAMBDA; outputs those of `reward_head`. Requests that Triton's dynamic
batcher hands over together are scored together: one `image_encoder` call per image size, one
`text_encoder` call for the prompt rows not in the text cache (an LRU keyed by a row's tokens
up to its end token: an RL run repeats its prompts, as the gateway's cache knows), with only as
many tokens as the longest of them needs, one `reward_head` call. The same file serves the CPU
and the GPU flavours: it only calls other models by name.
"""

import json
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils


def _get(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.text_batch = int(params.get("text_max_batch", "64"))
        self.eos = int(params["eos_token_id"])
        self.vocab = int(params["vocab_size"])
        self.bucket = int(params.get("token_bucket", "16"))
        self.cache_entries = int(params.get("text_cache_entries", "50000"))
        self.cache = OrderedDict()  # a row's tokens up to its end token (bytes) → embedding
        self.outputs = [o["name"] for o in config["output"]]
        # nested calls' outputs in host memory: a TensorRT/GPU model's stay on the GPU
        # otherwise, and `as_numpy()` refuses them (the GPU flavour's towers). Built here: the
        # stub adds these names to pb_utils after the file is imported.
        self.host = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def _text_embeddings(self, rows):
        """[N, 77] token rows → [N, D], from the cache or one trimmed encode of the misses."""
        ends = np.argmax(rows == self.eos, axis=1)  # first end token (77 = none: truncated)
        ends = np.where(rows[np.arange(len(rows)), ends] == self.eos, ends + 1, rows.shape[1])
        keys = [row[:end].tobytes() for row, end in zip(rows, ends, strict=True)]
        misses = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if misses:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            index = [first[k] for k in misses]
            width = min(rows.shape[1], -(-int(ends[index].max()) // self.bucket) * self.bucket)
            todo = rows[index, :width]
            encoded = np.concatenate(
                [
                    self._infer(
                        "text_encoder",
                        {"INPUT_IDS": todo[s : s + self.text_batch]},
                        ["TEXT_EMBEDS"],
                    )["TEXT_EMBEDS"]
                    for s in range(0, len(todo), self.text_batch)
                ]
            )
            for key, embedding in zip(misses, encoded, strict=True):
                # a copy: a row view would keep the whole batch's array alive with it
                self.cache[key] = embedding.copy()
        out = []
        for key in keys:
            self.cache.move_to_end(key)
            out.append(self.cache[key])
        while len(self.cache) > self.cache_entries:
            self.cache.popitem(last=False)
        return np.stack(out)

    def _infer(self, model, inputs, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model,
            requested_output_names=outputs,
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
            preferred_memory=self.host,
        )
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{model}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def _score(self, requests):
        images = [_get(r, "IMAGE") for r in requests]
        ids = np.concatenate([_get(r, "INPUT_IDS") for r in requests])
        mask = np.concatenate([_get(r, "PROMPT_MASK") for r in requests]).astype(bool)
        scale = np.concatenate([_get(r, "TEXTNORM_SCALE") for r in requests])
        lam = np.concatenate([_get(r, "ENSEMBLE_LAMBDA") for r in requests])
        # Callers here speak raw KServe v2, without the gateway's validation: refuse what would
        # give a silently wrong reward instead of computing it.
        if not mask[:, 0].all():
            raise ValueError("PROMPT_MASK[:, 0] must be true: row 0 is the true prompt")
        # The text tower's Gather wraps negative ids round to other tokens, and fails on ids
        # past the vocabulary with an error that reaches a BLS caller as INTERNAL (Triton 2.51
        # keeps a composed model's message, not its code): both are the caller's error here.
        if (ids < 0).any() or (ids >= self.vocab).any():
            raise ValueError(f"INPUT_IDS must be token ids in [0, {self.vocab})")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("TEXTNORM_SCALE must be finite and > 0")
        if not (np.isfinite(lam).all() and (lam >= 0).all()):
            raise ValueError("ENSEMBLE_LAMBDA must be finite and >= 0")
        sizes = [len(x) for x in images]
        embeds = [None] * len(images)
        by_shape = {}
        for i, x in enumerate(images):
            by_shape.setdefault(x.shape[1:], []).append(i)
        for indices in by_shape.values():
            out = self._infer(
                "image_encoder",
                {"IMAGE": np.concatenate([images[i] for i in indices])},
                ["IMAGE_EMBEDS"],
            )["IMAGE_EMBEDS"]
            start = 0
            for i in indices:
                embeds[i] = out[start : start + sizes[i]]
                start += sizes[i]
        image_embeds = np.concatenate(embeds)
        text = self._text_embeddings(ids[mask])
        prompt_embeds = np.zeros(mask.shape + (text.shape[-1],), np.float32)
        prompt_embeds[mask] = text
        rewards = self._infer(
            "reward_head",
            {
                "IMAGE_EMBEDS": image_embeds,
                "PROMPT_EMBEDS": prompt_embeds,
                "PROMPT_MASK": mask,
                "TEXTNORM_SCALE": scale,
                "ENSEMBLE_LAMBDA": lam,
            },
            self.outputs,
        )
        responses, start = [], 0
        for n in sizes:
            tensors = [
                pb_utils.Tensor(k, np.ascontiguousarray(v[start : start + n]))
                for k, v in rewards.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def execute(self, requests):
        try:
            return self._score(requests)
        except Exception:
            pass  # one bad request must not fail the others batched with it: score alone
        responses = []
        for request in requests:
            try:
                responses.extend(self._score([request]))
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
