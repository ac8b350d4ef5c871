"""Write a complete Triton model repository for a CLIP checkpoint (+ optional learned head).

Layout (both flavours expose the same model names and tensors, `service.model_contract`):

    OUT/provenance.json            sha256 of every artifact, the content hash (export_sha256),
                                   sources, versions, TextNorm defaults
    OUT/README.md                  what is inside and how it runs
    OUT/tokenizer.json             the model's tokenizer (the gateway tokenizes with it)
    OUT/image_encoder/             cpu: ONNX with preprocessing in-graph;
                                   gpu: ensemble image_preprocess (ORT, GPU) → image_tower (TRT)
    OUT/text_encoder/V/…           cpu: model.onnx (+ model.py shim); gpu: model.onnx → model.plan
    OUT/reward_head/V/…            model.onnx (+ model.py shim on cpu); exact fp32 in both flavours
    OUT/score/V/model.py           the one-call BLS pipeline for direct gRPC clients
    (V, every model's one version: a number derived from the content hash, export_version)
    OUT/engines.json               gpu: the TensorRT engines `build-engines` builds on the node

CPU models have two configs: `config.pbtxt` (native onnxruntime backend, the NGC server) and
`configs/bundled.pbtxt` (Python backend, the pip-bundled server). Every config carries the
content hash, which the gateway checks against provenance.json before it serves.

The repository is built in a temporary directory beside OUT and moved into place only when
complete. Exporting inputs whose cache key (checkpoint, head, options, library versions, export
code) equals the one recorded in OUT/provenance.json is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import onnx
from rich.progress import Progress

from export import onnx_export
from export.clip_model import (
    ClipBundle,
    check_clip_source,
    check_member,
    checkpoint_hash,
    load_clip,
    local_checkpoint_dir,
)
from export.options import ExportOptions
from export.reward_head import RewardHead, load_head
from export.tensorrt import ENGINES_FILE, batch_profile
from export.triton_config import (
    Batching,
    ensemble_config,
    gpu_config,
    model_config,
    native_cpu_config,
    python_onnx_config,
    with_export_hash,
)
from model_repository import PYTHON_ONNX_MODEL, SCORE_MODEL
from service import model_contract as contract
from service import onnx_models
from service.onnx_models import ONNX_RUNTIME, OPENVINO_BF16, Runtime

# The CPU runtime of each precision's towers (the reward head is ONNX Runtime fp32 in every
# export): bf16 is the fp32 ONNX file run by OpenVINO with bfloat16 MatMuls (AMX / AVX-512 BF16).
TOWER_RUNTIME = {"fp32": ONNX_RUNTIME, "int8": ONNX_RUNTIME, "bf16": OPENVINO_BF16}
FORMAT_VERSION = 2  # 2: content hash in every config, native + bundled CPU configs


def _versions() -> dict[str, str | None]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    from export.tensorrt import tensorrt_version

    return {
        "exporter": version("textnorm-reward-service"),
        "format": str(FORMAT_VERSION),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "onnx": version("onnx"),
        "onnxscript": version("onnxscript"),  # torch.onnx's optimizer: shapes the graphs' bytes
        "onnx_ir": version("onnx-ir"),  # and the IR passes run on them
        "onnxruntime": version("onnxruntime"),
        "openvino": version("openvino"),
        "tensorrt": tensorrt_version(),
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _code_hashes() -> dict[str, str]:
    """The code an export copies or runs: a change to it must invalidate cached exports."""
    export_dir = Path(__file__).resolve().parent
    files = [PYTHON_ONNX_MODEL, SCORE_MODEL, Path(contract.__file__), Path(onnx_models.__file__)]
    files += [
        export_dir / f"{m}.py"
        for m in (
            "onnx_preprocess",
            "onnx_export",
            "onnx_quantize",
            "triton_config",
            "repository",
            "options",
            "textnorm_torch",
            "reward_head",
            "tensorrt",  # engine recipes (profiles) in engines.json
            "clip_model",  # loading and tokenising a checkpoint
        )
    ]
    return {f.name: sha256_file(f) for f in files}


def cache_key(
    checkpoint_sha: str,
    head_sha: str | None,
    options: ExportOptions,
    member_shas: Sequence[str] = (),
    calibration_sha: str | None = None,
) -> str:
    versions = {k: v for k, v in _versions().items() if k != "python"}
    payload = {
        "checkpoint": checkpoint_sha,
        "head": head_sha,
        "members": list(member_shas),
        "calibration": calibration_sha,
        "options": asdict(options),
        "versions": versions,
        "code": _code_hashes(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def head_hash(head_dir: Path) -> str:
    from export.reward_head import CONFIG, WEIGHTS

    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        digest.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(head_dir / name)))
    return digest.hexdigest()


def read_provenance(out: Path) -> dict | None:
    try:
        return json.loads((out / "provenance.json").read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(out: Path, key: str) -> bool:
    """OUT holds a complete export with this cache key and untouched artifacts."""
    prov = read_provenance(out)
    if not prov or prov.get("cache_key") != key:
        return False
    artifacts = prov.get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        return False
    return all(
        (out / rel).is_file() and sha256_file(out / rel) == digest
        for rel, digest in artifacts.items()
    )


def _check_writable(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ValueError(f"output parent directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output directory is not writable: {parent}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path exists and is not a directory: {out}")


Configs = dict[str, str]  # repository-relative config path → text, written once hashed


def _write_cpu_model(
    root: Path,
    spec: contract.ModelSpec,
    model: onnx.ModelProto,
    batching: Batching,
    runtime: Runtime = ONNX_RUNTIME,
) -> Configs:
    """`model.onnx` + the Python shim; native-backend config, bundled-server config, both
    running it under `runtime`."""
    version = root / spec.name / contract.BUILD_VERSION
    onnx_export.save_model(model, version / "model.onnx")
    shutil.copyfile(PYTHON_ONNX_MODEL, version / "model.py")
    bundled = f"{spec.name}/configs/{contract.BUNDLED_CONFIG_NAME}.pbtxt"
    return {
        f"{spec.name}/config.pbtxt": native_cpu_config(spec, batching, runtime),
        bundled: python_onnx_config(spec, batching, runtime),
    }


def _write_gpu_model(
    root: Path,
    spec: contract.ModelSpec,
    model: onnx.ModelProto,
    batching: Batching,
    options: ExportOptions,
    engines: list[dict],
) -> Configs:
    """A TensorRT model: its ONNX (the engine's source) and the engine to build on the GPU
    node (`reward-service build-engines`), recorded in `engines`."""
    onnx_export.save_model(model, root / spec.name / contract.BUILD_VERSION / "model.onnx")
    profiles = {t.name: batch_profile(t.dims, options.max_batch) for t in spec.inputs}
    engines.append(
        {
            "model": spec.name,
            "onnx": "model.onnx",  # in the model's version folder, like the engine
            "plan": "model.plan",
            "precision": options.precision,
            "profiles": {name: asdict(p) for name, p in profiles.items()},
        }
    )
    return {f"{spec.name}/config.pbtxt": gpu_config(spec, "tensorrt", batching)}


def _write_gpu_onnx_model(
    root: Path, spec: contract.ModelSpec, model: onnx.ModelProto, batching: Batching
) -> Configs:
    """ONNX Runtime on the GPU (CUDA provider): what TensorRT does not take (the image
    preprocessing)."""
    onnx_export.save_model(model, root / spec.name / contract.BUILD_VERSION / "model.onnx")
    return {f"{spec.name}/config.pbtxt": gpu_config(spec, "onnxruntime", batching)}


def _write_cpu_onnx_model(
    root: Path, spec: contract.ModelSpec, model: onnx.ModelProto, batching: Batching
) -> Configs:
    """The reward head in the GPU flavour: ONNX Runtime on the CPU, exact fp32. It must not
    round (min-max + softmax in fp16 loses up to ~20% on close cosines; the CUDA provider may
    use TF32 for the einsum), and it is a few thousand multiply-adds per item."""
    onnx_export.save_model(model, root / spec.name / contract.BUILD_VERSION / "model.onnx")
    return {f"{spec.name}/config.pbtxt": native_cpu_config(spec, batching)}


def _write_gpu_image_encoder(
    root: Path,
    bundle: ClipBundle,
    batching: Batching,
    options: ExportOptions,
    engines: list[dict],
    member: int = 0,
) -> Configs:
    """Preprocessing on ONNX Runtime's CUDA provider (TensorRT takes no antialiased dynamic
    Resize), the vision tower on TensorRT, joined by an ensemble under the contract's name."""
    from export.onnx_preprocess import build_preprocess_model

    dim = bundle.model.config.projection_dim
    size = bundle.model.config.vision_config.image_size
    pixels = contract.Tensor("PIXEL_VALUES", "float32", (3, size, size))
    embeds = contract.for_member(contract.image_encoder(dim), member)
    pre = contract.ModelSpec(
        contract.member_model("image_preprocess", member), embeds.inputs, (pixels,)
    )
    tower = contract.ModelSpec(
        contract.member_model("image_tower", member), (pixels,), embeds.outputs
    )
    configs = _write_gpu_onnx_model(root, pre, build_preprocess_model(bundle.processor), batching)
    tower_onnx = onnx_export.export_image_tower(bundle)
    configs |= _write_gpu_model(root, tower, tower_onnx, batching, options, engines)
    steps = [
        (pre.name, {"IMAGE": "IMAGE"}, {"PIXEL_VALUES": "pixels"}),
        (tower.name, {"PIXEL_VALUES": "pixels"}, {"IMAGE_EMBEDS": "IMAGE_EMBEDS"}),
    ]
    (root / embeds.name / contract.BUILD_VERSION).mkdir(parents=True)
    configs[f"{embeds.name}/config.pbtxt"] = ensemble_config(
        embeds.name, embeds, steps, batching.max_batch_size
    )
    return configs


