"""Predictor arguments a caller can get wrong: tensors of another dtype or channel count, a
single image given to `logits`, `top_k` and `tasks` of the wrong type."""

from __future__ import annotations

import pytest
import torch
from test_predictor import batch, tasks_model

from piggyback import Predictor, TaskError
from piggyback.errors import DataError


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(tasks_model(("a",)))


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 3, 16, 16)])
def test_an_unconverted_uint8_tensor_is_refused_with_what_to_do(predictor, shape):
    """What torchvision.io.read_image returns: 0-255 pixels, neither scaled nor normalized."""
    pixels = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(DataError, match=r"torch.uint8.*preprocess.*PIL image"):
        predictor.predict(pixels, "a")
    with pytest.raises(DataError, match=r"torch.uint8.*preprocess.*PIL image"):
        predictor.logits(pixels.reshape(-1, 3, 16, 16), "a")


def test_float64_and_float16_tensors_are_answered_as_float32(predictor):
    images = batch(0, count=2)
    expected = predictor.predict(images, "a", top_k=3)
    assert predictor.predict(images.double(), "a", top_k=3) == expected
    assert torch.equal(predictor.logits(images.double(), "a"), predictor.logits(images, "a"))
    assert len(predictor.predict(images.half(), "a")) == 2


def test_a_tensor_with_another_channel_count_than_the_task_takes_is_refused(predictor):
    with pytest.raises(DataError, match=r"1 channel\(s\), task 'a' takes 3"):
        predictor.predict(torch.zeros(1, 16, 16), "a")


def test_logits_of_a_single_chw_image_is_refused_with_the_shape_it_needs(predictor):
    with pytest.raises(DataError, match=r"NCHW batch.*got shape \(3, 16, 16\).*\[None\]"):
        predictor.logits(torch.zeros(3, 16, 16), "a")


@pytest.mark.parametrize("top_k", [2.5, True, "3", None])
def test_a_top_k_that_is_not_a_whole_number_is_refused(predictor, top_k):
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1"):
        predictor.predict(batch(0, count=1), "a", top_k=top_k)


@pytest.mark.parametrize("tasks", [None, 3, [None]])
def test_tasks_that_are_not_names_are_refused(predictor, tasks):
    with pytest.raises(TaskError, match="tasks must be a task name, 'auto' or a list of them"):
        predictor.predict(batch(0, count=1), tasks)


def test_images_as_a_memoryview_are_bytes_and_none_is_refused(predictor):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buffer, "PNG")
    from_bytes = predictor.predict(buffer.getvalue(), "a")
    assert predictor.predict(memoryview(buffer.getvalue()), "a") == from_bytes
    assert predictor.predict([memoryview(buffer.getvalue())], "a") == from_bytes
    for bad in (None, 5):
        with pytest.raises(DataError, match="cannot read images from a"):
            predictor.predict(bad, "a")


def test_numpy_numbers_are_taken_where_python_numbers_are(predictor):
    import numpy as np

    from piggyback import PiggybackConfig

    images = batch(0, count=2)
    assert predictor.predict(images, "a", top_k=np.int64(2)) == predictor.predict(
        images, "a", top_k=2
    )
    assert PiggybackConfig(threshold=np.float32(5e-3)).threshold == np.float32(5e-3)
