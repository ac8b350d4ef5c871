"""The shipped artifacts (package data, so a non-editable install finds them too).

- `shapes-clip/`: the shapes-world CLIP (HF `CLIPModel` + `CLIPTokenizer` + processor config),
  reproduced by `reward-service train-clip --out models/shapes-clip`;
- `shapes-clip-head/`: its learned reward head (Lee et al.), `reward-service train-head`.
"""

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "shapes-clip"
SHIPPED_HEAD_DIR = Path(__file__).resolve().parent / "shapes-clip-head"
