"""How a backbone is wrapped: which layers get masks, how masks are thresholded and initialised.

One `PiggybackConfig` holds for every task of a model, because all tasks must mask the same
layers for their files to be interchangeable. It is saved as JSON next to the task files.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from piggyback.mask_kinds import get_mask_kind

ScoreInit = Literal["ones", "uniform"]

#: Layer families that can be masked: "linear" (nn.Linear and subclasses), "conv" (nn.Conv1d/2d/3d,
#: grouped, depthwise and transposed included, subclasses such as timm's Conv2dSame, and timm's
#: CondConv2d), "attention"
#: (nn.MultiheadAttention's packed input projection, which is not an nn.Linear) and "embedding".
LAYER_TYPES = ("linear", "conv", "attention", "embedding")


@dataclass
class PiggybackConfig:
    """Settings shared by all tasks of a model; defaults are the paper's.

    Attributes:
        mask_kind: name of a registered mask kind (`piggyback.mask_kinds`): "binary" masks in
            {0, 1} (the paper), "ternary" masks in {-1, 0, 1}, or one registered by the user.
        threshold: a score above it switches its weight on (paper: 5e-3).
        init: "ones" fills every score with `init_value`, so training starts from the exact
            pretrained network; "uniform" draws scores from U(-init_value, init_value) as the
            paper's code does.
        init_value: the initial score (paper: 1e-2).
        layer_types: which layer families are masked (see LAYER_TYPES).
        include: glob patterns on module names; when given, only matching modules are masked.
        exclude: glob patterns on module names that are never masked. (For these and
            `layer_types`, a single string is one entry.)
        mask_bias: also mask biases (the paper masks weights only).
        task_norms: give each task its own normalization parameters and running statistics,
            trained with the task; False keeps the backbone's normalization frozen in eval mode.
        head: dotted name of the classifier module; None finds it automatically.
    """

    mask_kind: str = "binary"
    threshold: float = 5e-3
    init: ScoreInit = "ones"
    init_value: float = 1e-2
    layer_types: tuple[str, ...] = ("linear", "conv", "attention")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    mask_bias: bool = False
    task_norms: bool = False
    head: str | None = None

    def __post_init__(self) -> None:
        # One string is one entry: tuple("stem") would be ('s', 't', 'e', 'm'), masking the stem.
        self.layer_types = _entries("layer_types", self.layer_types)
        self.include = _entries("include", self.include)
        self.exclude = _entries("exclude", self.exclude)
        self.validate()

    def validate(self) -> None:
        """Refuse settings that would silently give a broken or untrainable model."""
        if self.init not in ("ones", "uniform"):
            raise ValueError(f"init must be 'ones' or 'uniform', got {self.init!r}")
        for name in ("threshold", "init_value"):  # NaN compares false: every weight off, silently
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy too
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        self._check_names()
        self.kind.check(self)

    def _check_names(self) -> None:
        """Layer families, glob patterns and the head name are strings (an index may say else)."""
        for name in ("include", "exclude"):
            odd = [p for p in getattr(self, name) if not isinstance(p, str)]
            if odd:
                raise ValueError(f"{name} must be glob patterns (strings), got {odd}")
        unknown = [t for t in self.layer_types if not isinstance(t, str) or t not in LAYER_TYPES]
        if unknown or not self.layer_types:
            raise ValueError(
                f"layer_types must be a non-empty subset of {LAYER_TYPES}, got {unknown}"
            )
        if self.head is not None and not isinstance(self.head, str):
            raise ValueError(f"head must be a module name (a string) or None, got {self.head!r}")

    @property
    def kind(self):
        """The mask kind strategy (`piggyback.mask_kinds.MaskKind`) named by `mask_kind`."""
        return get_mask_kind(self.mask_kind)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (tuples become lists)."""
        data = dataclasses.asdict(self)
        for key in ("layer_types", "include", "exclude"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PiggybackConfig:
        """Inverse of `to_dict`."""
        return strict_from_dict(cls, data, "PiggybackConfig keys")


def _entries(name: str, value: Any) -> tuple:
    """A tuple of entries from a list, a tuple or one string (a single entry)."""
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError as error:
        raise ValueError(f"{name} must be a list of strings, got {value!r}") from error


def strict_from_dict(cls: type, data: dict[str, Any], what: str):
    """Dataclass `cls` from `data`; unknown keys are an error so typos do not pass silently."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {sorted(names)}")
    return cls(**data)