def _write_score_model(
    root: Path, spec: contract.ModelSpec, batching: Batching, eos_token_id: int, vocab_size: int
) -> Configs:
    """The BLS pipeline model (Python backend on CPU in both flavours; it only routes)."""
    version = root / spec.name / contract.BUILD_VERSION
    version.mkdir(parents=True)
    shutil.copyfile(SCORE_MODEL, version / "model.py")
    params = {
        "text_max_batch": str(batching.max_batch_size),
        "eos_token_id": str(eos_token_id),
        "vocab_size": str(vocab_size),  # ids past it are refused (the text tower's rows)
        "token_bucket": "4",  # as the gateway's default (settings.text_token_bucket)
        "text_cache_entries": "50000",
    }
    return {f"{spec.name}/config.pbtxt": model_config(spec, "python", batching, "KIND_CPU", params)}


_NOT_HASHED = ("provenance.json", "README.md")


def content_hash(root: Path) -> str:
    """sha256 of an export: every file that computes rewards or shapes how they are served
    (graphs, model code, tokenizer, engine recipes, configs without their hash parameter),
    by path with the version folder left out. The export's identity: provenance.json and every
    config name it, and the model version derives from it; recomputable from the repository
    (TensorRT engines, built later on the GPU node from hashed ONNX files, are not in it)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if str(rel) in _NOT_HASHED or path.suffix == ".plan":
            continue
        parts = [part for i, part in enumerate(rel.parts) if not (i == 1 and part.isdigit())]
        if path.suffix == ".pbtxt":
            text = "".join(
                line
                for line in path.read_text().splitlines(keepends=True)
                if f'"{contract.EXPORT_HASH_PARAMETER}"' not in line
            )
            data = hashlib.sha256(text.encode()).hexdigest()
        else:
            data = sha256_file(path)
        digest.update(f"{'/'.join(parts)}\0{data}\n".encode())
    return digest.hexdigest()


def _seal(root: Path, configs: Configs) -> tuple[str, int]:
    """Write the configs, hash the export, then stamp the hash into every config and move each
    model's files into the version folder the hash names."""
    for rel, text in configs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    export_sha = content_hash(root)
    version = contract.export_version(export_sha)
    for rel, text in configs.items():
        (root / rel).write_text(with_export_hash(text, export_sha))
    for model in {rel.split("/")[0] for rel in configs}:
        (root / model / contract.BUILD_VERSION).rename(root / model / str(version))
    return export_sha, version


