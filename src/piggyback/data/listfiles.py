"""List files: one `path,label` line per image, the format of many published split files.

Accepted: CSV (`.csv`), TSV (`.tsv`), and `.txt` with a tab, a comma or whitespace between the
two fields; an optional header line; labels that are all class indices or all class names; paths
relative to the list file's folder. Errors name the file and line, because list files are usually
hand-made or converted and a bad line is otherwise hard to find.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from torchvision.datasets.folder import IMG_EXTENSIONS

from piggyback.data.splits import Sample, SourceSplits
from piggyback.errors import DataError

LIST_SUFFIXES = (".csv", ".tsv", ".txt")


class _Row(NamedTuple):
    path: Path
    label: str
    where: str  # "file:line", for error messages


def find_list_file(folder: Path, stem: str) -> Path | None:
    """`folder/<stem>.csv|tsv|txt` if exactly one exists; several is ambiguous, so an error."""
    found = [folder / f"{stem}{suffix}" for suffix in LIST_SUFFIXES]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise DataError(f"{folder} has several {stem} lists {[p.name for p in found]}: keep one")
    return found[0] if found else None


def read_list_folder(folder: Path) -> SourceSplits:
    """A folder holding `train.*` and optionally `val.*` and `test.*` list files."""
    train = find_list_file(folder, "train")
    if train is None:
        raise DataError(f"{folder} has no train list: expected train.csv, train.tsv or train.txt")
    return read_lists(train, find_list_file(folder, "val"), find_list_file(folder, "test"))


def read_lists(train: Path, val: Path | None = None, test: Path | None = None) -> SourceSplits:
    """Read list files; class names and label kind (index or name) are decided by train."""
    train_rows = _read_rows(train)
    class_names, to_index = _label_scheme(train_rows)
    splits = {name: path for name, path in (("val", val), ("test", test)) if path is not None}
    labelled = {
        name: [Sample(row.path, to_index(row, train)) for row in _read_rows(path)]
        for name, path in splits.items()
    }
    return SourceSplits(
        train=[Sample(row.path, to_index(row, train)) for row in train_rows],
        class_names=class_names,
        val=labelled.get("val"),
        test=labelled.get("test"),
    )


def _label_scheme(rows: list[_Row]) -> tuple[list[str], Callable[[_Row, Path], int]]:
    """Class names and a row -> index function: indices when every train label is a number."""
    numeric = all(_is_index(row.label) for row in rows)
    if numeric:
        class_names = [str(i) for i in range(max(int(row.label) for row in rows) + 1)]
    else:
        class_names = sorted({row.label for row in rows})
    index_of = {name: i for i, name in enumerate(class_names)}

    def to_index(row: _Row, train: Path) -> int:
        key = str(int(row.label)) if numeric and _is_index(row.label) else row.label  # "07" is 7
        if key not in index_of:
            raise DataError(
                f"{row.where}: label {row.label!r} is not one of the classes of {train} "
                f"({_preview(class_names)})"
            )
        return index_of[key]

    return class_names, to_index


def _read_rows(path: Path) -> list[_Row]:
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read list file {path}: {error}") from error
    delimiter = _delimiter(path, lines)
    rows: list[_Row] = []
    first = True
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = _split(line, delimiter)
        if len(fields) != 2 or not all(fields):
            expected = f"path{delimiter or ' '}label"
            raise DataError(f"{path}:{lineno}: expected `{expected}`, got {line!r}")
        if not (first and _is_header(fields, path.parent)):
            rows.append(_Row(path.parent / fields[0], fields[1], f"{path}:{lineno}"))
        first = False
    if not rows:
        raise DataError(f"list file {path} lists no images")
    return rows


def _delimiter(path: Path, lines: list[str]) -> str | None:
    """`,` for .csv, tab for .tsv; for .txt whatever the first line uses (None: whitespace)."""
    if path.suffix == ".csv":
        return ","
    if path.suffix == ".tsv":
        return "\t"
    first = next((line for line in lines if line.strip()), "")
    return next((d for d in ("\t", ",") if d in first), None)


def _split(line: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return line.rsplit(maxsplit=1)  # the label is last, so paths may hold spaces
    return [field.strip() for field in next(csv.reader([line], delimiter=delimiter))]


def _is_header(fields: list[str], folder: Path) -> bool:
    """A first line like `path,label`: its path is neither an image name nor an existing file."""
    name = fields[0]
    return not name.lower().endswith(IMG_EXTENSIONS) and not (folder / name).exists()


def _is_index(label: str) -> bool:
    return label.isascii() and label.isdigit()


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
