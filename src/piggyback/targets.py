"""Finding what to mask, which modules normalize, and which module is the classifier head.

Selection is by layer family and by glob patterns on module names. Anything that carries weights
but is not masked is reported, never silently skipped: weights of attention modules that no family
covers are refused with an error naming them, and other weight tensors (position embeddings, class
tokens, ...) are listed in a warning and stay frozen and shared by all tasks.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from piggyback.config import PiggybackConfig
from piggyback.errors import UnsupportedModelError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)


@dataclass(frozen=True)
class MaskTarget:
    """One masked tensor, by its dotted name in the backbone (e.g. 'layer1.0.conv1.weight')."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def in_subtree(name: str, root: str) -> bool:
    """Whether dotted `name` is `root` or lies below it."""
    return name == root or name.startswith(root + ".")


def _family_params(module: nn.Module, config: PiggybackConfig) -> list[str]:
    """Names of the module's own tensors that its layer family masks."""
    types = config.layer_types
    if ("linear" in types and isinstance(module, nn.Linear)) or (
        "conv" in types and isinstance(module, _CONV_TYPES)
    ):
        names = ["weight"]
    elif "attention" in types and isinstance(module, nn.MultiheadAttention):
        # The packed (or separate q/k/v) input projection is a raw Parameter, not an nn.Linear;
        # out_proj is an nn.Linear child and is covered by the "linear" family.
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        names += ["in_proj_bias"] if config.mask_bias else []
        return [n for n in names if getattr(module, n, None) is not None]
    elif "embedding" in types and isinstance(module, nn.Embedding):
        names = ["weight"]
    else:
        return []
    if config.mask_bias and getattr(module, "bias", None) is not None:
        names.append("bias")
    return names


def find_mask_targets(model: nn.Module, config: PiggybackConfig, head: str) -> list[MaskTarget]:
    """Every tensor to mask, in module order, after the include / exclude patterns."""
    targets = []
    for module_name, module in model.named_modules():
        if in_subtree(module_name, head):
            continue
        if config.include and not _matches(module_name, config.include):
            continue
        if _matches(module_name, config.exclude):
            continue
        for param in _family_params(module, config):
            full = f"{module_name}.{param}" if module_name else param
            targets.append(MaskTarget(full, tuple(getattr(module, param).shape)))
    if not targets:
        raise UnsupportedModelError(
            f"no layer to mask: layer_types={list(config.layer_types)}, "
            f"include={list(config.include)}, exclude={list(config.exclude)} select nothing"
        )
    return targets


def is_norm(module: nn.Module) -> bool:
    """Normalization layers, including timm's own (BatchNormAct2d, LayerNorm2d, RmsNorm, ...)."""
    if isinstance(module, _NORM_TYPES):
        return True
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return bool(own) and "norm" in type(module).__name__.lower()


def find_norm_tensors(model: nn.Module, head: str) -> list[str]:
    """Dotted names of the parameters and buffers owned by normalization modules."""
    names = []
    for module_name, module in model.named_modules():
        if in_subtree(module_name, head) or not is_norm(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        names += [prefix + n for n, _ in module.named_parameters(recurse=False)]
        names += [prefix + n for n, t in module.named_buffers(recurse=False) if t is not None]
    return names


def check_unmasked(
    model: nn.Module, config: PiggybackConfig, head: str, targets: list[MaskTarget]
) -> list[str]:
    """Refuse unmasked attention weights; warn about and return other unmasked weight tensors."""
    masked = {t.name for t in targets}
    refused, unmasked = [], []
    for module_name, module in model.named_modules():
        if in_subtree(module_name, head) or is_norm(module):
            continue
        if _matches(module_name, config.exclude) or (
            config.include and not _matches(module_name, config.include)
        ):
            continue  # the user chose to leave these out
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if full in masked or param.dim() < 2:
                continue
            attention = _ATTENTION_NAME.search(type(module).__name__) and "weight" in param_name
            (refused if attention else unmasked).append(full)
    if refused:
        raise UnsupportedModelError(
            f"attention weights that no mask covers: {refused}. Add 'attention' to layer_types "
            "(nn.MultiheadAttention), or leave these modules out explicitly with exclude=[...]."
        )
    if unmasked:
        warnings.warn(
            f"{len(unmasked)} weight tensors are not masked and stay shared by all tasks: "
            f"{unmasked[:8]}{' ...' if len(unmasked) > 8 else ''}",
            stacklevel=3,
        )
    return unmasked


def find_head(model: nn.Module) -> str:
    """The dotted name of the classifier: timm's pretrained_cfg, else the last Linear."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(name, str):
        try:
            head = model.get_submodule(name)
        except AttributeError:
            head = None
        if head is not None and not isinstance(head, nn.Identity):
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    raise UnsupportedModelError(
        "could not find the classifier head (no timm pretrained_cfg['classifier'] and no "
        "nn.Linear); name it with PiggybackConfig(head='module.name')"
    )
