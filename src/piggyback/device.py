"""Where a model runs and in which precision: `--device` and `--precision`, for every command.

Training, evaluation, prediction, export and the benchmarks all take the same two options; they
are resolved here, on the inference side, so that running a saved task never imports the
training code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from piggyback.errors import DeviceError

__all__ = ["PRECISIONS", "Precision", "resolve_device"]

#: `--precision` values: float32, bfloat16 autocast, float16 autocast with loss scaling.
PRECISIONS = ("32", "bf16", "16-mixed")


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`, checked to exist."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise DeviceError(
            f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


@dataclass
class Precision:
    """Autocast and gradient scaling for `--precision 32 | bf16 | 16-mixed`."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise DeviceError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}"
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler:
        # Only float16 needs loss scaling; bf16 has float32's range.
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "16-mixed")
