"""Wrapping the real architectures users reach for (random weights, small inputs) and the real
EfficientNet-Lite0 ImageNet weights on real images."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from conftest import require_data
from PIL import Image
from torch import nn

from piggyback import PiggybackModel
from piggyback.backbones import create_backbone

pytestmark = pytest.mark.slow

# (factory, expected head, input size). Random weights: structure is what is tested here.
ARCHITECTURES = {
    "torchvision:resnet50": (lambda: torchvision.models.resnet50(), "fc", 64),
    "torchvision:vgg16": (lambda: torchvision.models.vgg16(), "classifier.6", 32),
    "torchvision:densenet121": (lambda: torchvision.models.densenet121(), "classifier", 64),
    "torchvision:efficientnet_b0": (torchvision.models.efficientnet_b0, "classifier.1", 64),
    "torchvision:convnext_tiny": (lambda: torchvision.models.convnext_tiny(), "classifier.2", 64),
    "torchvision:vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=64), "heads.head", 64),
    "timm:resnet50": (lambda: timm.create_model("resnet50"), "fc", 64),
    "timm:vgg16": (lambda: timm.create_model("vgg16"), "head.fc", 32),
    "timm:densenet121": (lambda: timm.create_model("densenet121"), "classifier", 64),
    "timm:efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), "classifier", 64),
    "timm:convnext_tiny": (lambda: timm.create_model("convnext_tiny"), "head.fc", 64),
    "timm:vit_small_patch16_224": (
        lambda: timm.create_model("vit_small_patch16_224", img_size=64),
        "head",
        64,
    ),
}


def _masked_layer_count(model: nn.Module, head: str) -> int:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(
        isinstance(m, kinds) and not (n == head or n.startswith(head + "."))
        for n, m in model.named_modules()
    )


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_wraps_real_architectures_exactly(name):
    factory, expected_head, size = ARCHITECTURES[name]
    torch.manual_seed(0)
    original = factory().eval()
    reference = copy.deepcopy(original)
    images = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # position embeddings / class tokens are reported
        model = PiggybackModel(original)
    assert model.head_name == expected_head
    mha = sum(isinstance(m, nn.MultiheadAttention) for m in reference.modules())
    assert len(model.targets) == _masked_layer_count(reference, expected_head) + mha
    model.add_task("same")
    model.add_task("new", 7, seed=0)
    model.eval()
    model.set_task("same")
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
        model.set_task("new")
        out = model(images)
        assert out.shape == (2, 7)
        torch.testing.assert_close(model.merge("new")(images), out)


def _real_images() -> list[Image.Image]:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        images = [Image.open(handle).convert("RGB")]
    try:
        flowers = require_data("flowers102") / "test"
    except pytest.skip.Exception:
        return images
    for folder in sorted(flowers.iterdir())[:6]:
        images.append(Image.open(next(folder.iterdir())).convert("RGB"))
    return images


def test_real_efficientnet_lite0_keeps_its_imagenet_predictions():
    backbone = create_backbone("efficientnet_lite0")
    config = timm.data.resolve_data_config(backbone.data_config)
    transform = timm.data.create_transform(**config)
    batch = torch.stack([transform(image) for image in _real_images()])
    unwrapped = copy.deepcopy(backbone.model).eval()
    model = PiggybackModel(backbone.model, backbone_spec=backbone.spec)
    model.add_task("imagenet")  # the backbone's own ImageNet head, all-ones masks
    model.set_task("imagenet")
    model.eval()
    with torch.no_grad():
        expected = unwrapped(batch)
        found = model(batch)
    assert torch.equal(found.argmax(1), expected.argmax(1))
    assert torch.equal(found, expected)
    assert 652 in expected[0].topk(5).indices.tolist()  # grace_hopper: military uniform
