"""Exporting one task as a standalone model file: ONNX, TorchScript or a torch.export program.

The task is first merged into a plain copy of the backbone (`PiggybackModel.merge`: W * mask, its
head and norms), so the files hold ordinary weights and run without piggyback. Each file is
written under a temporary name and renamed, so an interrupted export never leaves a half-written
model where a server could pick it up. A JSON sidecar `<task>.json` records what a model file
cannot: how to prepare an image for it and what its outputs are called.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import piggyback
from piggyback.destination import check_writable_dir
from piggyback.errors import PiggybackError
from piggyback.fileio import write_atomic, write_json_atomic
from piggyback.preprocess import resolve_preprocess

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel

__all__ = ["FORMATS", "ExportError", "OnnxFallbackWarning", "export_task"]

#: Export format -> file suffix (after the task name).
FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported": ".pt2"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
SIDECAR_FORMAT = "piggyback-export"
# protobuf cannot serialize a message of 2 GiB or more, so a bigger ONNX model needs external data.
_ONNX_SINGLE_FILE_LIMIT = 2**31


class ExportError(PiggybackError, RuntimeError):
    """A model could not be exported, or the exported file failed its check."""


class OnnxFallbackWarning(UserWarning):
    """The torch.export-based ONNX exporter failed; the TorchScript-based one was used."""


def export_task(
    model: PiggybackModel,
    task: str,
    directory: str | Path,
    *,
    formats: str | Sequence[str] = ("onnx",),
    image_size: int | None = None,
    dynamic_batch: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Write task `task` as standalone model files plus a JSON sidecar into `directory`.

    Args:
        formats: any of "onnx" (`<task>.onnx`), "torchscript" (`<task>.torchscript.pt`) and
            "exported" (`<task>.pt2`, torch.export).
        image_size: the input side; default: the one the task was trained at.
        dynamic_batch: let the batch dimension vary (otherwise it is fixed to 1).
        mean, std: normalization for the sidecar, needed only when neither the task nor its
            backbone records it (see `piggyback.preprocess.task_preprocess`).

    Returns the path of every file written, by format, plus "json" for the sidecar. The model is
    left unchanged.
    """
    names = _check_formats(formats)
    # resolve_preprocess refuses an unknown task, before anything is computed or written.
    preprocess = resolve_preprocess(model, task, image_size=image_size, mean=mean, std=std)
    directory = check_writable_dir(directory, "the export")  # before minutes of exporting
    merged = model.merge(task).cpu().eval()
    example = _example_input(preprocess["image_size"], batch=2 if dynamic_batch else 1)
    with torch.no_grad():
        num_classes = int(merged(example).shape[-1])
    written: dict[str, Path] = {}
    files: dict[str, dict[str, Any]] = {}
    for fmt in names:
        path = directory / f"{task}{FORMATS[fmt]}"
        files[fmt] = {"file": path.name, **_WRITERS[fmt](merged, example, path, dynamic_batch)}
        written[fmt] = path
    sidecar = _sidecar(model, task, preprocess, num_classes, files, dynamic_batch)
    written["json"] = write_json_atomic(directory / f"{task}.json", sidecar)
    return written


def _check_formats(formats: str | Sequence[str]) -> list[str]:
    names = [formats] if isinstance(formats, str) else list(formats)
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ValueError(
            f"unknown export format(s) {unknown}: expected one or more of {', '.join(FORMATS)}"
        )
    return list(dict.fromkeys(names))


