"""Local backbone weights files: read without running code, loaded only if every key fits.

A weights file from the internet must not be able to run code, so torch files are read with
`weights_only=True` and safetensors are preferred; the common wrappers of a state dict (nesting
under "state_dict" / "model", DataParallel and torch.compile prefixes) are undone.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from piggyback.errors import BackboneError

__all__ = ["WEIGHT_SUFFIXES", "load_state_dict_strict", "read_state_dict"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Keys under which training scripts commonly nest the state dict inside a checkpoint.
_NESTING_KEYS = ("state_dict", "model")
# Prefixes added by DataParallel/DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 5


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
            f"keys {sorted(map(str, loaded))[:MAX_LISTED]}"
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
            f"{len(items)} {label} ({', '.join(items[:MAX_LISTED])}"
            f"{', ...' if len(items) > MAX_LISTED else ''})"
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
