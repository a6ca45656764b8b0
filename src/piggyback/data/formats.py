"""The dataset layouts `load_splits` reads (kept apart so options can list them cheaply)."""

from __future__ import annotations

__all__ = ["DOWNLOADABLE", "FORMATS"]

FORMATS = (
    "auto",
    "imagefolder",
    "list",
    "classfolders",
    "cub",
    "cars",
    "flowers102",
    "sketch",
    "wikiart",
)
#: The formats torchvision can download.
DOWNLOADABLE = ("flowers102", "cars")
