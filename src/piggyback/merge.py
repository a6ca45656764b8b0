"""Baking one task into a plain copy of the backbone (`PiggybackModel.merge`).

The copy holds no piggyback class: W * mask (and the task's norms) as ordinary parameters and the
task's head in the head slot(s), so it runs without this library and exports with torch.export or
ONNX. The shared backbone is left exactly as it was, even on error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import Tensor, nn

from piggyback.heads import modules_in_slots
from piggyback.swap import Slot


def merged_backbone(
    backbone: nn.Module, heads: Mapping[str, nn.Module], tensors: Mapping[str, Tensor]
) -> nn.Module:
    """A copy of `backbone` with `heads` in their slots and `tensors` (by name) as its own, in
    eval mode with every parameter trainable (a plain model, ready for fine-tuning or export)."""
    with modules_in_slots(backbone, dict(heads)):
        merged = copy.deepcopy(backbone)
    for name, tensor in tensors.items():
        slot = Slot.resolve(merged, name)
        value = tensor.detach().clone()
        slot.store[slot.key] = nn.Parameter(value) if slot.is_parameter else value
    merged.requires_grad_(True)
    return merged.eval()
