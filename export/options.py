"""What an export is asked for (`reward-service export`'s options), checked when built.

Torch-free and cheap to import, so the CLI refuses a bad option at once, before it loads torch and
the checkpoint. `export.repository` writes the repository these options describe.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "fp16", "int8", "bf16")


@dataclass(frozen=True)
class ExportOptions:
    target: str = "cpu"  # cpu | gpu
    # fp32 | fp16 (TensorRT engines) | int8 (CPU towers, onnx_quantize) | bf16 (CPU towers,
    # OpenVINO)
    precision: str = "fp32"
    max_batch: int = 64
    queue_delay_us: int = 500  # dynamic batching max queue delay, chosen by measurement (README)
    threads: int = 0  # ONNX Runtime (or OpenVINO) threads per CPU model instance (0: all)
    instances: int = 1  # Triton instances of every model
    textnorm_scale: float = 5.0
    ensemble_lambda: float = 1.0

    def __post_init__(self) -> None:
        if self.target not in ("cpu", "gpu"):
            raise ValueError(f"--target must be cpu or gpu, got {self.target!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.target == "cpu" and self.precision == "fp16":
            raise ValueError(
                "--precision fp16 needs --target gpu (on CPU: fp32, or int8 or bf16 towers)"
            )
        if self.target == "gpu" and self.precision in ("int8", "bf16"):
            raise ValueError(
                f"--precision {self.precision} needs --target cpu (on GPU: fp32 or fp16 engines)"
            )
        if not 1 <= self.max_batch <= 4096:
            raise ValueError(f"--max-batch must be between 1 and 4096, got {self.max_batch}")
        if not 0 <= self.queue_delay_us <= 1_000_000:
            raise ValueError(f"--queue-delay-us must be 0..1000000, got {self.queue_delay_us}")
        if not 0 <= self.threads <= 256:
            raise ValueError(f"--threads must be 0..256 (0: all cores), got {self.threads}")
        if not 1 <= self.instances <= 64:
            raise ValueError(f"--instances must be 1..64, got {self.instances}")
