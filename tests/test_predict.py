"""Predicting image files: finding them, preprocessing them as trained, reading the scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import resize_of
from PIL import Image
from test_export import CLASSES, PREPROCESS, trained_model

from piggyback.data import UnreadableImageWarning
from piggyback.errors import DataError
from piggyback.predict import (
    Prediction,
    collect_images,
    eval_transform,
    predict,
    resolve_preprocess,
)

LITE0_SPEC = {"name": "efficientnet_lite0", "source": "piggyback-offline", "pretrained": True}


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> Path:
    """A random RGB image of `size` (width, height), saved in the format of its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """b.png, a.jpg, sub/c.jpeg, sub/deeper/d.PNG, and files that are not images."""
    root = tmp_path / "images"
    write_image(root / "b.png", 1)
    write_image(root / "a.jpg", 2, (30, 18))
    write_image(root / "sub" / "c.jpeg", 3)
    write_image(root / "sub" / "deeper" / "d.PNG", 4)
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".hidden" / "e.png", 5)
    return root


def test_collect_images_finds_images_recursively_sorted(image_folder):
    found = collect_images([image_folder])
    names = [p.relative_to(image_folder).as_posix() for p in found]
    assert names == ["a.jpg", "b.png", "sub/c.jpeg", "sub/deeper/d.PNG"]
    assert collect_images(str(image_folder)) == found  # one path, not its characters
    # Files as given, folders expanded in place, duplicates once.
    extra = image_folder / "sub" / "c.jpeg"
    assert collect_images([extra, image_folder]) == [extra, *[p for p in found if p != extra]]


def test_collect_images_names_what_is_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="nothing-here"):
        collect_images([tmp_path / "nothing-here"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(DataError, match=r"no images found in .*empty"):
        collect_images([tmp_path / "empty"])


def test_predictions_are_sorted_probabilities_with_class_names(image_folder):
    model = trained_model()
    predictions = predict(model, "pets", [image_folder], top_k=2, batch_size=3)
    assert [p.path for p in predictions] == collect_images([image_folder])
    for prediction in predictions:
        assert isinstance(prediction, Prediction)
        assert len(prediction.top) == 2
        names = [name for name, _ in prediction.top]
        probs = [prob for _, prob in prediction.top]
        assert set(names) <= set(CLASSES)
        assert probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert prediction.label == names[0]
        assert prediction.to_dict()["top"][0] == {"class": names[0], "probability": probs[0]}


def test_predictions_equal_the_models_softmax(image_folder):
    model = trained_model()
    model.set_task("pets")
    model.train()  # predict must not depend on, nor change, the model's mode
    paths = collect_images([image_folder])
    predictions = predict(model, "pets", paths, top_k=10)
    assert model.training
    model.eval()
    transform = eval_transform(model, "pets")
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        probs = model(batch).softmax(1)
    for prediction, row in zip(predictions, probs, strict=True):
        assert len(prediction.top) == 3  # top_k clipped to the number of classes
        assert math.isclose(sum(p for _, p in prediction.top), 1, abs_tol=1e-5)
        for name, prob in prediction.top:
            assert prob == pytest.approx(float(row[CLASSES.index(name)]), abs=1e-6)
    one_by_one = predict(model, "pets", paths, top_k=10, batch_size=1)
    for a, b in zip(predictions, one_by_one, strict=True):
        assert a.path == b.path
        assert dict(a.top) == pytest.approx(dict(b.top), abs=1e-6)


def test_class_names_default_to_indices(image_folder):
    model = trained_model()
    model.task("pets").class_names = None
    predictions = predict(model, "pets", [image_folder / "a.jpg"], top_k=1)
    assert predictions[0].label in {"0", "1", "2"}


def test_unreadable_images_are_skipped_with_a_warning(image_folder):
    model = trained_model()
    broken = image_folder / "broken.jpg"
    broken.write_bytes(b"<html>not found</html>")
    with pytest.warns(UnreadableImageWarning, match=r"broken\.jpg"):
        predictions = predict(model, "pets", [image_folder])
    assert broken not in [p.path for p in predictions]
    assert len(predictions) == 4
    with pytest.raises(DataError, match="none of the 1 images"), pytest.warns(UserWarning):
        predict(model, "pets", [broken])


def test_refuses_bad_arguments(image_folder):
    model = trained_model()
    with pytest.raises(ValueError, match="top_k"):
        predict(model, "pets", [image_folder], top_k=0)
    with pytest.raises(DataError, match=r"missing\.png"):
        predict(model, "pets", [image_folder / "missing.png"])


def test_eval_transform_uses_the_recorded_preprocessing():
    model = trained_model()
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    out = eval_transform(model, "pets")(image)
    assert out.shape == (3, 16, 16)
    expected = (1 - PREPROCESS["mean"][0]) / PREPROCESS["std"][0]
    assert out[0].flatten().tolist() == pytest.approx([expected] * 256, abs=1e-5)
    assert eval_transform(model, "pets", 20)(image).shape == (3, 20, 20)
    # A recorded resize that is not the default 256/224 ratio is kept.
    model.task("pets").metadata.preprocess = PREPROCESS | {"resize_size": 32}
    assert resolve_preprocess(model, "pets")["resize_size"] == 32
    assert resize_of(eval_transform(model, "pets")).size == [32]


def test_preprocessing_falls_back_to_the_backbone_spec():
    model = trained_model()
    model.task("pets").metadata.preprocess = None
    with pytest.raises(DataError, match="unnamed"):
        eval_transform(model, "pets")
    model.backbone_spec = LITE0_SPEC | {"weights": None}  # looked up without building weights
    prep = resolve_preprocess(model, "pets")
    assert prep == {
        "image_size": 224,
        "resize_size": 256,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
    }
    assert resolve_preprocess(model, "pets", image_size=112, mean=[0, 0, 0])["mean"] == [0, 0, 0]
    with pytest.raises(DataError, match="3"):
        resolve_preprocess(model, "pets", std=[1.0])
