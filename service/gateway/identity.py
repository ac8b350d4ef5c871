"""Is the backend serving the export the gateway's provenance names?

Export writes the repository's content hash into provenance.json (`export_sha256`) and into
every model's config (`parameters { key: "export_sha256" ... }`). The gateway reads the hashes
back from the backend (Triton's model configs) and compares: a reward must never come from a
model other than the one its provenance names. `GuardedBackend` runs the check at start, on
every `/readyz`, and before scoring once the last check is older than its interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class IdentityCheck:
    expected: str  # provenance.json's export_sha256
    models: tuple[str, ...]  # every model of the export (provenance.json's `models`)

    @classmethod
    def from_provenance(cls, provenance: Mapping) -> IdentityCheck:
        """ValueError (one line) for a repository exported before content hashes existed."""
        expected, models = provenance.get("export_sha256"), provenance.get("models")
        if not isinstance(expected, str) or not isinstance(models, list) or not models:
            raise ValueError(
                "provenance.json has no export_sha256/models (exported by an older version): "
                "re-export the repository, so the gateway can check what Triton serves"
            )
        return cls(expected, tuple(str(m) for m in models))

    def problem(self, found: Mapping[str, str | None]) -> str | None:
        """None when every model carries the expected hash, else a message naming both."""
        wrong = sorted(m for m in self.models if found.get(m) != self.expected)
        if not wrong:
            return None
        first = wrong[0]
        served = found.get(first)
        what = f"carries export_sha256 {served}" if served else "is not loaded (or has no hash)"
        return (
            f"Triton serves a different export: model {first!r} {what}, this gateway's "
            f"provenance names {self.expected} ({len(wrong)} of {len(self.models)} models "
            f"differ: {', '.join(wrong)}); point the gateway at that export's repository, or "
            "Triton at this one"
        )


def hash_in_config(config: Mapping, parameter: str) -> str | None:
    """The string parameter `parameter` of a model config in Triton's JSON form, or None."""
    value = (config.get("parameters") or {}).get(parameter) or {}
    return value.get("string_value") if isinstance(value, Mapping) else None


__all__ = ["IdentityCheck", "hash_in_config"]