def _write_member(
    root: Path,
    bundle: ClipBundle,
    head: RewardHead | None,
    member: int,
    batching: Batching,
    options: ExportOptions,
    engines: list[dict],
    progress: Progress,
) -> Configs:
    """One model's image encoder, text encoder and reward head, under member `member`'s names
    (`contract.member_model`; 0: the first model, with the learned head if any)."""
    dim = bundle.model.config.projection_dim
    what = "" if member == 0 else f" (member {member})"
    task = progress.add_task(f"exporting image encoder{what}", total=3)
    configs: Configs = {}
    image_spec = contract.for_member(contract.image_encoder(dim), member)
    tower_runtime = TOWER_RUNTIME.get(options.precision, ONNX_RUNTIME)
    if options.target == "cpu":
        image_onnx = onnx_export.export_image_encoder(bundle, int8=options.precision == "int8")
        configs |= _write_cpu_model(root, image_spec, image_onnx, batching, tower_runtime)
    else:
        configs |= _write_gpu_image_encoder(root, bundle, batching, options, engines, member)
    progress.update(task, advance=1, description=f"exporting text encoder{what}")
    text_spec = contract.for_member(contract.text_encoder(dim), member)
    text_onnx = onnx_export.export_text_encoder(bundle, int8=options.precision == "int8")
    if options.target == "cpu":
        configs |= _write_cpu_model(root, text_spec, text_onnx, batching, tower_runtime)
    else:
        configs |= _write_gpu_model(root, text_spec, text_onnx, batching, options, engines)
    progress.update(task, advance=1, description=f"exporting reward head{what}")
    head_spec = contract.for_member(contract.reward_head(dim, head is not None), member)
    head_onnx = onnx_export.export_reward_head(dim, head)
    if options.target == "cpu":
        configs |= _write_cpu_model(root, head_spec, head_onnx, batching)
    else:  # always exact fp32: never a TensorRT fp16 engine, nor TF32 on the GPU
        configs |= _write_cpu_onnx_model(root, head_spec, head_onnx, batching)
    progress.update(task, advance=1)
    return configs


