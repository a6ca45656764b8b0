"""The task file: one task (masks, head, norms, metadata) as one safetensors file.

Layout: the task's method writes its tensors (piggyback: "masks", all masks as one flat uint8
tensor, coded by the file's `codec`; finetune: "weight/<name>"), then the head ("head/<key>") and
the task's normalization tensors ("norm/<name>"). JSON metadata under the safetensors metadata key
"piggyback" holds the format version, the codec, the method and mask kind, the masked tensors'
names and shapes, the class names, preprocessing and results, the backbone's fingerprint and a
checksum over all of it (`fileio`). A file is checked completely before the model changes.

Versions: 1 (checksum over tensors only, masks always bit-packed) and 2 (checksum over the
metadata too; `codec` always "packed": ceil(P * bits / 8) bytes) are still read. 3 adds masks
coded by any codec of `mask_codecs` (by default "zstd": entropy-coded, about 0.1-0.3 bit per
weight for learned masks) with its `codec_params`, and `head_dtype`: the head and the task's
normalization tensors may be stored in float16 or bfloat16 (lossy, so only on request); they are
widened back to the model's dtype when loaded (`task_coding`). In memory a loaded task's masks
are always the packed codes, whatever the file's codec. A loaded task remembers its file's codec
and head dtype, and is saved again with them unless the caller asks for others.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import piggyback
from piggyback.errors import DataError, FingerprintMismatchError, TaskError, TaskFileError
from piggyback.fileio import META_KEY, content_checksum, read_checked_safetensors, write_atomic
from piggyback.heads import head_inputs, new_head
from piggyback.mask_codecs import mask_codec_names
from piggyback.methods import FileTensors, get_method, method_names
from piggyback.packing import packed_size, unpack_codes
from piggyback.routing import read_routing_profile
from piggyback.task_coding import (  # HEAD_DTYPES: also read from here
    CODED_FROM,
    HEAD_DTYPES,
    PACKED,
    compact,
    decode_masks,
    encode_masks,
    stored_as,
    widened,
)
from piggyback.tasks import TaskMetadata, TaskState

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel

TASK_FORMAT = "piggyback-task"
TASK_FORMAT_VERSION = 3
CHECKED_FROM = 2  # the first version whose checksum covers the metadata


# -- writing ------------------------------------------------------------------------------------


def task_tensors(
    model: PiggybackModel, name: str, codec: str | None = None, head_dtype: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a task file, by file key (CPU, contiguous, no shared storage), and the
    metadata of its masks' codec. None for `codec` / `head_dtype`: as the task's file stored it."""
    state = model.task(name)
    codec, head_dtype = codec or state.stored_as[0], head_dtype or state.stored_as[1]
    tensors = dict(state.method.file_tensors(state, model))
    coding: dict[str, Any] = {"codec": PACKED, "codec_params": {}}
    if "masks" in tensors:
        sizes = [t.numel for t in model.targets]
        tensors["masks"], used, params = encode_masks(
            tensors["masks"], sizes, model.config.kind.code_bits, codec
        )
        coding = {"codec": used, "codec_params": params}
    tensors.update({f"head/{k}": v for k, v in state.head.state_dict().items()})
    tensors.update({f"norm/{n}": v for n, v in state.norms.items()})
    if state.routing is not None:
        tensors.update(state.routing.file_tensors())
    tensors = compact(tensors, head_dtype)
    coding["head_dtype"] = head_dtype
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, coding


def task_metadata(
    model: PiggybackModel, name: str, tensors: dict[str, Tensor], coding: dict[str, Any]
) -> dict[str, Any]:
    state = model.task(name)
    config = model.config
    masks = state.method.uses_masks
    meta = {
        "format": TASK_FORMAT,
        "format_version": TASK_FORMAT_VERSION,
        "piggyback_version": piggyback.__version__,
        **coding,
        "task": name,
        "method": state.method_name,
        "mask_kind": config.mask_kind if masks else None,
        "bits_per_weight": config.kind.code_bits if masks else 0,
        "threshold": config.threshold,
        "layers": [[t.name, list(t.shape)] for t in model.targets],
        "num_masked": model.num_masked,
        "num_classes": state.head_classes,
        "class_names": state.class_names,
        "head": model.head_name,
        "norms": list(state.norms.names),
        "backbone_fingerprint": model.fingerprint,
        "backbone_spec": model.backbone_spec,
        "info": state.metadata.info_dict(),
        "routing": state.routing.file_metadata() if state.routing is not None else None,
    }
    meta["checksum"] = content_checksum(meta, tensors)
    return meta


