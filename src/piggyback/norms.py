"""Which modules are normalization layers, recognised by their type, never by their name.

Normalization layers are not masked: their tensors stay frozen and shared (in eval mode, as in
the paper) or become per-task copies with `task_norms=True`. Guessing them from class names is
wrong both ways: a `WeightNormConv2d` is a convolution whose weight must be masked or reported,
and timm's `NormFreeBlock` is a whole residual block that must keep its training mode. So a
module is a norm only if it is an instance of a known normalization class: torch's, timm's and
torchvision's own, and any class registered with `register_norm_type`.
"""

from __future__ import annotations

import sys

from torch import nn

# Torch's bases cover their subclasses too: timm's BatchNormAct2d, GroupNormAct, LayerNorm2d,
# LayerNormAct2d, SplitBatchNorm2d, torchvision's LayerNorm2d, ...
_TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)

# Normalization classes of the model libraries that do not derive from a torch norm, looked up by
# attribute so that a class missing from an older or newer release is simply not there.
_LIBRARY_NORMS: dict[str, tuple[str, ...]] = {
    "timm.layers": (
        "RmsNorm",
        "RmsNormFp32",
        "RmsNorm2d",
        "RmsNorm2dFp32",
        "SimpleNorm",
        "SimpleNormFp32",
        "SimpleNorm2d",
        "SimpleNorm2dFp32",
        "FrozenBatchNormAct2d",
        "EvoNorm2dB0",
        "EvoNorm2dB1",
        "EvoNorm2dB2",
        "EvoNorm2dS0",
        "EvoNorm2dS0a",
        "EvoNorm2dS1",
        "EvoNorm2dS1a",
        "EvoNorm2dS2",
        "EvoNorm2dS2a",
        "FilterResponseNormTlu2d",
        "FilterResponseNormAct2d",
    ),
    "timm.layers.grn": ("GlobalResponseNorm",),
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
}

_registered: list[type[nn.Module]] = []


def register_norm_type(*classes: type[nn.Module]) -> None:
    """Treat instances of `classes` (and their subclasses) as normalization layers.

    For a model with its own normalization class that derives from none of torch's (e.g. a
    hand-written RMSNorm): its tensors are then frozen with the backbone's norms, or copied per
    task with `task_norms=True`, instead of being reported as unmasked weights. Register before
    wrapping the model. Only the module's own tensors count as norm tensors: layers inside it
    are still masked or reported like any other.

        from piggyback import register_norm_type
        register_norm_type(MyRMSNorm)
    """
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_norm_type takes nn.Module classes, got {cls!r}")
        if cls not in _registered:
            _registered.append(cls)


def norm_types() -> tuple[type[nn.Module], ...]:
    """Every class recognised as normalization now.

    Library classes are only looked up in libraries already imported: a model cannot hold an
    instance of a class whose module was never imported, so timm is never imported for nothing.
    """
    found = list(_TORCH_NORMS)
    for module_name, class_names in _LIBRARY_NORMS.items():
        module = sys.modules.get(module_name)
        if module is not None:
            found += [c for n in class_names if isinstance(c := getattr(module, n, None), type)]
    return tuple(found + _registered)


def is_norm(module: nn.Module, types: tuple[type[nn.Module], ...] | None = None) -> bool:
    """Whether `module` is a normalization layer (an instance of one of `norm_types()`)."""
    return isinstance(module, types or norm_types())
