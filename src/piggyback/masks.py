"""Thresholding real-valued scores into masks, with straight-through gradients; mask density.

The forward pass uses the hard mask; the backward pass passes the gradient of the mask straight to
the scores (the straight-through estimator of the paper), so dL/dscore = dL/dmask = dL/dW' * W for
a masked weight W' = W * mask. The mask kinds that use these functions (and how masks are coded for
storage) are in `piggyback.mask_kinds`.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def fraction_on(mask: Tensor) -> float:
    """Fraction of a mask's entries that are on (non-zero), as a float32 mean.

    The one definition used by the model and by `piggyback info`, so their figures agree exactly.
    """
    return float((mask != 0).float().mean())


def weighted_fraction_on(density: dict[str, float], sizes: dict[str, int]) -> float:
    """Fraction of all masked weights left on: per-tensor densities weighted by tensor size."""
    return sum(density[name] * size for name, size in sizes.items()) / sum(sizes.values())