def save_task(
    model: PiggybackModel,
    name: str,
    path: Path,
    *,
    codec: str | None = None,
    head_dtype: str | None = None,
) -> Path:
    """Write task `name` of `model` to `path` atomically: masks coded by `codec`, head and norms
    in `head_dtype`. None: as the file the task was loaded from stored them, else the default
    codec (see `encode_masks`) and the head as the model has it."""
    tensors, coding = task_tensors(model, name, codec, head_dtype)
    return write_task_file(path, tensors, task_metadata(model, name, tensors, coding))


def write_task_file(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    metadata = {META_KEY: json.dumps(meta)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# -- reading and checking -----------------------------------------------------------------------


def read_task_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Metadata and tensors of a task file, checked (format, version, checksum, codec, head
    dtype, preprocessing record)."""
    meta, tensors = read_checked_safetensors(
        path, TASK_FORMAT, TASK_FORMAT_VERSION, "task file", checked_from=CHECKED_FROM
    )
    _check_coding(path, meta)
    info = meta.get("info")
    if isinstance(info, dict) and info.get("preprocess") is not None:
        _check_preprocess(path, "info.preprocess", info["preprocess"], partial=True)
    return meta, tensors


def _check_coding(path: Path, meta: dict[str, Any]) -> None:
    """The codec and head dtype are names this piggyback reads (else: upgrade it)."""
    for key, what in (("codec", "codec"), ("head_dtype", "dtype")):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise TaskFileError(
                f"{path}: '{key}' must be null or a {what} name, found {meta[key]!r}"
            )
    codec = meta.get("codec", PACKED)
    if codec != PACKED and meta["format_version"] < CODED_FROM:
        raise TaskFileError(f"{path}: version {meta['format_version']} files hold packed masks")
    if codec not in mask_codec_names():
        raise TaskFileError(
            f"{path}: masks coded with {codec!r}, which this piggyback ({piggyback.__version__}) "
            f"does not know (it reads {mask_codec_names()}): upgrade piggyback"
        )
    head_dtype = meta.get("head_dtype")
    if head_dtype is not None and head_dtype not in HEAD_DTYPES:
        raise TaskFileError(
            f"{path}: head stored as {head_dtype!r}, which this piggyback "
            f"({piggyback.__version__}) does not read ({list(HEAD_DTYPES)}): upgrade piggyback"
        )


#: Stand-ins for the keys a partial task preprocessing record lacks (hand-made tasks save those;
#: it is `predict` that needs them, and says so), so that the values present are still checked.
_UNCHECKED_PREPROCESS = {"image_size": 1, "mean": [0.0] * 3, "std": [1.0] * 3}


def _check_preprocess(path: Path, key: str, record: Any, *, partial: bool = False) -> None:
    """Refuse a preprocessing record that would load and only fail in `predict` or `info`:
    not an object, unknown keys, values of the wrong type or size, or (unless `partial`)
    missing keys."""
    from piggyback.preprocess import Preprocess  # imports torchvision: lazily

    try:
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, found {json.dumps(record)[:80]}")
        Preprocess.from_dict(_UNCHECKED_PREPROCESS | record if partial else record)
    except (DataError, TypeError) as error:
        raise TaskFileError(f"{path}: {key!r} is malformed ({error})") from error


def check_backbone(model: PiggybackModel, source: Path, found: Any, spec: Any = None) -> None:
    """Refuse `source` (a file or directory) made for other backbone weights than `model`'s."""
    if found is None:
        raise FingerprintMismatchError(
            f"{source} records no backbone fingerprint, so it cannot be matched to this "
            "backbone: it is damaged or was written by a development version of piggyback. "
            "Make it again (for a training run: start over with --overwrite)."
        )
    if found != model.fingerprint:
        raise FingerprintMismatchError(
            f"{source} was made for backbone weights {found} (backbone {spec or 'unnamed'}), "
            f"but this model's backbone is {model.fingerprint} (backbone "
            f"{model.backbone_spec or 'unnamed'}). A mask only works on the exact weights it "
            "was learned on: use that backbone."
        )


def _check_layers(model: PiggybackModel, path: Path, meta: dict[str, Any]) -> None:
    expected = [[t.name, list(t.shape)] for t in model.targets]
    found = meta.get("layers")
    if found == expected:
        return
    if not isinstance(found, list) or not all(isinstance(x, list) and len(x) == 2 for x in found):
        raise TaskFileError(f"{path}: 'layers' metadata missing or malformed")
    counts = ""
    if len(found) != len(expected):
        counts = (
            f"this model masks {len(expected)} tensors, the file has {len(found)} (made with "
            "other layer_types / include / exclude settings?); "
        )
    pairs = zip_longest(expected, found, fillvalue=["<none>", []])
    index, (want, got) = next((i, pair) for i, pair in enumerate(pairs) if pair[0] != pair[1])
    raise TaskFileError(
        f"{path}: {counts}masked tensor {index} differs: this model expects {want[0]!r} with "
        f"shape {want[1]}, the file has {got[0]!r} with shape {got[1]}"
    )


def _check_mask_settings(model: PiggybackModel, path: Path, meta: dict[str, Any]) -> None:
    config = model.config
    if meta.get("mask_kind") != config.mask_kind or meta.get("threshold") != config.threshold:
        raise TaskFileError(
            f"{path}: the file holds {meta.get('mask_kind')} masks at threshold "
            f"{meta.get('threshold')}, this model uses {config.mask_kind} at {config.threshold}"
        )


def _take(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_named_tensors(
    path: Path, what: str, found: dict[str, Tensor], expected: dict[str, Tensor]
) -> None:
    """Same names, shapes and dtypes as the model's tensors."""
    if set(found) != set(expected):
        missing = sorted(set(expected) - set(found))[:5]
        extra = sorted(set(found) - set(expected))[:5]
        raise TaskFileError(
            f"{path}: {what} tensors do not match this model: missing {missing}, unexpected {extra}"
        )
    for name, tensor in found.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise TaskFileError(
                f"{path}: {what} tensor {name!r}: this model expects {want.dtype} "
                f"{tuple(want.shape)}, the file has {tensor.dtype} {tuple(tensor.shape)}"
            )


def _like(found: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """File tensors on the model's device, parameters marked as such to be trainable."""
    out = {}
    for name, tensor in found.items():
        moved = tensor.to(reference[name].device)
        out[name] = nn.Parameter(moved) if isinstance(reference[name], nn.Parameter) else moved
    return out


class FileReader(FileTensors):
    """A checked task file's tensors, handed to its method to fill the task (see `methods`)."""

    def __init__(self, model: PiggybackModel, path: Path, meta: dict, tensors: dict) -> None:
        self.model, self.path, self.meta, self.tensors = model, path, meta, tensors

    def masks(self) -> Tensor:
        """The packed masks (decoded by the file's codec), after the mask settings, size and
        code checks."""
        model, path = self.model, self.path
        _check_mask_settings(model, path, self.meta)
        kind = model.config.kind
        data = self.tensors.get("masks")
        if data is None:
            raise TaskFileError(f"{path}: no 'masks' tensor")
        sizes = [t.numel for t in model.targets]
        masks = decode_masks(path, {**self.meta, "bits_per_weight": kind.code_bits}, data, sizes)
        expected = packed_size(model.num_masked, kind.code_bits)
        if masks.dtype != torch.uint8 or masks.shape != (expected,):
            raise TaskFileError(
                f"{path}: expected 'masks' as uint8 ({expected},) for {model.num_masked} weights "
                f"at {kind.code_bits} bit(s) each, found {masks.dtype} {tuple(masks.shape)}"
            )
        if kind.num_codes < 2**kind.code_bits:
            codes = unpack_codes(masks, model.num_masked, kind.code_bits)
            if int(codes.max()) >= kind.num_codes:
                raise TaskFileError(
                    f"{path}: {kind.name} masks hold an invalid code ({int(codes.max())})"
                )
        return masks

    def backbone_like(self, prefix: str, names: list[str] | None) -> dict[str, Tensor]:
        """The file's tensors under `prefix`, checked against the backbone's (all, or `names`)."""
        backbone = self.model.backbone_tensors(exclude_head=True)
        expected = backbone if names is None else {n: backbone[n] for n in names}
        found = widened(self.path, self.meta, _take(self.tensors, prefix), expected)
        _check_named_tensors(self.path, prefix.rstrip("/"), found, expected)
        return _like(found, backbone)


def _head_classes(path: Path, meta: dict, found: dict[str, Tensor]) -> int | None:
    """The classes of a newly built head (None: a copy of the backbone's), checked against the
    file's head tensors (each has one row per class) before a head that large is built."""
    num_classes = meta.get("num_classes")
    if type(num_classes) is not int or num_classes < 1:
        return None
    outputs = sorted({t.shape[0] for t in found.values() if t.dim() >= 1})
    if outputs != [num_classes]:
        raise TaskFileError(
            f"{path}: 'num_classes' is {num_classes}, but its head tensors have {outputs} outputs"
        )
    return num_classes


def _build_head(model: PiggybackModel, path: Path, meta: dict, found: dict[str, Tensor]):
    head_classes = _head_classes(path, meta, found)
    head = new_head(model.original_head, head_classes, seed=0)
    found = widened(path, meta, found, head.state_dict())
    _check_named_tensors(path, "head", found, head.state_dict())
    head.load_state_dict(found)
    return head.to(model.device), head_classes


def build_task_state(
    model: PiggybackModel, path: Path, meta: dict[str, Any], tensors: dict[str, Tensor], name: str
) -> TaskState:
    """A complete, frozen task from a file's contents, checked against `model` (not touched)."""
    method_name = meta.get("method")
    if method_name not in method_names():
        raise TaskFileError(
            f"{path}: unknown method {method_name!r}; expected one of {method_names()}"
        )
    method = get_method(method_name)
    _check_layers(model, path, meta)
    head, head_classes = _build_head(model, path, meta, _take(tensors, "head/"))
    try:
        metadata = TaskMetadata.from_file(meta.get("info"), meta.get("class_names"))
        state = TaskState(name, method, head=head, metadata=metadata, head_classes=head_classes)
    except ValueError as error:
        raise TaskFileError(f"{path}: {error}") from error
    reader = FileReader(model, path, meta, tensors)
    method.load_file_tensors(state, model, reader)
    if _take(tensors, "norm/"):
        state.copy_tensors(state.norms, reader.backbone_like("norm/", model.norm_names))
    state.routing = read_routing_profile(path, meta.get("routing"), tensors, head_inputs(head))
    if state.routing is not None:
        _check_preprocess(path, "routing.preprocess", state.routing.preprocess)
    state.stored_as = stored_as(meta)
    state.freeze(model.targets, model.config)
    return state


def load_task(
    model: PiggybackModel,
    path: Path,
    *,
    name: str | None = None,
    check_fingerprint: bool = True,
    expected_name: str | None = None,
    replace: bool = False,
) -> str:
    """Check a task file completely, then add it to `model` (frozen); returns the task's name.

    `expected_name`: the name the file must record (a model index entry's), so that an index
    cannot make one task's file pass for another. `replace`: swap out a task of that name.
    """
    meta, tensors = read_task_file(path)
    if check_fingerprint:
        check_backbone(model, path, meta.get("backbone_fingerprint"), meta.get("backbone_spec"))
    if expected_name is not None and meta.get("task") != expected_name:
        raise TaskFileError(
            f"{path} holds task {meta.get('task')!r}, but the model index lists it as "
            f"{expected_name!r}: the index is damaged; repair or recreate the directory"
        )
    name = name or meta.get("task")
    if not isinstance(name, str):
        raise TaskFileError(f"{path}: no task name in the file; pass name=...")
    if name in model.task_states and not replace:
        raise TaskError(
            f"task {name!r} already exists; delete_task({name!r}) or load it as another name"
        )
    model.install_task(build_task_state(model, path, meta, tensors, name), replace=replace)
    return name