def _hashed_source(source: str) -> tuple[ClipBundle | None, str]:
    """(bundle, checkpoint sha256) of a model to export: a hub id is downloaded whole first, so
    its hash covers its weights; a local directory is hashed without loading it (None)."""
    check_clip_source(source)
    bundle = None if Path(source).expanduser().is_dir() else load_clip(source)
    return bundle, checkpoint_hash(local_checkpoint_dir(source))


def _member_provenance(
    members: Sequence[str], shas: Sequence[str], bundles: Sequence[ClipBundle]
) -> list[dict]:
    """provenance.json's `members`: each further model's identity and its Triton model names."""
    names = [_public_name(source) for source in members]
    # unique names: two members from directories of the same name are told apart by index
    names = [n if names.count(n) == 1 else f"{n}-{k}" for k, n in enumerate(names, start=1)]
    return [
        {
            "index": index,
            "name": name,
            "source": source,
            "checkpoint_sha256": sha,
            "embed_dim": bundle.model.config.projection_dim,
            "image_size": bundle.model.config.vision_config.image_size,
            "logit_scale": float(bundle.model.logit_scale.detach().exp()),
            "models": {role: contract.member_model(role, index) for role in contract.MEMBER_ROLES},
        }
        for index, (name, source, sha, bundle) in enumerate(
            zip(names, members, shas, bundles, strict=True), start=1
        )
    ]


