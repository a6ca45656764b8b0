"""Exceptions raised by piggyback.

Every error says what was expected, what was found and what to do. They share one base class so
callers (the CLI in particular) can catch library errors without hiding programming mistakes.
"""

from __future__ import annotations


class PiggybackError(Exception):
    """Base class of all errors raised on purpose by piggyback."""


class TaskError(PiggybackError, LookupError):
    """No task is set, a task name is unknown or invalid, or a task already exists."""


class TaskFileError(PiggybackError, ValueError):
    """A task file or model directory is unreadable, corrupted, or does not fit this model."""


class FingerprintMismatchError(TaskFileError):
    """A task file was made for other backbone weights than the ones it is loaded onto."""


class UnsupportedModelError(PiggybackError, TypeError):
    """The model holds layers piggyback cannot mask or a head it cannot find or rebuild."""


class DataError(PiggybackError, ValueError):
    """A dataset path, layout, list file or image is missing or malformed."""


class BackboneError(PiggybackError, ValueError):
    """A backbone name or weights file cannot be resolved or loaded."""


class DeviceError(PiggybackError, ValueError):
    """A `--device` that does not exist on this machine, or an unknown `--precision`."""


class OutputError(PiggybackError, OSError):
    """A destination that cannot be written (read-only, not a folder, no space left)."""


class ImageError(DataError):
    """An image is missing, is no image, or is truncated or corrupted (see `piggyback.images`)."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed: refused before decoding (decompression bombs)."""
