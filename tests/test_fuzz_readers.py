"""Fuzzing the readers: a damaged file loads to exactly the original or is refused, nothing else.

Random bit flips, overwritten and copied byte runs, truncations and splices with another valid
file of the same kind are applied to a task file, a training checkpoint and a model index
(`piggyback_config.json`). Reading the result must either give back exactly what was written or
raise a `PiggybackError` (the CLI's one-line refusal), never another exception and never a
changed model; a refused task file leaves the model it was loaded into untouched.

Damage to the tensor bytes and damage to the metadata (the safetensors header, the index) are
separate properties: the first holds with a checksum over the tensors, the second needs the
checksum over the metadata too (issue 9, item 1), and index entries checked against their
directory and files (item 2).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_model import train_steps
from test_serialization import assert_unchanged, make_model, model_snapshot

from piggyback import PiggybackConfig, PiggybackError, PiggybackModel, model_dir, taskfile
from piggyback.training.checkpoint import RunState, read_checkpoint, restore_checkpoint
from piggyback.training.checkpoint import save_checkpoint as write_checkpoint
from piggyback.training.optim import build_optimizer, build_scheduler
from piggyback.training.recipe import TrainConfig

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples in every run: CI stays deterministic
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# -- damage ---------------------------------------------------------------------------------


@st.composite
def damaged(
    draw, original: bytes, other: bytes, span: tuple[int, int], *, truncations: bool
) -> bytes:
    """`original` after 1 to 3 edits: bit flips, runs of random bytes or of the file's own bytes
    written over it, splices with `other` (the rest of the file taken from it), and truncations
    if `truncations`. Edits and splice points lie in `span` = (start, end), so tests can aim at
    the tensor bytes or the metadata."""
    data = bytearray(original)
    start, end = span
    kinds = ["flip", "overwrite", "copy", "splice"] + (["truncate"] if truncations else [])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        stop = min(end, len(data))
        if kind == "truncate" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        if kind == "truncate" or stop <= start:
            continue
        at = draw(st.integers(start, stop - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "splice":
            data = data[:at] + other[at:]
        else:
            if kind == "overwrite":
                run = draw(st.binary(min_size=1, max_size=16))
            else:  # a copy of bytes from elsewhere in the file
                source = draw(st.integers(0, len(data) - 1))
                run = data[source : source + draw(st.integers(1, 64))]
            data[at : at + len(run)] = run[: stop - at]
    return bytes(data)


def safetensors_data_start(data: bytes) -> int:
    """Where the tensor bytes begin: after the 8-byte header length and the JSON header."""
    return 8 + struct.unpack("<Q", data[:8])[0]


@dataclass(frozen=True)
class Reader:
    """One kind of file: two valid examples, a loader, and what loading each gives."""

    original: bytes = field(repr=False)
    other: bytes = field(repr=False)  # another valid file of the same kind, for splices
    load: Callable[[Path], Any]  # a file's path -> a comparable value; may raise
    expected: Any = field(repr=False)
    other_expected: Any = field(repr=False)

    def check(self, data: bytes) -> None:
        """The property: `data` loads to exactly `expected` or raises a PiggybackError.

        (A splice whose two parts agree with `other` up to the cut gives back `other` itself,
        byte for byte: that one loads as `other` does.)
        """
        expected = self.other_expected if data == self.other else self.expected
        with tempfile.TemporaryDirectory() as folder:
            try:
                found = self.load(self.write(Path(folder), data))
            except PiggybackError:
                return
        assert same(found, expected), "damaged file loaded to something else"

    def write(self, folder: Path, data: bytes) -> Path:
        path = folder / "file"
        path.write_bytes(data)
        return path


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts / lists of tensors and JSON values (dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# -- task files -----------------------------------------------------------------------------


def trained_task(seed: int) -> PiggybackModel:
    """TinyCNN with task "t" (3 classes, names, info) trained a few steps from `seed`."""
    model = make_model()
    model.add_task("t", 3, seed=seed, class_names=["cat", "dog", "bird"])
    model.set_task("t")
    train_steps(model, IMAGES)
    model.task("t").metadata.preprocess = {"image_size": 16, "mean": [0.5] * 3, "std": [0.2] * 3}
    return model


def task_contents(model: PiggybackModel, name: str) -> dict[str, Any]:
    """Everything a task file sets in a model: its name, metadata and tensors."""
    tensors = taskfile.task_tensors(model, name)
    return {"name": name, "meta": taskfile.task_metadata(model, name, tensors), "tensors": tensors}


def load_task_into_a_model(path: Path) -> dict[str, Any]:
    model = make_model()
    model.add_task("existing", 2, seed=0)
    before = model_snapshot(model)
    try:
        name = model.load_task(path)
    except PiggybackError:
        assert_unchanged(model, before)  # refused before anything changed
        raise
    return task_contents(model, name)


@cache
def task_reader() -> Reader:
    with tempfile.TemporaryDirectory() as folder:
        model, other_model = trained_task(seed=0), trained_task(seed=1)
        original = model.save_task(Path(folder) / "a.safetensors", "t").read_bytes()
        other = other_model.save_task(Path(folder) / "b.safetensors", "t").read_bytes()
    return Reader(
        original,
        other,
        load_task_into_a_model,
        task_contents(model, "t"),
        task_contents(other_model, "t"),
    )


# -- checkpoints ----------------------------------------------------------------------------


def run_config() -> TrainConfig:
    return TrainConfig(data="data", task="t", epochs=4, threshold=5e-3).resolve()


def run_parts(model: PiggybackModel):
    config = run_config()
    optimizer = build_optimizer(model, config)
    return optimizer, build_scheduler(optimizer, config), torch.amp.GradScaler("cpu", enabled=False)


def checkpoint_path(seed: int, folder: Path) -> Path:
    """A checkpoint after one epoch of task "t": Adam moments, a schedule step, a best task."""
    model = trained_task(seed)
    optimizer, scheduler, scaler = run_parts(model)
    loss = model(IMAGES).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    tensors = taskfile.task_tensors(model, "t")
    best = (taskfile.task_metadata(model, "t", tensors), tensors)
    run = RunState(1, [{"epoch": 1, "val_top1": 0.5}], {"epoch": 1, "val_top1": 0.5}, best)
    path = folder / f"checkpoint-{seed}.safetensors"
    write_checkpoint(path, model, "t", optimizer, scheduler, scaler, run, run_config().to_dict())
    return path


def resume_from(path: Path) -> dict[str, Any]:
    """What `piggyback train --resume` does with a checkpoint: read, check settings, restore."""
    meta, tensors = read_checkpoint(path)
    TrainConfig.from_dict(meta["config"])
    model = make_model()
    model.add_task("t", 3, seed=5, class_names=["cat", "dog", "bird"])
    restore_checkpoint(meta, tensors, model, *run_parts(model))
    return {"meta": meta, "tensors": tensors}


@cache
def checkpoint_reader() -> Reader:
    with tempfile.TemporaryDirectory() as folder:
        paths = [checkpoint_path(seed, Path(folder)) for seed in (0, 1)]
        contents = [path.read_bytes() for path in paths]
        return Reader(*contents, resume_from, *(resume_from(path) for path in paths))


# -- model indexes --------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexReader(Reader):
    """The index of a model directory holding tasks "t" and "u"; the task files stay intact."""

    directory: Path = Path()  # the original's

    def write(self, folder: Path, data: bytes) -> Path:
        shutil.copytree(self.directory, folder / "model")
        (folder / "model" / model_dir.CONFIG_NAME).write_bytes(data)
        return folder / "model"


def directory_contents(model: PiggybackModel) -> dict[str, Any]:
    return {
        "config": model.config.to_dict(),
        "spec": model.backbone_spec,
        "tasks": {name: task_contents(model, name) for name in model.tasks},
    }


def load_directory(directory: Path) -> dict[str, Any]:
    backbone = make_model().unload()  # the same weights, rebuilt
    return directory_contents(PiggybackModel.from_pretrained(directory, backbone))


@cache
def index_reader(folder: Path) -> IndexReader:
    model = trained_task(seed=0)
    model.add_task("u", 4, seed=2, class_names=["a", "b", "c", "d"])
    model.backbone_spec = {"name": "tiny-cnn", "source": "tests"}
    model.save_pretrained(folder / "a")
    # Another valid index, different from its first lines on (so that splices mix the two):
    # other mask settings (an initial score that loading does not depend on), one task only.
    other_model = make_model(PiggybackConfig(init_value=0.02))
    other_model.add_task("u", 4, seed=2, class_names=["a", "b", "c", "d"])
    other_model.save_pretrained(folder / "b")
    original = (folder / "a" / model_dir.CONFIG_NAME).read_bytes()
    other = (folder / "b" / model_dir.CONFIG_NAME).read_bytes()
    reader = IndexReader(
        original, other, load_directory, load_directory(folder / "a"), None, folder / "a"
    )
    with tempfile.TemporaryDirectory() as scratch:  # `other` put into the original's directory
        other_expected = reader.load(reader.write(Path(scratch), other))
    return replace(reader, other_expected=other_expected)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> IndexReader:
    return index_reader(tmp_path_factory.mktemp("index"))


# -- the properties -------------------------------------------------------------------------


def tensor_damage(reader: Reader) -> st.SearchStrategy[bytes]:
    """Damage to the tensor bytes of a safetensors file (both files' headers are the same size),
    or a truncation anywhere."""
    start = safetensors_data_start(reader.original)
    assert start == safetensors_data_start(reader.other)
    span = (start, len(reader.original))
    return damaged(reader.original, reader.other, span, truncations=True)


def metadata_damage(reader: Reader) -> st.SearchStrategy[bytes]:
    """Damage to the JSON header of a safetensors file; the tensor bytes are left intact."""
    span = (8, safetensors_data_start(reader.original))
    return damaged(reader.original, reader.other, span, truncations=False)


def index_damage(reader: Reader) -> st.SearchStrategy[bytes]:
    span = (0, len(reader.original))
    return damaged(reader.original, reader.other, span, truncations=False)


@FUZZ
@given(st.data())
def test_a_task_file_with_damaged_tensor_bytes_loads_exactly_or_is_refused(data):
    reader = task_reader()
    reader.check(data.draw(tensor_damage(reader)))


@FUZZ
@given(st.data())
def test_a_task_file_with_damaged_metadata_loads_exactly_or_is_refused(data):
    reader = task_reader()
    reader.check(data.draw(metadata_damage(reader)))


@FUZZ
@given(st.data())
def test_a_checkpoint_with_damaged_tensor_bytes_resumes_exactly_or_is_refused(data):
    reader = checkpoint_reader()
    reader.check(data.draw(tensor_damage(reader)))


@FUZZ
@given(st.data())
def test_a_checkpoint_with_damaged_metadata_resumes_exactly_or_is_refused(data):
    reader = checkpoint_reader()
    reader.check(data.draw(metadata_damage(reader)))


@FUZZ
@given(st.data())
def test_a_truncated_model_index_loads_exactly_or_is_refused(index, data):
    cut = data.draw(st.integers(0, len(index.original) - 1))
    index.check(index.original[:cut])


@FUZZ
@given(st.data())
def test_a_model_index_damaged_anywhere_loads_exactly_or_is_refused(index, data):
    index.check(data.draw(index_damage(index)))


def test_the_readers_load_their_undamaged_files_exactly(index):
    for reader in (task_reader(), checkpoint_reader(), index):
        reader.check(reader.original)
        with tempfile.TemporaryDirectory() as folder:
            assert same(reader.load(reader.write(Path(folder), reader.original)), reader.expected)
    assert json.loads(index.original)["tasks"].keys() == {"t", "u"}
