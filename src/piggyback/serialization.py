"""Task files (safetensors) and model directories (JSON config + one file per task).

A task file holds the task's masks bit-packed into one flat uint8 tensor ("masks": exactly
ceil(P * bits / 8) bytes for P masked weights), its head ("head/<key>"), its normalization tensors
("norm/<name>") or, for the fine-tuning baseline, every backbone tensor ("weight/<name>"), and
JSON metadata under the safetensors metadata key "piggyback". Only safetensors and JSON are ever
read. A file is fully checked against the model before anything in the model changes, and every
write goes to a temporary file that is renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import piggyback
from piggyback.config import PiggybackConfig
from piggyback.errors import FingerprintMismatchError, TaskError, TaskFileError
from piggyback.fingerprint import fingerprint
from piggyback.heads import new_head
from piggyback.masks import BITS_PER_WEIGHT
from piggyback.packing import packed_size, unpack_codes
from piggyback.routing import read_routing_profile
from piggyback.tasks import METHODS, TaskState

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel

TASK_FORMAT = "piggyback-task"
TASK_FORMAT_VERSION = 1
MODEL_FORMAT = "piggyback-model"
MODEL_FORMAT_VERSION = 1
CONFIG_NAME = "piggyback_config.json"
TASKS_DIR = "tasks"
_META_KEY = "piggyback"


# -- atomic writes ------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path`; renamed onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_path)` and move the result onto `path` in one rename."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


# -- task files: writing ------------------------------------------------------------------------


def task_tensors(model: PiggybackModel, name: str) -> dict[str, Tensor]:
    """The tensors of a task file, by file key (CPU, contiguous, no shared storage)."""
    state = model.task(name)
    tensors: dict[str, Tensor] = {}
    if state.method == "piggyback":
        tensors["masks"] = state.packed(model.targets, model.config)
    for key, value in model.heads.heads[name].state_dict().items():
        tensors[f"head/{key}"] = value
    for tensor_name, value in state.norms.items():
        tensors[f"norm/{tensor_name}"] = value
    for tensor_name, value in state.weights.items():
        tensors[f"weight/{tensor_name}"] = value
    if state.routing is not None:
        tensors.update(state.routing.file_tensors())
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def task_metadata(model: PiggybackModel, name: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    state = model.task(name)
    config = model.config
    return {
        "format": TASK_FORMAT,
        "format_version": TASK_FORMAT_VERSION,
        "piggyback_version": piggyback.__version__,
        "task": name,
        "method": state.method,
        "mask_kind": config.mask_kind if state.method == "piggyback" else None,
        "bits_per_weight": BITS_PER_WEIGHT[config.mask_kind] if state.method == "piggyback" else 0,
        "threshold": config.threshold,
        "layers": [[t.name, list(t.shape)] for t in model.targets],
        "num_masked": model.num_masked,
        "num_classes": state.num_classes,
        "class_names": state.class_names,
        "head": model.head_name,
        "norms": list(state.norms.names),
        "backbone_fingerprint": model.fingerprint,
        "backbone_spec": model.backbone_spec,
        "info": state.info,
        "routing": state.routing.file_metadata() if state.routing is not None else None,
        "checksum": fingerprint(tensors),
    }


def save_task(model: PiggybackModel, name: str, path: Path) -> Path:
    """Write task `name` of `model` to `path` atomically."""
    tensors = task_tensors(model, name)
    metadata = {_META_KEY: json.dumps(task_metadata(model, name, tensors))}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# -- task files: reading and checking -----------------------------------------------------------


def read_checked_safetensors(
    path: Path, file_format: str, version: int, what: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """JSON metadata and tensors of one of our safetensors files (task file or checkpoint),
    after checks of the container, the format and version, and the tensors' checksum."""
    if not path.is_file():
        raise TaskFileError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:  # one open, one header parse
            raw = (handle.metadata() or {}).get(_META_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for truncated / garbled files
        raise TaskFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from error
    if raw is None:
        raise TaskFileError(f"{path} has no '{_META_KEY}' metadata: it is not a piggyback {what}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise TaskFileError(f"{path}: its metadata is not valid JSON ({error})") from error
    _check_format(path, meta, file_format, version)
    found = fingerprint(tensors)
    if meta.get("checksum") != found:
        raise TaskFileError(
            f"{path} is corrupted: its tensors hash to {found}, "
            f"the file says {meta.get('checksum')}"
        )
    return meta, tensors


def read_task_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Metadata and tensors of a task file, checked (see `read_checked_safetensors`)."""
    return read_checked_safetensors(path, TASK_FORMAT, TASK_FORMAT_VERSION, "task file")


def _check_format(path: Path, meta: Any, expected: str, version: int) -> None:
    if not isinstance(meta, dict) or meta.get("format") != expected:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TaskFileError(f"{path}: expected format {expected!r}, found {found!r}")
    found_version = meta.get("format_version")
    if not isinstance(found_version, int) or not 1 <= found_version <= version:
        raise TaskFileError(
            f"{path}: format version {found_version!r} is not supported; this piggyback "
            f"({piggyback.__version__}) reads versions 1 to {version}: upgrade piggyback"
        )


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


def _masks_tensor(model: PiggybackModel, path: Path, tensors: dict[str, Tensor]) -> Tensor:
    bits = BITS_PER_WEIGHT[model.config.mask_kind]
    expected = packed_size(model.num_masked, bits)
    masks = tensors.get("masks")
    if masks is None or masks.dtype != torch.uint8 or masks.shape != (expected,):
        found = None if masks is None else f"{masks.dtype} {tuple(masks.shape)}"
        raise TaskFileError(
            f"{path}: expected 'masks' as uint8 ({expected},) for {model.num_masked} weights "
            f"at {bits} bit(s) each, found {found}"
        )
    if model.config.mask_kind == "ternary":
        codes = unpack_codes(masks, model.num_masked, bits)
        if int(codes.max()) > 2:
            raise TaskFileError(f"{path}: ternary masks hold an invalid code (3)")
    return masks


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


def _build_head(model: PiggybackModel, path: Path, meta: dict, found: dict[str, Tensor]):
    original = model.heads.original
    num_classes = meta.get("num_classes")
    head = new_head(original, num_classes if isinstance(num_classes, int) else None, seed=0)
    expected = head.state_dict()
    _check_named_tensors(path, "head", found, expected)
    head.load_state_dict(found)
    return head


def build_task_state(
    model: PiggybackModel, path: Path, meta: dict[str, Any], tensors: dict[str, Tensor], name: str
) -> tuple[TaskState, nn.Module]:
    """A complete task from a file's contents, checked against `model`; `model` is not touched."""
    method = meta.get("method")
    if method not in METHODS:
        raise TaskFileError(f"{path}: unknown method {method!r}; expected one of {METHODS}")
    _check_layers(model, path, meta)
    class_names = meta.get("class_names")
    state = TaskState(name, method, num_classes=meta.get("num_classes"), class_names=class_names)
    state.info = dict(meta.get("info") or {})
    state.routing = read_routing_profile(path, meta.get("routing"), tensors)
    device = model.device
    if method == "piggyback":
        _check_mask_settings(model, path, meta)
        state.set_packed_masks(_masks_tensor(model, path, tensors).to(device))
    backbone = model.backbone_tensors(exclude_head=True)
    norms = _take(tensors, "norm/")
    if norms:
        _check_named_tensors(path, "norm", norms, {n: backbone[n] for n in model.norm_names})
        state.copy_tensors(state.norms, _like(norms, backbone))
    weights = _take(tensors, "weight/")
    if method == "finetune":
        _check_named_tensors(path, "weight", weights, backbone)
        state.copy_tensors(state.weights, _like(weights, backbone))
    head = _build_head(model, path, meta, _take(tensors, "head/")).to(device)
    return state, head


def _like(found: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """File tensors on the model's device, parameters marked as such to be trainable."""
    out = {}
    for name, tensor in found.items():
        moved = tensor.to(reference[name].device)
        out[name] = nn.Parameter(moved) if isinstance(reference[name], nn.Parameter) else moved
    return out


def load_task(
    model: PiggybackModel,
    path: Path,
    *,
    name: str | None = None,
    check_fingerprint: bool = True,
    replace: bool = False,
) -> str:
    """Check a task file completely, then add it to `model` (or `replace` a task of that name);
    returns the task's name."""
    meta, tensors = read_task_file(path)
    if check_fingerprint:
        check_backbone(model, path, meta.get("backbone_fingerprint"), meta.get("backbone_spec"))
    name = name or meta.get("task")
    if not isinstance(name, str):
        raise TaskFileError(f"{path}: no task name in the file; pass name=...")
    if name in model.task_states and not replace:
        raise TaskError(
            f"task {name!r} already exists; delete_task({name!r}) or load it as another name"
        )
    state, head = build_task_state(model, path, meta, tensors, name)
    model.install_task(state, head, replace=replace)
    return name


# -- model directories --------------------------------------------------------------------------


def task_file(directory: Path, name: str) -> Path:
    return directory / TASKS_DIR / f"{name}.safetensors"


def model_config(model: PiggybackModel, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "piggyback_version": piggyback.__version__,
        "config": model.config.to_dict(),
        "backbone": {
            "spec": model.backbone_spec,
            "fingerprint": model.fingerprint,
            "head": model.head_name,
            "num_masked": model.num_masked,
        },
        "tasks": tasks,
    }


def read_model_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise TaskFileError(f"{directory} is not a piggyback model directory: no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TaskFileError(f"{path} is not valid JSON ({error})") from error
    _check_format(path, data, MODEL_FORMAT, MODEL_FORMAT_VERSION)
    backbone, tasks = data.get("backbone"), data.get("tasks")
    well_formed = (
        isinstance(data.get("config"), dict)
        and isinstance(backbone, dict)
        and isinstance(backbone.get("fingerprint"), str)
        and isinstance(tasks, dict)
        and all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in tasks.values())
    )
    if not well_formed:
        raise TaskFileError(
            f"{path} is malformed: expected 'config', 'backbone' (with 'fingerprint') and "
            "'tasks' (each with a 'file') entries"
        )
    return data


def save_pretrained(model: PiggybackModel, directory: Path, tasks: list[str] | None) -> Path:
    """Write task files, then the config that lists them; tasks saved earlier are kept.

    Each file is written atomically, but the index is read, updated and rewritten: two processes
    saving into one directory at the same moment can lose one of their index entries.
    """
    names = model.tasks if tasks is None else tasks
    index: dict[str, dict[str, Any]] = {}
    if (directory / CONFIG_NAME).exists():
        existing = read_model_config(directory)
        check_backbone(model, directory, existing["backbone"]["fingerprint"])
        if existing["config"] != model.config.to_dict():
            raise TaskFileError(
                f"{directory} was saved with config {existing['config']}, this model has "
                f"{model.config.to_dict()}: save into another directory"
            )
        index = {n: e for n, e in existing["tasks"].items() if (directory / e["file"]).is_file()}
    for name in names:
        path = save_task(model, name, task_file(directory, name))
        state = model.task(name)
        index[name] = {
            "file": str(path.relative_to(directory)),
            "method": state.method,
            "num_classes": state.num_classes,
        }
    write_json_atomic(directory / CONFIG_NAME, model_config(model, index))
    return directory


def from_pretrained(
    directory: Path,
    backbone: nn.Module | None,
    *,
    tasks: list[str] | None,
    check_fingerprint: bool,
) -> PiggybackModel:
    from piggyback.model import PiggybackModel

    data = read_model_config(directory)
    spec = data["backbone"].get("spec") or {}
    if backbone is None:
        if not spec:
            raise TaskFileError(f"{directory} does not say how to build its backbone; pass one")
        from piggyback.backbones import create_backbone_from_spec

        backbone = create_backbone_from_spec(spec).model
    model = PiggybackModel(backbone, PiggybackConfig.from_dict(data["config"]), backbone_spec=spec)
    if check_fingerprint:
        check_backbone(model, directory, data["backbone"]["fingerprint"], spec)
    names = list(data["tasks"]) if tasks is None else tasks
    for name in names:
        if name not in data["tasks"]:
            raise TaskError(f"{directory} has no task {name!r}; it has {list(data['tasks'])}")
        entry = data["tasks"][name]
        load_task(model, directory / entry["file"], name=name, check_fingerprint=check_fingerprint)
    return model
