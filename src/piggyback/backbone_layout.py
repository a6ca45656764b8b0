"""What wrapping a backbone finds in it, worked out once: heads, masked tensors, norms, identity.

`PiggybackModel` builds one `BackboneLayout` before it changes anything in the backbone (freezing
it, putting task heads in the head slots), so every later step (adding tasks, reading task files,
unloading) refers to the same facts, and the backbone's own `requires_grad` flags can be handed
back as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from piggyback.classifiers import find_heads
from piggyback.config import PiggybackConfig
from piggyback.fingerprint import fingerprint
from piggyback.norms import is_norm, norm_types
from piggyback.targets import (
    MaskTarget,
    check_unmasked,
    find_mask_targets,
    find_norm_tensors,
    in_any_subtree,
)


@dataclass(frozen=True)
class BackboneLayout:
    """The parts of one backbone that tasks replace, mask or keep."""

    head_names: list[str]  # every classifier it declares (two for timm's distilled models)
    targets: list[MaskTarget]  # the masked weights
    unmasked: list[str]  # weights left unmasked (reported to the user)
    norm_names: list[str]  # normalization tensors a task may own
    norm_modules: list[nn.Module]  # normalization modules outside the heads (kept in eval mode)
    fingerprint: str | None  # of the weights, heads excluded; None on the meta device
    requires_grad: dict[str, bool]  # the backbone's own flags, restored by `unload`

    @classmethod
    def of(cls, backbone: nn.Module, config: PiggybackConfig) -> BackboneLayout:
        heads = [config.head] if config.head else find_heads(backbone)
        targets = find_mask_targets(backbone, config, heads)
        norms = norm_types()
        return cls(
            head_names=heads,
            targets=targets,
            unmasked=check_unmasked(backbone, config, heads, targets),
            norm_names=find_norm_tensors(backbone, heads),
            norm_modules=[
                m
                for n, m in backbone.named_modules()
                if is_norm(m, norms) and not in_any_subtree(n, heads)
            ],
            fingerprint=_backbone_fingerprint(backbone, heads),
            requires_grad={n: p.requires_grad for n, p in backbone.named_parameters()},
        )


def _backbone_fingerprint(backbone: nn.Module, heads: list[str]) -> str | None:
    """The fingerprint of the backbone's weights (heads excluded); None on the meta device, where
    tensors have shapes but no values (models built there only to check their structure)."""
    tensors = {n: t for n, t in backbone.state_dict().items() if not in_any_subtree(n, heads)}
    if any(t.is_meta for t in tensors.values()):
        return None
    return fingerprint(tensors)
