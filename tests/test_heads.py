"""Heads: found where the model declares them, replaced per task, several when it has several."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from piggyback import PiggybackModel
from piggyback.heads import HeadGroup, TaskHeads


def wrap(backbone: nn.Module) -> PiggybackModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # position embeddings / class tokens are reported
        return PiggybackModel(backbone)


def test_squeezenet_conv_head_is_found_and_replaced():
    torch.manual_seed(0)
    model = wrap(torchvision.models.squeezenet1_1(num_classes=10).eval())
    assert model.head_names == ["classifier.1"]
    model.add_task("five", 5, seed=0)
    model.set_task("five")
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.fixture
def distilled() -> nn.Module:
    """A one-block distilled DeiT: a class and a distillation token, `head` and `head_dist`."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1).eval()


@pytest.fixture
def small_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_every_declared_head_is_replaced_and_none_is_masked(distilled):
    model = wrap(distilled)
    assert model.head_names == ["head", "head_dist"]
    assert distilled.head.slot == "head" and distilled.head_dist.slot == "head_dist"
    assert isinstance(distilled.head, TaskHeads) and isinstance(distilled.head_dist, TaskHeads)
    assert not [t.name for t in model.targets if t.name.startswith("head")]
    model.add_task("t", 5, seed=0)
    assert isinstance(model.task("t").head, HeadGroup)
    assert model.task("t").head.names() == ["head", "head_dist"]


def test_a_task_keeping_the_backbone_heads_is_exact(distilled, small_images):
    reference = copy.deepcopy(distilled)
    model = wrap(distilled)
    model.add_task("same")
    model.set_task("same")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(small_images), reference(small_images))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_task_heads_are_combined_as_timm_combines_its_own(distilled, small_images, mode):
    """timm averages head and head_dist (unless distilled training is switched on): the task's
    output is what the backbone gives after reset_classifier with the task's heads in place."""
    reference = copy.deepcopy(distilled)
    model = wrap(distilled)
    model.add_task("five", 5, seed=0)
    model.set_task("five")
    getattr(model, mode)()
    reference.reset_classifier(5)
    for name in ["head", "head_dist"]:
        reference.get_submodule(name).load_state_dict(
            model.task("five").head.head(name).state_dict()
        )
    getattr(reference, mode)()
    with torch.no_grad():
        output = model(small_images)
        assert output.shape == (2, 5)
        assert torch.equal(output, reference(small_images))
        assert torch.equal(model.merge("five")(small_images), model.eval()(small_images))


def test_two_head_tasks_train_save_load_and_unload(distilled, small_images, tmp_path):
    reference = copy.deepcopy(distilled)
    model = wrap(distilled)
    model.add_task("five", 5, seed=0)
    model.set_task("five")
    model.train()
    loss = nn.functional.cross_entropy(model(small_images), torch.tensor([0, 4]))
    loss.backward()
    head = model.task("five").head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    model.eval()
    path = model.save_task(tmp_path / "five.safetensors")
    restored = wrap(reference)
    assert restored.load_task(path) == "five"
    restored.set_task("five")
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(small_images), model(small_images))
    backbone = restored.unload()
    assert type(backbone.head) is nn.Linear and type(backbone.head_dist) is nn.Linear


def test_routing_features_bypass_every_head_of_a_two_head_model(distilled, small_images):
    """`backbone_features` (routing, route-fit) on a distilled DeiT: both head slots give way, and
    the features are timm's own pre-logits (the two tokens averaged), not an error."""
    reference = copy.deepcopy(distilled)
    model = wrap(distilled)
    model.add_task("five", 5, seed=0)
    model.eval()
    with torch.no_grad():
        features = model.backbone_features(small_images)
        expected = reference.forward_head(reference.forward_features(small_images), pre_logits=True)
        assert torch.equal(features, expected)
        model.set_task("five")
        assert model(small_images).shape == (2, 5)  # the task heads are back in their slots
