"""Finding what to mask and what stays unmasked.

Selection is by layer family (module types) and by glob patterns on module names. Anything that
carries weights but is not masked is reported, never silently skipped: weights of attention
modules that no family covers are refused with an error naming them, weights computed by a
parametrization (weight norm, spectral norm) are refused with the call that bakes them into plain
weights, and every other unmasked parameter (position embeddings, class tokens, layer scales,
PReLU slopes, ...) is listed in a warning and stays frozen and shared by all tasks. Normalization
tensors (see `piggyback.norms`) and the biases of masked layers are not masked by design.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from piggyback.config import PiggybackConfig
from piggyback.errors import UnsupportedModelError
from piggyback.norms import is_norm, norm_types

# Transposed convolutions too: their forward reads `self.weight` like a convolution's, so W * mask
# in that slot masks them the same way (LowFormer upsamples with them: up to 26% of its weights).
_CONV_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
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


def in_any_subtree(name: str, roots: Sequence[str]) -> bool:
    """Whether dotted `name` is one of `roots` or lies below one of them."""
    return any(in_subtree(name, root) for root in roots)


def _selected(module_name: str, config: PiggybackConfig) -> bool:
    """Whether the include / exclude patterns leave this module to piggyback."""
    if config.include and not _matches(module_name, config.include):
        return False
    return not _matches(module_name, config.exclude)


def _conv_types() -> tuple[type[nn.Module], ...]:
    """Convolutions of the "conv" family. timm's CondConv2d stores its experts' kernels as one
    (experts, kernel numel) weight that its forward reads from `self.weight`: masking it masks
    every expert's kernel, exactly like a plain convolution's weight."""
    timm_layers = sys.modules.get("timm.layers")
    cond_conv = getattr(timm_layers, "CondConv2d", None) if timm_layers else None
    return _CONV_TYPES + ((cond_conv,) if isinstance(cond_conv, type) else ())


def _family_params(module: nn.Module, config: PiggybackConfig, convs: tuple) -> list[str]:
    """Names of the module's own tensors that its layer family masks."""
    types = config.layer_types
    if ("linear" in types and isinstance(module, nn.Linear)) or (
        "conv" in types and isinstance(module, convs)
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


def _computed_weight_fix(module: nn.Module, module_name: str, param: str) -> str:
    """How to turn a weight computed by a parametrization into a stored one (the fix to name)."""
    where = f"model.get_submodule({module_name!r})"
    if parametrize.is_parametrized(module, param):
        return f"torch.nn.utils.parametrize.remove_parametrizations({where}, {param!r})"
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == param:
            return f"torch.nn.utils.remove_weight_norm({where}, {param!r})"
        if isinstance(hook, SpectralNorm) and hook.name == param:
            return f"torch.nn.utils.remove_spectral_norm({where}, {param!r})"
    return f"make {module_name}.{param} an nn.Parameter of its module"


def _refuse_computed_weights(computed: list[tuple[nn.Module, str, str]]) -> None:
    """Masks apply to stored weights: a weight recomputed on every forward pass (weight norm,
    spectral norm, any parametrization) has no slot to hold W * mask. The backbone is frozen, so
    baking the parametrization in first gives the same network with a plain, maskable weight."""
    if not computed:
        return
    names = [f"{m}.{p}" if m else p for _, m, p in computed]
    module, module_name, param = computed[0]
    raise UnsupportedModelError(
        f"{len(names)} weights to mask are computed by a parametrization (weight norm, spectral "
        f"norm, ...), not stored: {names[:4]}{' ...' if len(names) > 4 else ''}. Bake each into "
        f"a plain weight before wrapping, e.g. {_computed_weight_fix(module, module_name, param)}"
        ", or leave these modules out with exclude=[...]"
    )


def find_mask_targets(
    model: nn.Module, config: PiggybackConfig, heads: Sequence[str]
) -> list[MaskTarget]:
    """Every tensor to mask, in module order, after the include / exclude patterns."""
    targets, computed = [], []
    convs, norms = _conv_types(), norm_types()
    for module_name, module in model.named_modules():
        if in_any_subtree(module_name, heads) or not _selected(module_name, config):
            continue
        if is_norm(module, norms):
            continue  # e.g. a norm class deriving from nn.Linear is still a norm
        for param in _family_params(module, config, convs):
            if param not in module._parameters:
                computed.append((module, module_name, param))
                continue
            full = f"{module_name}.{param}" if module_name else param
            targets.append(MaskTarget(full, tuple(getattr(module, param).shape)))
    _refuse_computed_weights(computed)
    if not targets:
        raise UnsupportedModelError(
            f"no layer to mask: layer_types={list(config.layer_types)}, "
            f"include={list(config.include)}, exclude={list(config.exclude)} select nothing"
        )
    return targets


def find_norm_tensors(model: nn.Module, heads: Sequence[str]) -> list[str]:
    """Dotted names of the parameters and buffers owned by normalization modules."""
    names, norms = [], norm_types()
    for module_name, module in model.named_modules():
        if in_any_subtree(module_name, heads) or not is_norm(module, norms):
            continue
        prefix = f"{module_name}." if module_name else ""
        names += [prefix + n for n, _ in module.named_parameters(recurse=False)]
        names += [prefix + n for n, t in module.named_buffers(recurse=False) if t is not None]
    return names


def _is_masked_layer_bias(param_name: str, module_name: str, masked: set[str]) -> bool:
    """The bias of a masked layer: left unmasked on purpose (the paper masks weights only)."""
    if param_name == "bias":
        weight = "weight"
    elif param_name == "in_proj_bias":  # nn.MultiheadAttention's packed input projection
        weight = "in_proj_weight"
    else:
        return False
    return (f"{module_name}.{weight}" if module_name else weight) in masked


def _refuse_attention(refused: list[tuple[str, nn.Module]], config: PiggybackConfig) -> None:
    if not refused:
        return
    names = [name for name, _ in refused]
    classes = sorted({type(module).__name__ for _, module in refused})
    if "attention" not in config.layer_types and any(
        isinstance(module, nn.MultiheadAttention) for _, module in refused
    ):
        hint = "add 'attention' to layer_types (masks nn.MultiheadAttention's input projection)"
    else:
        hint = (
            f"piggyback masks nn.Linear / nn.Conv / nn.MultiheadAttention layers, and {classes} "
            "uses raw weight parameters instead; to keep them frozen and shared by all tasks "
            "(unmasked), leave these modules out with exclude=[...]"
        )
    modules = sorted({name.rpartition(".")[0] for name in names})
    raise UnsupportedModelError(
        f"attention weights that no mask covers: {names[:6]}{' ...' if len(names) > 6 else ''}. "
        f"To go on, {hint}, e.g. exclude={modules[:3]}"
    )


def check_unmasked(
    model: nn.Module, config: PiggybackConfig, heads: Sequence[str], targets: list[MaskTarget]
) -> list[str]:
    """Refuse unmasked attention weights; warn about and return the other unmasked parameters.

    Every parameter counts, whatever its number of dimensions: a layer scale stored as a vector is
    reported like the same scale stored as a (1, 1, C) tensor. Not reported: the head, the
    normalization layers, the biases of masked layers, and what include / exclude leave out.
    """
    masked = {t.name for t in targets}
    norms = norm_types()
    refused, unmasked = [], []
    for module_name, module in model.named_modules():
        if in_any_subtree(module_name, heads) or is_norm(module, norms):
            continue
        if not _selected(module_name, config):
            continue  # the user chose to leave these out
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if full in masked or _is_masked_layer_bias(param_name, module_name, masked):
                continue
            attention = _ATTENTION_NAME.search(type(module).__name__) and "weight" in param_name
            if attention and param.dim() >= 2:
                refused.append((full, module))
            else:
                unmasked.append(full)
    _refuse_attention(refused, config)
    if unmasked:
        warnings.warn(
            f"{len(unmasked)} parameter tensors are not masked and stay shared by all tasks: "
            f"{unmasked[:8]}{' ...' if len(unmasked) > 8 else ''}",
            stacklevel=3,
        )
    return unmasked
