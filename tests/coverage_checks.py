"""Checks shared by the coverage tests: building a model on the meta device and verifying what
PiggybackModel made of it (heads, masks, norms, reports, swap slots), independently of how
piggyback decides those things."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import timm
import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from piggyback import PiggybackModel
from piggyback.heads import TaskHeads
from piggyback.norms import is_norm, norm_types
from piggyback.swap import Slot
from piggyback.targets import in_any_subtree

# In-place tensor methods that change what a tensor is (shape, strides, autograd flags), not
# only its values: these still run on the meta device.
_METADATA_OPS = {
    "requires_grad_",
    "detach_",
    "resize_",
    "resize_as_",
    "set_",
    "as_strided_",
    "squeeze_",
    "unsqueeze_",
    "t_",
    "transpose_",
    "swapdims_",
    "swapaxes_",
}


class _NoValuesOnMeta(TorchFunctionMode):
    """Skips in-place value writes (weight initialisation) on meta tensors, which have no values.

    Why: on the meta device, initialisers such as trunc_normal_ run through Python reference
    kernels (clamp_, erfinv_, ...) that cost more than building the model itself (measured 4x on
    convnext_large), for tensors that hold nothing. Shapes, dtypes and modules are unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # nn.init functions reach a mode with their tensor as a keyword (tensor=...).
        target = args[0] if args else kwargs.get("tensor")
        if (
            name.endswith("_")
            and not name.endswith("__")  # properties and operators (__get__, __iadd__, ...)
            and name not in _METADATA_OPS
            and isinstance(target, torch.Tensor)
            and target.is_meta
        ):
            return target
        return func(*args, **kwargs)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Tensors are created on the CPU, and moved to the meta device when they become parameters or
    buffers of a module (what accelerate's init_empty_weights does). For models that compute their
    architecture from tensor values, which the meta device does not have (torchvision's RegNet
    derives its widths with torch.round(...).tolist())."""
    originals = nn.Module.register_parameter, nn.Module.register_buffer
    register_parameter, register_buffer = originals

    def parameter_on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module, name, tensor, persistent=True):
        tensor = tensor.to("meta") if tensor is not None else None
        register_buffer(module, name, tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = (
            register_parameter,
            register_buffer,
        )


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model `factory` builds, with every tensor on the meta device (no memory, no values).

    Built under torch.device("meta"); a model that needs tensor values while it is built is built
    again with CPU tensors moved to the meta device as they are registered.
    """
    try:
        with torch.device("meta"), _NoValuesOnMeta():
            return factory()
    except NotImplementedError as error:
        if "meta" not in str(error):
            raise
    with _parameters_on_meta(), _NoValuesOnMeta():
        return factory()


def wrap_quietly(backbone: nn.Module) -> PiggybackModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unmasked parameters are checked from model.unmasked
        return PiggybackModel(backbone)


def _is_masked_layer_bias(name: str, masked: set[str]) -> bool:
    module, _, param = name.rpartition(".")
    prefix = f"{module}." if module else ""
    weight = {"bias": "weight", "in_proj_bias": "in_proj_weight"}.get(param)
    return weight is not None and prefix + weight in masked


def _looks_like_a_norm(module: nn.Module) -> bool:
    """What every normalization layer is: per-channel parameters (at most one dimension larger
    than 1), and no layers with weights inside it."""
    per_channel = all(sum(s > 1 for s in p.shape) <= 1 for p in module.parameters(recurse=False))
    children_weightless = all(next(child.parameters(), None) is None for child in module.children())
    return per_channel and children_weightless


def check_wrapped(
    backbone: nn.Module, declared: list[str], classifier_modules: list[nn.Module]
) -> PiggybackModel:
    """Wrap `backbone` and check the structure piggyback found, on any device (meta included).

    - the heads found are the `declared` ones, in order, then possibly more, each of which lies
      inside one of `classifier_modules` (what the model calls its classifier); every one of those
      holds a head found;
    - every head is replaced by per-task heads, and no head weight is masked;
    - every module taken for a norm is one;
    - every parameter outside the heads is exactly one of: masked, a norm tensor, the bias of a
      masked layer, or reported in `model.unmasked`;
    - every swapped tensor's slot resolves to a tensor of the recorded shape.
    """
    model = wrap_quietly(backbone)
    heads = model.head_names
    assert heads[: len(declared)] == declared and len(set(heads)) == len(heads)
    wrappers = [backbone.get_submodule(name) for name in heads]
    assert all(isinstance(wrapper, TaskHeads) for wrapper in wrappers)

    def holds(classifier: nn.Module, wrapper: TaskHeads) -> bool:
        return any(wrapper.original is m for m in classifier.modules())

    extras = wrappers[len(declared) :]
    assert all(any(holds(c, w) for c in classifier_modules) for w in extras), "extra head"
    assert all(any(holds(c, w) for w in wrappers) for c in classifier_modules), (
        "a classifier module without a head found in it"
    )
    masked = {t.name for t in model.targets}
    assert len(masked) == len(model.targets)
    assert not [n for n in masked if in_any_subtree(n, heads)], "a head weight is masked"
    norms = norm_types()
    not_norms = [
        name
        for name, module in backbone.named_modules()
        if is_norm(module, norms) and not _looks_like_a_norm(module)
    ]
    assert not not_norms, f"taken for norms but are not: {not_norms}"
    params = {n for n, _ in backbone.named_parameters() if not in_any_subtree(n, heads)}
    norms = set(model.norm_names) & params
    biases = {n for n in params if _is_masked_layer_bias(n, masked)}
    reported = set(model.unmasked)
    assert len(reported) == len(model.unmasked)
    parts = [masked, norms, biases, reported]
    assert sum(map(len, parts)) == len(set().union(*parts)), "a parameter counted twice"
    missing = params - set().union(*parts)
    assert not missing, f"neither masked nor reported: {sorted(missing)[:5]}"
    assert set().union(*parts) == params
    for target in model.targets:
        assert tuple(Slot.resolve(backbone, target.name).get().shape) == target.shape
    for name in model.norm_names:
        Slot.resolve(backbone, name)
    return model


#: Set to a file path to have the coverage tests append one JSON line per model they check (what
#: `tests/coverage_report.py` turns into docs/model-coverage.md). Off by default.
LOG_ENV = "PIGGYBACK_COVERAGE_LOG"


def _log(record: dict) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    record["versions"] = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
    }
    # One short write per line in append mode: lines from parallel test workers do not interleave.
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def log_wrapped(library: str, name: str, model: PiggybackModel, note: str | None = None) -> None:
    """Record a model that passed `check_wrapped`: its heads, and how many of its backbone's
    weights are masked and which kinds of parameter are reported (by module class)."""
    if not os.environ.get(LOG_ENV):
        return
    backbone, heads = model.backbone, model.head_names
    params = {n: p for n, p in backbone.named_parameters() if not in_any_subtree(n, heads)}
    reported: Counter[str] = Counter()
    for name_ in model.unmasked:
        module_name, _, param = name_.rpartition(".")
        kind = type(backbone.get_submodule(module_name)).__name__ if module_name else "(model)"
        reported[f"{kind}.{param}"] += params[name_].numel()
    _log(
        {
            "library": library,
            "model": name,
            "outcome": "pass",
            "note": note,
            "heads": heads,
            "masked": sum(t.numel for t in model.targets),
            "backbone": sum(p.numel() for p in params.values()),
            "reported": dict(reported),
        }
    )


def log_refused(library: str, name: str, reason: str, outcome: str = "refused") -> None:
    """Record a model that piggyback refuses (or, outcome "unbuildable", that cannot be built on
    the meta device), with the message."""
    _log({"library": library, "model": name, "outcome": outcome, "reason": reason})
