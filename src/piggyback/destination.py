"""Checking that a destination can be written, before the work whose result goes there.

Training, evaluation and export take minutes to hours; finding out only at the end that the output
folder is read-only, or that its parent is a file, wastes all of it. These checks create nothing:
missing folders are left to the writer (which creates them), and the probe file is removed. Full
disks cannot be predicted; the writers' atomic renames make sure such a failure leaves no partial
file, and the CLI reports it in one line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from piggyback.errors import OutputError

__all__ = ["check_writable_dir", "check_writable_file"]


def check_writable_dir(directory: str | Path, what: str = "files") -> Path:
    """`directory` (created later if missing) can receive new files, or an OutputError."""
    directory = Path(directory)
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise OutputError(
            f"cannot write {what} to {directory}: {existing} is a file, not a folder; "
            "choose another output path"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".piggyback-write-test-", dir=existing)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(
            f"cannot write {what} to {directory}: {reason} ({existing}); choose another output "
            "path or fix its permissions"
        ) from error
    os.close(handle)
    os.unlink(probe)
    return directory


def check_writable_file(path: str | Path, what: str = "the result") -> Path:
    """The file `path` can be (re)written: not a folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what} to {path}: it is a folder; name a file")
    check_writable_dir(path.parent, what)
    return path


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (lexically: '..' is not resolved)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
