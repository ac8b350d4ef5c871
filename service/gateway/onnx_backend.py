"""A second reward backend: the exported repository's ONNX files, in process.

Same protocol as the Triton client (`RewardBackendProtocol`), same files Triton serves
(`<repo>/<model>/<version>/model.onnx`, tensor names of `service.model_contract`), so the
gateway runs for development without a Triton server and tests exercise the real models. Each
model runs under the runtime its repository serves it with (`service.onnx_models`: ONNX Runtime,
or OpenVINO for a bf16 export's towers). Models run in a worker thread (`asyncio.to_thread`) so
the event loop never blocks; runtime errors come out as `BackendError`, calls after `close()` as
`BackendUnavailable`. The runtimes are imported lazily: only when this backend is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service import model_contract as contract
from service.gateway.backend import BackendError, BackendUnavailable
from service.gateway.identity import hash_in_config
from service.model_contract import EXPORT_HASH_PARAMETER
from service.onnx_models import OnnxModel, open_served_model

_IMAGE = contract.image_encoder(0)
_TEXT = contract.text_encoder(0)
_HEAD_INPUTS = tuple(t.name for t in contract.reward_head(0, has_head=False).inputs)


class OnnxBackend:
    """The three models of an exported repository (CPU); `member`: those of a further ensemble
    member (`contract.member_model`), 0 the first model."""

    def __init__(
        self, repository: str | Path, *, intra_op_threads: int = 0, member: int = 0
    ) -> None:
        self.repository = Path(repository)
        self._models: dict[str, OnnxModel] = {}
        # the models this backend calls (image, text, reward head), by repository name
        self.models = tuple(contract.member_model(role, member) for role in contract.MEMBER_ROLES)
        for spec in (_IMAGE, _TEXT, contract.reward_head(0, has_head=False)):
            model = contract.member_model(spec.name, member)
            self._models[spec.name] = open_served_model(self.repository, model, intra_op_threads)
        self.reward_outputs = self._models["reward_head"].output_names
        self._closed = False

    async def _run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendUnavailable(f"{model}: the ONNX backend is closed")
        opened = self._models[model]
        try:
            values = await asyncio.to_thread(opened.run, feeds)
        except Exception as exc:  # each runtime raises its own exception types
            raise BackendError(f"{model}: {opened.runtime}: {exc}") from exc
        return dict(zip(opened.output_names, values, strict=True))

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise BackendError(f"images must be uint8 [B,H,W,3], got {images.dtype} {images.shape}")
        out = await self._run(_IMAGE.name, {_IMAGE.inputs[0].name: images})
        return out[_IMAGE.outputs[0].name]

    async def encode_texts(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or not 2 <= ids.shape[1] <= contract.CONTEXT_LENGTH:
            raise BackendError(f"ids must be [B, 2..{contract.CONTEXT_LENGTH}], got {ids.shape}")
        out = await self._run(_TEXT.name, {_TEXT.inputs[0].name: ids})
        return out[_TEXT.outputs[0].name]

    async def rewards(
        self,
        image_embeds: np.ndarray,
        prompt_embeds: np.ndarray,
        prompt_mask: np.ndarray,
        scale: np.ndarray,
        lam: np.ndarray,
    ) -> dict[str, np.ndarray]:
        arrays = (
            np.ascontiguousarray(image_embeds, dtype=np.float32),
            np.ascontiguousarray(prompt_embeds, dtype=np.float32),
            np.ascontiguousarray(prompt_mask, dtype=np.bool_),
            np.ascontiguousarray(scale, dtype=np.float32),
            np.ascontiguousarray(lam, dtype=np.float32),
        )
        if len({a.shape[0] for a in arrays}) != 1:
            raise BackendError(
                f"reward inputs disagree on the batch size: {[a.shape for a in arrays]}"
            )
        return await self._run("reward_head", dict(zip(_HEAD_INPUTS, arrays, strict=True)))

    async def ready(self) -> bool:
        return not self._closed

    async def export_hashes(self, models: Sequence[str]) -> dict[str, str | None]:
        """The export hash in each model's config.pbtxt (what Triton would report)."""
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        out: dict[str, str | None] = {}
        for model in models:
            path = self.repository / model / "config.pbtxt"
            if not path.is_file():
                out[model] = None
                continue
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            out[model] = hash_in_config(
                json_format.MessageToDict(config, preserving_proto_field_name=True),
                EXPORT_HASH_PARAMETER,
            )
        return out

    async def close(self) -> None:
        self._closed = True