def export_repository(
    source: str,
    out: Path,
    head_dir: Path | None = None,
    options: ExportOptions | None = None,
    progress: Progress | None = None,
    members: Sequence[str] = (),
    calibration: Path | None = None,
    calibration_only_if_fitting: bool = False,
) -> tuple[dict, bool]:
    """Export and return (provenance, changed). `changed` is False for a cache hit.

    `members`: further CLIP checkpoints exported beside `source` as the other models of a
    multi-model ensemble (`contract.member_model` names; no learned head; same tokenizer).
    `calibration`: a TextNorm calibration JSON (`reward-service calibrate`, for this
    checkpoint) copied into the repository as `calibration.json`, inside the export hash: the
    gateway serving the repository uses it as its default c/λ per prompt kind (provenance
    `textnorm_calibration` carries the document too). `calibration_only_if_fitting`: skip it,
    instead of refusing, when it was calibrated for another checkpoint or does not calibrate
    every member (`calibrate --member`).

    `--target gpu` writes ONNX files, configs and `engines.json`; TensorRT engines are built
    where they run, by `build_engines` (`reward-service build-engines`) on the GPU node."""
    options = options or ExportOptions()
    out = Path(out)
    _check_writable(out)
    bundle, checkpoint_sha = _hashed_source(source)  # one-line errors before any work
    head: RewardHead | None = None
    head_sha = None
    if head_dir is not None:
        head, head_config = load_head(head_dir)
        if head_config.get("clip_sha256") not in (None, checkpoint_sha):
            raise ValueError(f"head {head_dir} was trained on a different CLIP than {source}")
        head_sha = head_hash(Path(head_dir))
    members = list(members)
    hashed_members = [_hashed_source(m) for m in members]
    member_shas = [sha for _, sha in hashed_members]
    for member, sha in zip(members, member_shas, strict=True):
        if sha == checkpoint_sha or member_shas.count(sha) > 1:
            raise ValueError(
                f"member {member} is the same checkpoint as the model or another member: an "
                "ensemble needs different models"
            )
    calibration_bytes = _calibration_bytes(
        calibration, checkpoint_sha, skip_unfitting=calibration_only_if_fitting, members=member_shas
    )
    calibration_sha = hashlib.sha256(calibration_bytes).hexdigest() if calibration_bytes else None
    key = cache_key(checkpoint_sha, head_sha, options, member_shas, calibration_sha)
    if is_up_to_date(out, key):
        return read_provenance(out), False
    bundle = bundle or load_clip(source)  # local weights are loaded only on a cache miss
    member_bundles = [b or load_clip(m) for (b, _), m in zip(hashed_members, members, strict=True)]
    for member_bundle in member_bundles:
        check_member(bundle, member_bundle)

    dim = bundle.model.config.projection_dim
    batching = Batching(
        max_batch_size=options.max_batch,
        max_queue_delay_us=options.queue_delay_us,
        instances=options.instances,
        intra_op_threads=options.threads,
    )
    progress = progress or Progress(transient=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    configs: Configs = {}
    engines: list[dict] = []
    try:
        root = tmp / "repo"
        root.mkdir()
        with progress:
            for index, (member, member_head) in enumerate(
                [(bundle, head), *((b, None) for b in member_bundles)]
            ):
                configs |= _write_member(
                    root, member, member_head, index, batching, options, engines, progress
                )
        if calibration_bytes:
            (root / contract.CALIBRATION_FILE).write_bytes(calibration_bytes)  # what was checked
        score_spec = contract.score(dim, head is not None)
        configs |= _write_score_model(
            root,
            score_spec,
            batching,
            bundle.tokenizer.eos_token_id,
            bundle.model.config.text_config.vocab_size,
        )
        if engines:
            (root / ENGINES_FILE).write_text(json.dumps(engines, indent=2) + "\n")
        # The gateway tokenizes with this copy: the repository alone is enough to serve.
        bundle.tokenizer.backend_tokenizer.save(str(root / "tokenizer.json"))
        export_sha, version = _seal(root, configs)
        (root / "README.md").write_text(_readme(options))
        models = sorted({rel.split("/")[0] for rel in configs})
        provenance = _provenance(
            root, source, checkpoint_sha, head_dir, head_sha, key, options, bundle
        )
        provenance |= {
            "members": _member_provenance(members, member_shas, member_bundles),
            "textnorm_calibration": None
            if calibration_bytes is None
            else {
                "file": contract.CALIBRATION_FILE,
                "sha256": calibration_sha,
                "document": json.loads(calibration_bytes),
            },
            "export_sha256": export_sha,
            "model_version": version,
            "models": models,
            "text_tokens": "dynamic",
        }
        (root / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _replace(out, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return provenance, True


def is_shipped_calibration(path: str | Path | None) -> bool:
    from models import SHIPPED_CALIBRATION_FILE

    return bool(path) and Path(path).resolve() == SHIPPED_CALIBRATION_FILE.resolve()


def _calibration_bytes(
    path: Path | None, checkpoint_sha: str, *, skip_unfitting: bool, members: Sequence[str]
) -> bytes | None:
    """The calibration file's bytes, checked (format, checkpoint) once: what the export
    writes and hashes. None without one, or when `skip_unfitting` and it does not fit: another
    checkpoint, or a member (by checkpoint hash in `members`) it has no c for."""
    if path is None:
        return None
    from service.gateway.calibration import load_calibration

    data = Path(path).read_bytes() if Path(path).is_file() else None
    try:
        calibration = load_calibration(path, checkpoint_sha)  # one-line errors
    except ValueError:
        if skip_unfitting:
            return None
        raise
    if skip_unfitting and not all(calibration.calibrates_member(sha) for sha in members):
        return None
    if data is None or calibration.sha256 != hashlib.sha256(data).hexdigest():
        raise ValueError(f"{path}: changed while it was being read")
    return data


def _replace(out: Path, new: Path) -> None:
    """Move `new` (built beside `out.resolve()`) to `out`, replacing an older export; through
    a symlink, to what it points at (the link stays). Never leaves a half-written or a missing
    OUT: if the last move fails, the older export is put back."""
    out = out.resolve()
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    _remove(old)
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink():  # rmtree refuses links (silently, with ignore_errors)
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _public_name(source: str) -> str:
    """A hub id as is; a local directory by its last component (never a host path)."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser().resolve().name
    return source


def _provenance(
    root: Path,
    source: str,
    checkpoint_sha: str,
    head_dir: Path | None,
    head_sha: str | None,
    key: str,
    options: ExportOptions,
    bundle: ClipBundle,
) -> dict:
    artifacts = {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }
    return {
        "format": FORMAT_VERSION,
        "cache_key": key,
        "model": {
            # `name`: how responses name it (a hub id, or a local directory's last component);
            # `source` is where this exporter read it, for `verify`/`bench` on this host only —
            # the gateway never answers with it (service/gateway/provenance.py).
            "name": _public_name(source),
            "source": source,
            "checkpoint_sha256": checkpoint_sha,
            "embed_dim": bundle.model.config.projection_dim,
            "image_size": bundle.model.config.vision_config.image_size,
            "logit_scale": float(bundle.model.logit_scale.detach().exp()),
        },
        "head": None
        if head_dir is None
        else {"name": Path(head_dir).name, "source": str(head_dir), "sha256": head_sha},
        "options": asdict(options),
        "textnorm_defaults": {
            "scale": options.textnorm_scale,
            "ensemble_lambda": options.ensemble_lambda,
            "max_prompts": contract.MAX_PROMPTS,
        },
        "versions": _versions(),
        "artifacts": artifacts,
    }


def _readme(options: ExportOptions) -> str:
    if options.target == "cpu":
        how = (
            "Every model is `model.onnx`: `config.pbtxt` serves it on Triton's native "
            "onnxruntime backend (KIND_CPU, the NGC image); `configs/bundled.pbtxt` runs it "
            "with ONNX Runtime inside the Python backend (`model.py`), for the pip-bundled "
            "tritonserver (`--model-config-name=bundled`). Image preprocessing is part of the "
            "image encoder's graph."
        )
        if options.precision == "int8":
            how += (
                " The image and text towers have int8 weight MatMuls (ONNX Runtime dynamic "
                "quantization); preprocessing and the reward head are fp32."
            )
        if options.precision == "bf16":
            how += (
                " The image and text towers run on OpenVINO with bfloat16 inference precision "
                "(the native `openvino` backend with `HINT_BF16`; in the bundled server, "
                "`model.py` with `runtime: openvino`); their ONNX files are fp32, and OpenVINO "
                "runs them in fp32 on CPUs without AMX or AVX-512 BF16. The reward head stays "
                "ONNX Runtime fp32."
            )
    else:
        how = (
            "Text encoder and vision tower are TensorRT engines, built on the GPU node by "
            "`reward-service build-engines` from the ONNX files (`engines.json`). Image "
            "preprocessing (antialiased bicubic resize with data-dependent sizes, which "
            "TensorRT does not take) runs in `image_preprocess` on ONNX Runtime's CUDA "
            "provider; the `image_encoder` ensemble chains it to `image_tower`. The reward "
            "head stays fp32 on ONNX Runtime."
        )
    return (
        f"# Triton model repository ({options.target}, {options.precision})\n\n{how}\n\n"
        "`provenance.json` records the sha256 of every file, the source checkpoint and head, "
        "and the library versions. Written by `reward-service export`.\n"
    )
