"""Real data, real backbone: piggyback training on Flowers-102 with the ImageNet EfficientNet-Lite0
raises validation accuracy above its starting point within a short budget."""

from __future__ import annotations

import pytest
from conftest import require_data

from piggyback.training import TrainConfig, train
from piggyback.training.run import Run

pytestmark = pytest.mark.slow


def test_piggyback_learns_flowers_quickly(tmp_path):
    flowers = require_data("flowers102")
    config = TrainConfig(
        data=str(flowers),
        output=str(tmp_path / "model"),
        task="flowers102",
        epochs=1,
        image_size=64,
        max_train_batches=12,  # 384 of the 1020 training images
        lr_head=1e-3,
        workers=2,
        progress=False,
    ).resolve()
    start = Run(config, tmp_path / "start", tmp_path / "start-run", log=lambda _: None)
    before = start.evaluate(start.loaders.val)["top1"]  # the untrained task, same seed
    result = train(config, log=print)
    assert result.val["top1"] > before + 10, (before, result.val["top1"])
    assert result.test["images"] == 6149
