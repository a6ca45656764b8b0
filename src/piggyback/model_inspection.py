"""Figures about a PiggybackModel's backbone and tasks: where it runs, what is masked, densities.

A mixin (as Hugging Face's `ModuleUtilsMixin`), so that `model.py` stays about tasks and forward
passes; each figure is defined once, here or in `piggyback.masks` (`fraction_on`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from piggyback.masks import weighted_fraction_on
from piggyback.targets import in_any_subtree

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel


class ModelInspection:
    """`device`, `backbone_tensors`, `mask_density`, `overall_density`, `num_masked`."""

    @property
    def device(self: PiggybackModel) -> torch.device:
        """Where the backbone's weights are."""
        return next(self.backbone.parameters()).device

    def backbone_tensors(
        self: PiggybackModel, *, exclude_head: bool = False, names: list[str] | None = None
    ) -> dict[str, Tensor]:
        """Backbone parameters and buffers by name, as the original (frozen) tensors."""
        tensors = dict(self.backbone.named_parameters()) | dict(self.backbone.named_buffers())
        if names is not None:
            return {n: tensors[n] for n in names}
        return {
            n: t
            for n, t in tensors.items()
            if not (exclude_head and in_any_subtree(n, self.head_names))
        }

    def mask_density(self: PiggybackModel, task: str | None = None) -> dict[str, float]:
        """Fraction of non-zero mask entries per masked tensor (piggyback tasks only)."""
        return self.task(task).mask_density(self.targets, self.config)

    def overall_density(self: PiggybackModel, task: str | None = None) -> float | None:
        """Fraction of masked weights left on, over all masked tensors."""
        density = self.mask_density(task)
        if not density:
            return None
        return weighted_fraction_on(density, {t.name: t.numel for t in self.targets})

    @property
    def num_masked(self: PiggybackModel) -> int:
        return sum(t.numel for t in self.targets)
