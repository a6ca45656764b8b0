"""What a saved model directory holds, read from its files alone.

Nothing is built: no backbone, no download, no weights beyond the task files themselves. That keeps
`describe` fast and usable offline, on a machine without the backbone, and on directories whose
backbone cannot be rebuilt any more. Mask densities are counted from the bit-packed masks with the
layer list stored in each task file, so they equal `PiggybackModel.mask_density` after loading.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from torch import Tensor

from piggyback.errors import TaskFileError
from piggyback.mask_codecs import entropy_bits
from piggyback.masks import fraction_on, weighted_fraction_on
from piggyback.model_dir import indexed_task_path, read_model_config
from piggyback.packing import unpack_codes
from piggyback.repair import unindexed_task_files
from piggyback.task_coding import decode_masks
from piggyback.taskfile import read_task_file

__all__ = ["describe_model_dir", "format_description", "task_file_storage"]

_SHOWN_CLASS_NAMES = 10


def describe_model_dir(directory: str | Path) -> dict[str, Any]:
    """A JSON-ready description of a model directory (see `format_description`).

    A task whose file is missing or damaged is described by its "error" rather than failing the
    whole description: one broken task should not hide the state of the others.
    """
    directory = Path(directory)
    config = read_model_config(directory)
    backbone = config["backbone"]
    tasks = {
        name: _describe_task(directory, name, entry, backbone["fingerprint"])
        for name, entry in config["tasks"].items()
    }
    return {
        "directory": str(directory),
        "piggyback_version": config.get("piggyback_version"),
        "backbone": {
            "spec": backbone.get("spec") or {},
            "fingerprint": backbone["fingerprint"],
            "head": backbone.get("head"),
            "num_masked": backbone.get("num_masked"),
        },
        "config": config["config"],
        "masked_tensors": next(
            (t["masked_tensors"] for t in tasks.values() if not t["error"]), None
        ),
        "total_bytes": sum(t["bytes"] or 0 for t in tasks.values()),
        "tasks": tasks,
        "unindexed": [str(path) for path in unindexed_task_files(directory, config)],
    }


def _describe_task(
    directory: Path, name: str, entry: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    path = directory / entry["file"]
    size = path.stat().st_size if path.is_file() else None
    base = {"file": str(path), "bytes": size, "file_bytes": size}
    try:
        meta, tensors = read_task_file(indexed_task_path(directory, name, entry))
        if meta.get("task") != name:
            raise TaskFileError(f"the file holds task {meta.get('task')!r}, not {name!r}")
        layers = [(str(name), math.prod(shape)) for name, shape in meta["layers"]]
        storage = _storage(path, meta, tensors, layers)
    except (TaskFileError, KeyError, TypeError, ValueError) as error:
        return {**base, "method": None, "error": f"{type(error).__name__}: {error}"}
    density = storage.pop("layer_density")
    return {
        **base,
        "method": meta["method"],
        "num_classes": meta.get("num_classes", entry.get("num_classes")),
        "class_names": meta.get("class_names"),
        "mask_kind": meta.get("mask_kind"),
        "bits_per_weight": meta.get("bits_per_weight", 0),
        **storage,
        "masked_tensors": len(layers),
        "density": None if density is None else weighted_fraction_on(density, dict(layers)),
        "layer_density": density,
        "task_norms": len(meta.get("norms") or []),
        "fingerprint_matches": meta.get("backbone_fingerprint") == fingerprint,
        "info": meta.get("info") or {},
        "error": None,
    }


def _storage(
    path: Path, meta: dict[str, Any], tensors: dict[str, Tensor], layers: list[tuple[str, int]]
) -> dict[str, Any]:
    """What the file spends its bytes on, and how its masks compare with their entropy bound
    (the order-0 entropy of each tensor's codes: what a per-tensor code can reach)."""
    sizes = [count for _, count in layers]
    weights = sum(sizes)
    out = {
        "codec": meta.get("codec", "packed"),
        "head_dtype": meta.get("head_dtype") or "float32",
        "head_bytes": _nbytes(tensors, "head/"),
        "mask_bytes": _nbytes(tensors, "masks"),
        "mask_bits_per_weight": None,
        "entropy_bits_per_weight": None,
        "layer_density": None,
    }
    if "masks" not in tensors:  # a method without masks (classifier, finetune)
        return out
    bits = int(meta["bits_per_weight"])
    codes = unpack_codes(decode_masks(path, meta, tensors["masks"], sizes), weights, bits)
    out["mask_bits_per_weight"] = 8 * out["mask_bytes"] / weights if weights else 0.0
    out["entropy_bits_per_weight"] = entropy_bits(codes, sizes) / weights if weights else 0.0
    out["layer_density"] = {
        name: fraction_on(chunk)
        for (name, _), chunk in zip(layers, codes.split(sizes), strict=True)
    }
    return out


def task_file_storage(path: str | Path) -> dict[str, Any]:
    """What one task file spends its bytes on: codec, head dtype, mask and head bytes, mask bits
    per weight and the masks' entropy bound in bits per weight (see `piggyback info`)."""
    path = Path(path)
    meta, tensors = read_task_file(path)
    layers = [(str(name), math.prod(shape)) for name, shape in meta["layers"]]
    storage = _storage(path, meta, tensors, layers)
    storage.pop("layer_density")
    return {"file_bytes": path.stat().st_size, **storage}


def _nbytes(tensors: dict[str, Tensor], prefix: str) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))