def _example_input(image_size: int, batch: int) -> Tensor:
    """A fixed random image batch. Two images for a dynamic batch: torch.export specializes a
    dimension of size 1 (it cannot tell it from broadcasting), so batch 1 would be baked in."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


def _batch_dim(dynamic: bool) -> tuple[dict[int, Any], ...] | None:
    return ({0: torch.export.Dim("batch", min=1)},) if dynamic else None


# -- ONNX ---------------------------------------------------------------------------------------


def _write_onnx(merged: nn.Module, example: Tensor, path: Path, dynamic: bool) -> dict[str, Any]:
    """The torch.export-based exporter first; the TorchScript-based one only if it fails."""
    _check_onnx_size(merged)
    try:
        program = torch.onnx.export(
            merged,
            (example,),
            dynamo=True,
            verbose=False,  # no progress printing from a library
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=_batch_dim(dynamic),
        )
    # It fails in many ways (onnxscript missing, an operator without translation, guards).
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]  # torch's messages run for pages
        warnings.warn(
            f"the torch.export-based ONNX exporter failed ({type(error).__name__}: {reason}); "
            "using the TorchScript-based exporter instead",
            OnnxFallbackWarning,
            stacklevel=3,
        )
        write_atomic(path, lambda tmp: _onnx_torchscript(merged, example, tmp, dynamic))
        exporter = "torchscript"
    else:
        write_atomic(path, lambda tmp: _save_onnx_program(program, tmp, dynamic))
        exporter = "dynamo"
    return {"exporter": exporter, "opset": _onnx_opset(path)}


def _save_onnx_program(program: Any, tmp: Path, dynamic: bool) -> None:
    program.save(str(tmp), external_data=False)
    _check_onnx_file(tmp, dynamic)


def _onnx_torchscript(merged: nn.Module, example: Tensor, tmp: Path, dynamic: bool) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        # Its deprecation notices add nothing to the OnnxFallbackWarning already given.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            merged,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )
    _check_onnx_file(tmp, dynamic)


def _check_onnx_size(merged: nn.Module) -> None:
    size = sum(t.numel() * t.element_size() for t in [*merged.parameters(), *merged.buffers()])
    if size >= _ONNX_SINGLE_FILE_LIMIT:
        raise ExportError(
            f"the model holds {size / 2**30:.1f} GiB of weights; a single ONNX file holds less "
            "than 2 GiB. Export it as 'exported' or 'torchscript' instead."
        )


def _check_onnx_file(path: Path, dynamic: bool) -> None:
    """One self-contained, valid ONNX file (with a free batch dimension when asked for)."""
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:  # the legacy exporter works without the onnx package: nothing to check
        return
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if uses_external_data(t)]
    if external:
        raise ExportError(f"the ONNX exporter put {len(external)} tensors in external files")
    onnx.checker.check_model(proto)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if dynamic and not batch.dim_param:
        raise ExportError(f"the exported ONNX graph fixed the batch size to {batch.dim_value}")


def _onnx_opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


# -- TorchScript and torch.export ---------------------------------------------------------------


def _write_torchscript(
    merged: nn.Module, example: Tensor, path: Path, dynamic: bool
) -> dict[str, Any]:
    """torch.jit.trace, checked on the example and (dynamic batch) on another batch size."""
    with warnings.catch_warnings():
        # The user asked for TorchScript; its deprecation is theirs to weigh, not a surprise.
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        traced = torch.jit.trace(merged, example, check_trace=True)
        if dynamic:
            _check_same(merged, traced, example, "TorchScript")
        write_atomic(path, lambda tmp: _save_through_handle(torch.jit.save, traced, tmp))
    return {}


def _write_exported(
    merged: nn.Module, example: Tensor, path: Path, dynamic: bool
) -> dict[str, Any]:
    """torch.export.export + torch.export.save, checked at another batch size."""
    program = torch.export.export(merged, (example,), dynamic_shapes=_batch_dim(dynamic))
    if dynamic:
        _check_same(merged, program.module(), example, "torch.export")

    write_atomic(path, lambda tmp: _save_through_handle(torch.export.save, program, tmp))
    return {}


def _save_through_handle(save: Callable[[Any, Any], None], obj: Any, tmp: Path) -> None:
    """Given a file name, both savers name the archive inside after it (here the temporary name),
    and torch.export.load insists on a .pt2 suffix; given a handle, the archive is "archive"."""
    with open(tmp, "wb") as handle:
        save(obj, handle)


def _check_same(
    merged: nn.Module, exported: Callable[[Tensor], Tensor], example: Tensor, what: str
) -> None:
    """Another batch size must give the merged model's outputs (no batch size baked in)."""
    other = _example_input(example.shape[-1], batch=3)
    with torch.no_grad():
        expected, found = merged(other), exported(other)
    if found.shape != expected.shape or not torch.allclose(found, expected, atol=1e-5, rtol=1e-4):
        raise ExportError(f"the {what} export gives other outputs than the model at batch size 3")


_WRITERS: dict[str, Callable[[nn.Module, Tensor, Path, bool], dict[str, Any]]] = {
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
    "exported": _write_exported,
}


# -- sidecar ------------------------------------------------------------------------------------


def _sidecar(
    model: PiggybackModel,
    task: str,
    preprocess: dict[str, Any],
    num_classes: int,
    files: dict[str, dict[str, Any]],
    dynamic: bool,
) -> dict[str, Any]:
    state = model.task(task)
    side = preprocess["image_size"]
    batch = "batch" if dynamic else 1
    return {
        "format": SIDECAR_FORMAT,
        "format_version": 1,
        "piggyback_version": piggyback.__version__,
        "task": task,
        "method": state.method_name,
        "num_classes": num_classes,
        "class_names": state.class_names or [str(i) for i in range(num_classes)],
        "input": {"name": INPUT_NAME, "shape": [batch, 3, side, side], "dtype": "float32"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": [batch, num_classes],
            "kind": "logits (a softmax over the classes gives probabilities)",
        },
        "preprocess": {
            **preprocess,
            "steps": (
                "decode as RGB; resize the shorter side to resize_size (interpolation); "
                "center-crop image_size x image_size; scale to [0, 1]; per channel subtract "
                "mean and divide by std; NCHW float32"
            ),
        },
        "files": files,
        "backbone": {"spec": model.backbone_spec, "fingerprint": model.fingerprint},
        "results": state.metadata.results,
    }
