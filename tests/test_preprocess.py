"""Preprocessing and devices: defined once, inference-side, from the backbone's own config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import resize_of

from piggyback.backbones import create_backbone
from piggyback.device import Precision, resolve_device
from piggyback.errors import DataError, DeviceError
from piggyback.preprocess import Preprocess

SRC = Path(__file__).resolve().parents[1] / "src"

#: A task file's record as written by every piggyback version so far.
RECORDED = {
    "image_size": 32,
    "resize_size": 37,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
}


def test_inference_modules_do_not_import_training():
    code = (
        "import sys; import piggyback.predict, piggyback.evaluation, piggyback.export, "
        "piggyback.preprocess, piggyback.device; "
        "print(sorted(m for m in sys.modules if m.startswith('piggyback.training')))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("backbone", "image_size", "resize", "interpolation"),
    [
        ("timm:test_efficientnet", 32, 33, "bicubic"),  # crop_pct 0.95: 32 / 0.95 = 33.7
        ("torchvision:resnet50", 224, 232, "bilinear"),  # DEFAULT (V2) weights: 224 / 232
        ("efficientnet_lite0", 224, 256, "bicubic"),  # crop_pct 0.875, the paper's 256 / 224
    ],
)
def test_new_tasks_use_the_backbones_crop_fraction_and_interpolation(
    backbone, image_size, resize, interpolation
):
    config = create_backbone(backbone, pretrained=False).data_config
    found = Preprocess.from_data_config(config, image_size)
    assert (found.image_size, found.resize_size) == (image_size, resize)
    assert found.interpolation == interpolation
    assert found.mean == tuple(config["mean"]) and found.std == tuple(config["std"])


def test_a_recorded_preprocessing_is_honoured_exactly():
    found = Preprocess.from_dict(RECORDED)
    assert found.to_dict() == RECORDED  # not recomputed from today's backbone config
    transform = found.transform()
    assert resize_of(transform).size == [37]
    assert found.resized(64).resize_size == 74  # the recorded ratio, not the backbone's


def test_a_malformed_record_is_refused_with_what_is_wrong():
    with pytest.raises(DataError, match="lacks"):
        Preprocess.from_dict({"image_size": 32})
    with pytest.raises(DataError, match="unknown keys"):
        Preprocess.from_dict(RECORDED | {"crop": 1})
    with pytest.raises(DataError, match="one finite value per RGB channel"):
        Preprocess.from_dict(RECORDED | {"mean": [0.5, float("nan"), 0.5]})


def test_devices_and_precisions_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="precision must be one of"):
        Precision("fp8", torch.device("cpu"))
