"""Package attributes imported on first use (PEP 562 module `__getattr__`).

Why: the command line builds `piggyback train`'s options from `TrainConfig` when it is imported,
and `piggyback.training` / `piggyback.data` used to import their whole stacks (torchvision, scipy,
timm) on the way. That made `piggyback --help`, `--version` and `info` 2.6x slower to start
(12 s -> 31 s measured on the shared 2-core machine under load). With lazy package attributes,
`from piggyback.data import load_splits` still works, and importing one light submodule (the
recipe, the list of data formats) no longer imports its siblings.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, modules: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, which exports the names `modules[module]` of
    each module; each is imported once, on first access, then kept on the package."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
