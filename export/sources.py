"""Where a CLIP checkpoint comes from — a local directory or a Hugging Face hub id — checked
without torch.

`check_local_source` is the cheap half of `export.clip_model.check_clip_source`: the CLI runs it
before it imports torch and transformers (seconds), so a mistyped `--model` path is refused at
once; the full check (config.json says CLIP, a hub id resolves) runs when the model loads.
"""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded as a CLIP model (one-line, user-facing message)."""


def is_local(source: str) -> bool:
    """A path (it starts with ".", "/" or "~", or exists) rather than a hub id."""
    return source.startswith((".", "/", "~")) or Path(source).exists()


def check_local_source(source: str | Path | None) -> None:
    """Raise `ModelLoadError` if `source` names a local directory that is missing or holds no
    config.json; hub ids, None and "" (the commands' shipped default) pass."""
    if not source or not is_local(str(source)):
        return
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"not a Hugging Face checkpoint (no config.json): {path}")
