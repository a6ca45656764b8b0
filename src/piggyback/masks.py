"""Thresholding real-valued scores into masks, with straight-through gradients.

The forward pass uses the hard mask; the backward pass passes the gradient of the mask straight to
the scores (the straight-through estimator of the paper), so dL/dscore = dL/dmask = dL/dW' * W for
a masked weight W' = W * mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from piggyback.config import MaskKind, PiggybackConfig


class BinaryMask(torch.autograd.Function):
    """mask = 1 where score > threshold, else 0; gradient passes straight through."""

    generate_vmap_rule = True  # works under torch.func transforms (vmap, grad)

    @staticmethod
    def forward(scores: Tensor, threshold: float) -> Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # nothing to save: the gradient is the identity
        pass

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output, None


class TernaryMask(torch.autograd.Function):
    """mask = -1 where score < 0, 1 where score > threshold, else 0; straight-through gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(scores: Tensor, threshold: float) -> Tensor:
        positive = (scores > threshold).to(scores.dtype)
        negative = (scores < 0).to(scores.dtype)
        return positive - negative

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output, None


def threshold_scores(scores: Tensor, kind: MaskKind, threshold: float) -> Tensor:
    """The differentiable mask of `scores` (same dtype as the scores)."""
    if kind == "binary":
        return BinaryMask.apply(scores, threshold)
    return TernaryMask.apply(scores, threshold)


# Masks are stored as small integer codes: binary 0/1 in 1 bit, ternary 0/+1/-1 as 0/1/2 in 2 bits.
BITS_PER_WEIGHT: dict[str, int] = {"binary": 1, "ternary": 2}
_TERNARY_VALUES = (0.0, 1.0, -1.0)


def mask_to_codes(mask: Tensor, kind: MaskKind) -> Tensor:
    """Hard mask values -> uint8 codes (binary: 0/1; ternary: 0, 1 for +1, 2 for -1)."""
    if kind == "binary":
        return (mask > 0).to(torch.uint8)
    return (mask > 0).to(torch.uint8) + 2 * (mask < 0).to(torch.uint8)


def codes_to_mask(codes: Tensor, kind: MaskKind, dtype: torch.dtype) -> Tensor:
    """uint8 codes -> mask values in `dtype`; inverse of `mask_to_codes`."""
    if kind == "binary":
        return codes.to(dtype)
    values = torch.tensor(_TERNARY_VALUES, dtype=dtype, device=codes.device)
    return values[codes.long()]


def init_scores(
    shape: torch.Size, config: PiggybackConfig, generator: torch.Generator | None
) -> Tensor:
    """Initial scores: constant `init_value` ("ones"), or U(-init_value, init_value) ("uniform")."""
    if config.init == "ones":
        return torch.full(shape, config.init_value, dtype=torch.float32)
    scores = torch.empty(shape, dtype=torch.float32)
    return scores.uniform_(-config.init_value, config.init_value, generator=generator)


def fraction_on(mask: Tensor) -> float:
    """Fraction of a mask's entries that are on (non-zero), as a float32 mean.

    The one definition used by the model and by `piggyback info`, so their figures agree exactly.
    """
    return float((mask != 0).float().mean())


def weighted_fraction_on(density: dict[str, float], sizes: dict[str, int]) -> float:
    """Fraction of all masked weights left on: per-tensor densities weighted by tensor size."""
    return sum(density[name] * size for name, size in sizes.items()) / sum(sizes.values())
