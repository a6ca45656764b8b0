"""Every byte that is read is checked: metadata flips in task files, checkpoints and indexes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, randomize_norms
from test_model import add_trained_task
from test_training import interrupt_after_first_epoch, tiny_config

from piggyback import PiggybackModel, TaskFileError
from piggyback.training import train
from piggyback.training.checkpoint import read_checkpoint


def fresh_model() -> PiggybackModel:
    torch.manual_seed(0)
    return PiggybackModel(randomize_norms(TinyCNN()).eval())


def flip_bit(path: Path, needle: bytes, offset: int, bit: int) -> None:
    """Flip one bit of byte `offset` of the first `needle` (a single-bit storage error)."""
    data = bytearray(path.read_bytes())
    data[data.index(needle) + offset] ^= bit
    path.write_bytes(bytes(data))


@pytest.fixture
def task_path(tmp_path, images) -> Path:
    model = add_trained_task(fresh_model(), images)
    model.task("t").class_names = ["cat", "dog", "emu"]
    model.task("t").metadata.preprocess = {"image_size": 128, "mean": [0.5, 0.5, 0.5]}
    return model.save_task(tmp_path / "t.safetensors")


@pytest.mark.parametrize(
    ("needle", "offset", "bit"),
    [
        # The metadata is a JSON string inside the safetensors header: its quotes are escaped.
        (b'\\"cat\\"', 3, 0b10),  # a class name: cat -> cct
        (b'image_size\\": 128', 14, 0b10),  # the image size: 128 -> 328
        (b"0.5", 2, 0b100),  # a normalisation mean: 0.5 -> 0.1
        (b'task\\": \\"t', 10, 0b1000000),  # the task name: t -> 4
    ],
)
def test_a_flipped_bit_in_task_file_metadata_is_refused(task_path, needle, offset, bit):
    flip_bit(task_path, needle, offset, bit)
    model = fresh_model()
    with pytest.raises(TaskFileError, match="is corrupted"):
        model.load_task(task_path)
    assert model.tasks == []


def test_a_flipped_bit_in_checkpoint_metadata_is_refused(tiny_data, tiny_weights, tmp_path):
    config = tiny_config(tiny_data, tiny_weights, tmp_path / "model", lr_head=0.25)
    with pytest.raises(KeyboardInterrupt):
        train(config, log=interrupt_after_first_epoch)
    path = tmp_path / "model" / "runs" / "data" / "checkpoint.safetensors"
    flip_bit(path, b'lr_head\\": 0.25', 14, 0b100)  # 0.25 -> 0.21: another run, silently, before
    with pytest.raises(TaskFileError, match="is corrupted"):
        read_checkpoint(path)


def test_a_flipped_bit_in_the_model_index_is_refused(tmp_path, images):
    add_trained_task(fresh_model(), images).save_pretrained(tmp_path / "m")
    index = tmp_path / "m" / "piggyback_config.json"
    flip_bit(index, b'"threshold": 0.005', 17, 0b100)  # 0.005 -> 0.001
    with pytest.raises(TaskFileError, match="is corrupted"):
        PiggybackModel.from_pretrained(tmp_path / "m", fresh_model().unload())
