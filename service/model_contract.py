"""The tensor contract between the exporter, the Triton repository and the gateway.

Model names, tensor names, dtypes and per-item shapes (Triton's batch dimension is implicit and
comes first). Export writes ONNX files with exactly these names; both repository flavours (CPU:
Python backend + ONNX Runtime, GPU: onnxruntime/TensorRT backends) expose them unchanged; the
gateway and the trainer-side client speak them. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONTEXT_LENGTH = 77  # CLIP's text context
MAX_PROMPTS = 33  # the true prompt + up to 32 contrastive prompts, padded and masked
# Every model config of an export carries the repository's content hash under this parameter
# (provenance.json names the same hash); the gateway refuses a Triton whose models differ.
EXPORT_HASH_PARAMETER = "export_sha256"
# How far an export's raw reward (cosine) may be from the PyTorch fp32 reference, by the
# precision of its towers (`export --precision`; checked by `verify` and `bench serving`):
# fp32 the 1e-4; int8 measured up to 1.2e-2 over the 2,500 benchmark images served
# in batches (README "int8 towers").
RAW_TOLERANCE = {"fp32": 1e-4, "int8": 3e-2, "bf16": 3e-2}
# ... and every model of an export has one version, a number derived from that hash, so a
# request for (model, version) reaches only that export: a Triton pod serving another one
# answers "unknown version" instead of a reward (the gateway asks for the version every call).
# The TextNorm calibration an export may bundle (`export --calibration`): the c/λ the gateway
# serving the repository uses by default, inside the export hash.
CALIBRATION_FILE = "calibration.json"
BUILD_VERSION = "1"  # the version folder while an export is written, before its hash exists


def export_version(export_sha256: str) -> int:
    """The model version of every model of the export with this content hash (≥ 2)."""
    return 2 + int(export_sha256[:12], 16)


def version_dir(repository: Path, model: str) -> Path:
    """The (one) version folder of `model` in an exported repository."""
    found = [p for p in (Path(repository) / model).iterdir() if p.name.isdigit()]
    if len(found) != 1:
        raise ValueError(f"{repository}/{model}: expected one version folder, found {len(found)}")
    return found[0]


# CPU models have a second config, configs/<this>.pbtxt: the Python-backend shim that the
# pip-bundled tritonserver (Python backend only) selects with --model-config-name=<this>.
BUNDLED_CONFIG_NAME = "bundled"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[int, ...]  # per item, without the batch dimension; -1 = variable

    @property
    def triton_dtype(self) -> str:
        return {
            "uint8": "TYPE_UINT8",
            "int64": "TYPE_INT64",
            "float32": "TYPE_FP32",
            "bool": "TYPE_BOOL",
        }[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


# A multi-model ensemble (settings.members) is one export: the first model keeps the names
# below, member k ≥ 1 serves the same three models under `member{k}_<name>`. Members share the
# first model's tokenizer (one tokenisation feeds every text encoder).
MEMBER_ROLES = ("image_encoder", "text_encoder", "reward_head")


def member_model(name: str, member: int) -> str:
    """The repository name of model `name` of ensemble member `member` (0: the first model)."""
    return name if member == 0 else f"member{member}_{name}"


def for_member(spec: ModelSpec, member: int) -> ModelSpec:
    """`spec` under member `member`'s model name (same tensors)."""
    return ModelSpec(member_model(spec.name, member), spec.inputs, spec.outputs)


def image_encoder(embed_dim: int) -> ModelSpec:
    """uint8 RGB images (one height/width per batch), CLIP preprocessing in the graph."""
    return ModelSpec(
        "image_encoder",
        (Tensor("IMAGE", "uint8", (-1, -1, 3)),),
        (Tensor("IMAGE_EMBEDS", "float32", (embed_dim,)),),
    )


def text_encoder(embed_dim: int) -> ModelSpec:
    """Token ids, [T] per item with 2 ≤ T ≤ CONTEXT_LENGTH: a batch needs only as many tokens
    as its longest prompt (rows padded with the end token; tokenisation stays in Python)."""
    return ModelSpec(
        "text_encoder",
        (Tensor("INPUT_IDS", "int64", (-1,)),),
        (Tensor("TEXT_EMBEDS", "float32", (embed_dim,)),),
    )


CLIP_REWARDS = ("RAW", "TEXTNORM")
HEAD_REWARDS = ("HEAD", "TEXTNORM_HEAD", "ENSEMBLE_MEAN", "ENSEMBLE_UW")


def reward_head(embed_dim: int, has_head: bool) -> ModelSpec:
    """Image embedding + [prompt, contrastive prompts] embeddings → every reward.

    PROMPT_MASK marks real prompts (index 0, the true prompt, always true). RAW is the cosine
    with the true prompt; TEXTNORM the probability of the true prompt (DESIGN.md 2.3); with a
    learned head also HEAD, TEXTNORM_HEAD and the two ensembles of the two TextNorms.
    """
    rewards = CLIP_REWARDS + (HEAD_REWARDS if has_head else ())
    return ModelSpec(
        "reward_head",
        (
            Tensor("IMAGE_EMBEDS", "float32", (embed_dim,)),
            Tensor("PROMPT_EMBEDS", "float32", (MAX_PROMPTS, embed_dim)),
            Tensor("PROMPT_MASK", "bool", (MAX_PROMPTS,)),
            Tensor("TEXTNORM_SCALE", "float32", (1,)),
            Tensor("ENSEMBLE_LAMBDA", "float32", (1,)),
        ),
        tuple(Tensor(name, "float32", (1,)) for name in rewards),
    )


def score(embed_dim: int, has_head: bool) -> ModelSpec:
    """The one-call pipeline (Triton BLS): images + token ids of [prompt, contrastive...] →
    the rewards of `reward_head`. Row 0 of INPUT_IDS is the true prompt."""
    head = reward_head(embed_dim, has_head)
    return ModelSpec(
        "score",
        (
            Tensor("IMAGE", "uint8", (-1, -1, 3)),
            Tensor("INPUT_IDS", "int64", (MAX_PROMPTS, CONTEXT_LENGTH)),
            Tensor("PROMPT_MASK", "bool", (MAX_PROMPTS,)),
            Tensor("TEXTNORM_SCALE", "float32", (1,)),
            Tensor("ENSEMBLE_LAMBDA", "float32", (1,)),
        ),
        head.outputs,
    )
