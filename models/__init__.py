"""The shipped artifacts (package data, so a non-editable install finds them too).

- `shapes-clip/`: the shapes-world CLIP (HF `CLIPModel` + `CLIPTokenizer` + processor config),
  reproduced by `reward-service train-clip --out models/shapes-clip`;
- `shapes-clip-head/`: its learned reward head (Lee et al.), `reward-service train-head`;
- `shapes-clip-b/`: a second, different CLIP (another image tower, training seed and caption
  noise; the same tokenizer), the other member of the two-model ensemble,
  reproduced by `reward-service train-clip --member shapes-clip-b --out models/shapes-clip-b`;
- `shapes-clip-calibration.json`: TextNorm's c and λ for shapes-clip per prompt kind and benchmark
  category, and shapes-clip-b's own c and the two models' λ, chosen on the validation seed
  (`reward-service calibrate --member shapes-clip-b --out ...`); the export bundles it (alone,
  or with shapes-clip-b as member), so it is the served default.
"""

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "shapes-clip"
SHIPPED_HEAD_DIR = Path(__file__).resolve().parent / "shapes-clip-head"
SHIPPED_MEMBER_DIR = Path(__file__).resolve().parent / "shapes-clip-b"
SHIPPED_CALIBRATION_FILE = Path(__file__).resolve().parent / "shapes-clip-calibration.json"


def resolve_shipped(name_or_path: str) -> str:
    """A shipped model's directory for its bare name (`shapes-clip-b`), else the argument as
    given (a path or a hub id): images and charts can name the shipped models without knowing
    where the package is installed."""
    shipped = SHIPPED_MODEL_DIR.parent / name_or_path
    if "/" not in name_or_path and (shipped / "config.json").is_file():
        return str(shipped)
    return name_or_path
