"""Writing files atomically, and reading our safetensors files with every byte checked.

Every write goes to a temporary file next to its destination that is renamed into place, so an
interruption never leaves half a file. Our safetensors files (task files, checkpoints) carry JSON
metadata under one key and a checksum; from each format's `checked_from` version on, the checksum
covers the metadata in a canonical form as well as the tensors, so a flipped bit anywhere that is
read is refused, not loaded. Older versions (checksum over tensors only) stay readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

import piggyback
from piggyback.errors import TaskFileError
from piggyback.fingerprint import fingerprint

META_KEY = "piggyback"


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


# -- checksums ------------------------------------------------------------------------------------


def canonical_json(data: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no whitespace, ASCII only."""
    plain = json.loads(json.dumps(data))  # as it reads back: tuples as lists, keys as strings
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def content_checksum(meta: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> str:
    """SHA-256 over the metadata (without its "checksum" key) and the tensors' fingerprint."""
    digest = hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != "checksum"}))
    if tensors is not None:
        digest.update(fingerprint(tensors).encode())
    return "sha256:" + digest.hexdigest()


def checksum_ok(meta: dict[str, Any], tensors: dict[str, Tensor] | None, checked_from: int) -> bool:
    """Whether `meta["checksum"]` matches: over metadata and tensors from version `checked_from`
    on, over the tensors alone in older versions (which did not cover their metadata)."""
    if meta.get("format_version", 0) >= checked_from:
        return meta.get("checksum") == content_checksum(meta, tensors)
    return tensors is not None and meta.get("checksum") == fingerprint(tensors)


def check_format(path: Path, meta: Any, expected: str, version: int) -> None:
    """Refuse other formats and newer versions (with the upgrade advice)."""
    if not isinstance(meta, dict) or meta.get("format") != expected:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TaskFileError(f"{path}: expected format {expected!r}, found {found!r}")
    found_version = meta.get("format_version")
    if type(found_version) is not int or not 1 <= found_version <= version:
        raise TaskFileError(
            f"{path}: format version {found_version!r} is not supported; this piggyback "
            f"({piggyback.__version__}) reads versions 1 to {version}: upgrade piggyback"
        )


# -- our safetensors files ------------------------------------------------------------------------


def read_checked_safetensors(
    path: Path, file_format: str, version: int, what: str, *, checked_from: int
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """JSON metadata and tensors of one of our safetensors files, after checks of the container,
    the format and version, and the checksum (see the module docstring)."""
    if not path.is_file():
        raise TaskFileError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:  # one open, one header parse
            raw = (handle.metadata() or {}).get(META_KEY)
            # Copied out of the file's memory map: a tensor kept from it (a task's packed masks)
            # would otherwise keep the whole mapped file resident, head included, beside the
            # copies made of the rest (measured: +0.8 MiB per loaded ResNet-50 task).
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for truncated / garbled files
        raise TaskFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from error
    if raw is None:
        raise TaskFileError(f"{path} has no '{META_KEY}' metadata: it is not a piggyback {what}")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as error:
        raise TaskFileError(f"{path}: its metadata is not valid JSON ({error})") from error
    check_format(path, meta, file_format, version)
    if not checksum_ok(meta, tensors, checked_from):
        raise TaskFileError(
            f"{path} is corrupted: its contents do not match the checksum it records "
            f"({meta.get('checksum')!r}); make the {what} again or restore it from a copy"
        )
    return meta, tensors