# -- text -----------------------------------------------------------------------------------------


def format_description(desc: dict[str, Any], *, verbose: bool = False) -> str:
    """A readable report of `describe_model_dir`'s result.

    One table of tasks with the min / median / max of the per-layer mask densities; `verbose`
    adds every class name and the density of every masked tensor.
    """
    lines = [*_header(desc), "", f"Tasks ({len(desc['tasks'])}):"]
    rows = [_task_row(name, task) for name, task in desc["tasks"].items()]
    headers = [
        "task", "method", "classes", "size", "masks", "bits/weight (bound)", "head",
        "density", "layers min/med/max",
    ]  # fmt: skip
    lines += ["  " + line for line in _table(headers, rows)] if rows else ["  (none)"]
    for name, task in desc["tasks"].items():
        lines += ["", *_task_details(name, task, verbose)]
    if desc["unindexed"]:
        lines += ["", "Task files the index does not list (`piggyback repair` adds them):"]
        lines += [f"  {path}" for path in desc["unindexed"]]
    return "\n".join(lines)


def _header(desc: dict[str, Any]) -> list[str]:
    backbone, config = desc["backbone"], desc["config"]
    spec = backbone["spec"]
    if spec:
        weights = spec.get("weights") or ("pretrained" if spec.get("pretrained") else "random")
        name = f"{spec.get('name')} ({spec.get('source')}, {weights})"
    else:
        name = "unnamed (pass the backbone to from_pretrained)"
    tensors = desc["masked_tensors"]
    in_tensors = f" in {tensors} tensors" if tensors is not None else ""
    return [
        f"Model directory: {desc['directory']}",
        f"Backbone: {name}",
        f"Fingerprint: {backbone['fingerprint']}   head: {backbone['head']}",
        f"Masked weights: {backbone['num_masked']:,}{in_tensors}",
        f"Masks: {config.get('mask_kind')}, threshold {config.get('threshold')}, "
        f"layers {', '.join(config.get('layer_types') or [])}, "
        f"task norms {'on' if config.get('task_norms') else 'off'}",
        f"On disk: {_size(desc['total_bytes'])} in {len(desc['tasks'])} task file(s)",
    ]


def _task_row(name: str, task: dict[str, Any]) -> list[str]:
    size = _size(task["bytes"]) if task["bytes"] is not None else "missing"
    if task["error"]:
        return [name, "error", "-", size, "-", "-", "-", "-", "-"]
    density = task["layer_density"]
    spread = "-"
    if density:
        values = list(density.values())
        spread = "/".join(f"{v:.3f}" for v in (min(values), statistics.median(values), max(values)))
    coded = task["mask_bits_per_weight"]
    return [
        name,
        task["method"],
        "-" if task["num_classes"] is None else str(task["num_classes"]),
        size,
        f"{_size(task['mask_bytes'])} {task['codec']}" if coded is not None else "-",
        f"{coded:.3f} ({task['entropy_bits_per_weight']:.3f})" if coded is not None else "-",
        f"{_size(task['head_bytes'])} {task['head_dtype']}",
        "-" if task["density"] is None else f"{task['density']:.4f}",
        spread,
    ]


def _task_details(name: str, task: dict[str, Any], verbose: bool) -> list[str]:
    lines = [f"{name}:", f"  file: {task['file']}"]
    if task["error"]:
        return [*lines, f"  error: {task['error']}"]
    if not task["fingerprint_matches"]:
        lines.append("  warning: made for other backbone weights than this directory's")
    names = task["class_names"]
    if names:
        shown = names if verbose else names[:_SHOWN_CLASS_NAMES]
        more = f" ... ({len(names) - len(shown)} more)" if len(shown) < len(names) else ""
        lines.append(f"  classes: {', '.join(shown)}{more}")
    if task["task_norms"]:
        lines.append(f"  own normalization tensors: {task['task_norms']}")
    info = task["info"]
    if info.get("preprocess"):
        lines.append(f"  preprocess: {_preprocess(info['preprocess'])}")
    if info.get("results"):
        lines.append(f"  results: {_results(info['results'])}")
    if verbose and task["layer_density"]:
        rows = [[layer, f"{value:.4f}"] for layer, value in task["layer_density"].items()]
        lines += ["  layer densities:", *("    " + r for r in _table(["tensor", "density"], rows))]
    return lines


def _preprocess(prep: dict[str, Any]) -> str:
    def numbers(values: Any) -> str:
        return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]" if values else "?"

    return (
        f"{prep.get('image_size')} px crop of {prep.get('resize_size')} px "
        f"({prep.get('interpolation')}), mean {numbers(prep.get('mean'))}, "
        f"std {numbers(prep.get('std'))}"
    )


def _results(results: Any) -> str:
    if not isinstance(results, dict):
        return str(results)
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in results.items()
    )


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned text columns, right-aligned numeric ones."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _is_number(text: str) -> bool:
    try:
        float(text.split()[0])
    except (ValueError, IndexError):
        return text == "-"
    return True


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
