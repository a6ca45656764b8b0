"""Mask kinds: how scores become a mask, and how a mask is stored as small integer codes.

A mask kind is a strategy object registered by name (like PEFT's `LoraVariant`): the model, task
files, `piggyback info` and the training recipe ask the kind, never compare its name. A new kind
(e.g. SupSup-style top-k, or a mask with a learned per-layer scale) is one subclass of `MaskKind`
in one file plus `register_mask_kind(TheKind())`; `tests/test_strategies.py` shows one.

Built in:
- "binary" (the paper): mask = 1 where score > threshold else 0; 1 bit per weight.
- "ternary": mask = -1 where score < 0, 1 where score > threshold, else 0; 2 bits per weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from piggyback.masks import BinaryMask, TernaryMask
from piggyback.registry import Registry

if TYPE_CHECKING:
    from piggyback.config import PiggybackConfig


class MaskKind:
    """How one kind of mask is computed from scores, coded for storage and turned back.

    Subclasses set `name` and `code_bits` (1, 2, 4 or 8: the packed width of one code) and
    implement `mask`, `to_codes` and `from_codes`. The defaults of the rest suit masks that
    multiply the weight.
    """

    name: ClassVar[str]
    code_bits: ClassVar[int]
    #: Number of distinct codes (binary 2, ternary 3); codes >= this are invalid in a file.
    num_codes: ClassVar[int]

    def mask(self, scores: Tensor, config: PiggybackConfig) -> Tensor:
        """The mask of `scores` (same dtype), differentiable with respect to the scores."""
        raise NotImplementedError

    def to_codes(self, mask: Tensor) -> Tensor:
        """Hard mask values -> uint8 codes in [0, num_codes)."""
        raise NotImplementedError

    def from_codes(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        """uint8 codes -> mask values in `dtype`; inverse of `to_codes`."""
        raise NotImplementedError

    def masked_weight(self, weight: Tensor, mask: Tensor) -> Tensor:
        """The weight the backbone computes with."""
        return weight * mask.to(weight.dtype)

    def init_scores(
        self, shape: torch.Size, config: PiggybackConfig, generator: torch.Generator | None
    ) -> Tensor:
        """Scores of a new task: constant `init_value` ("ones") or U(-v, v) ("uniform")."""
        if config.init == "ones":
            return torch.full(shape, config.init_value, dtype=torch.float32)
        scores = torch.empty(shape, dtype=torch.float32)
        return scores.uniform_(-config.init_value, config.init_value, generator=generator)

    def scores_from_mask(self, mask: Tensor, config: PiggybackConfig) -> Tensor:
        """Scores that reproduce `mask` exactly, to continue training a saved (packed) task.

        On-weights get `init_value` (above the threshold, as at the start of training); off
        weights get 0 (below it); -1 entries get -init_value.
        """
        value = max(config.init_value, 2 * config.threshold)
        scores = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        scores[mask > 0] = value
        scores[mask < 0] = -value
        return scores

    def check(self, config: PiggybackConfig) -> None:
        """Refuse settings that make this kind untrainable (called by PiggybackConfig)."""
        if config.init == "ones" and config.init_value <= config.threshold:
            raise ValueError(
                f"init_value ({config.init_value}) must exceed threshold ({config.threshold}): "
                "otherwise every weight starts switched off instead of at the pretrained network"
            )


class BinaryKind(MaskKind):
    """The paper's mask: W * (score > threshold)."""

    name = "binary"
    code_bits = 1
    num_codes = 2

    def mask(self, scores: Tensor, config: PiggybackConfig) -> Tensor:
        return BinaryMask.apply(scores, config.threshold)

    def to_codes(self, mask: Tensor) -> Tensor:
        return (mask > 0).to(torch.uint8)

    def from_codes(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        return codes.to(dtype)


class TernaryKind(MaskKind):
    """Masks in {-1, 0, 1}: a weight can also be negated (the paper's ternary variant)."""

    name = "ternary"
    code_bits = 2
    num_codes = 3
    _values = (0.0, 1.0, -1.0)  # code 0 -> 0, 1 -> +1, 2 -> -1

    def mask(self, scores: Tensor, config: PiggybackConfig) -> Tensor:
        return TernaryMask.apply(scores, config.threshold)

    def to_codes(self, mask: Tensor) -> Tensor:
        return (mask > 0).to(torch.uint8) + 2 * (mask < 0).to(torch.uint8)

    def from_codes(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        values = torch.tensor(self._values, dtype=dtype, device=codes.device)
        return values[codes.long()]


_KINDS: Registry[MaskKind] = Registry(
    "mask_kind", "register new ones with piggyback.mask_kinds.register_mask_kind"
)


def register_mask_kind(kind: MaskKind, *, replace: bool = False) -> MaskKind:
    """Make `kind` available by its name (PiggybackConfig(mask_kind=name), task files)."""
    if kind.code_bits not in (1, 2, 4, 8):
        raise ValueError(f"code_bits must be 1, 2, 4 or 8, got {kind.code_bits}")
    if not 2 <= kind.num_codes <= 2**kind.code_bits:
        raise ValueError(f"num_codes must be in 2..{2**kind.code_bits}, got {kind.num_codes}")
    return _KINDS.register(kind.name, kind, replace=replace)


unregister_mask_kind = _KINDS.unregister
get_mask_kind = _KINDS.get
mask_kind_names = _KINDS.names

register_mask_kind(BinaryKind())
register_mask_kind(TernaryKind())
