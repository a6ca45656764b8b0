"""A saved two-task model directory on timm's tiny `test_efficientnet`, and image helpers, for
the server tests (imported by them; fixtures that need pytest's machinery are in the tests)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from piggyback import PiggybackModel
from piggyback.backbones import create_backbone
from piggyback.images import decode_image
from piggyback.preprocess import Preprocess
from piggyback.route_fit import fit_routing_profile

#: task -> class names of the saved model.
TASKS = {"colours": ["red", "green", "blue"], "digits": ["zero", "one", "two", "three"]}
IMAGE_SIZE = 32


def save_two_task_model(directory: Path, weights: Path) -> Path:
    """Two tasks with their own heads and masks (scores drawn around the threshold)."""
    backbone = create_backbone("timm:test_efficientnet", weights=weights)
    model = PiggybackModel(backbone.model, backbone_spec=backbone.spec)
    for seed, (name, classes) in enumerate(TASKS.items()):
        state = model.add_task(name, len(classes), class_names=classes, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for score in state.parameters():  # about 80% of the weights on, differently per task
                score.copy_(torch.rand(score.shape, generator=generator) * 6e-3 + 4e-3)
        state.metadata.preprocess = Preprocess.from_data_config(
            backbone.data_config, IMAGE_SIZE
        ).to_dict()
        # Routing prototypes for "auto", as training computes them (here from random images).
        images = torch.randn(2 * len(classes), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        labels = torch.arange(len(classes)).repeat(2)
        state.routing = fit_routing_profile(model, [(images, labels)], state.metadata.preprocess)
    model.save_pretrained(directory)
    return directory


def image_bytes(seed: int, size: tuple[int, int] = (40, 36), fmt: str = "PNG") -> bytes:
    """A random RGB image, encoded (PNG by default)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def open_image(data: bytes) -> Image.Image:
    return decode_image(data)
