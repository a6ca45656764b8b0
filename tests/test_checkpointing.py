"""Gradient checkpointing: recomputation during backward sees the task's masked weights."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TinyCNN
from torch import nn
from torch.utils.checkpoint import checkpoint

from piggyback import PiggybackConfig, PiggybackModel, TaskError


class CheckpointedCNN(TinyCNN):
    """TinyCNN whose convolution block is recomputed during backward when `use` is set."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.use = False
        self.reentrant = reentrant

    def block(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        return torch.relu(self.bn2(self.grouped(self.depthwise(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint(self.block, x, use_reentrant=self.reentrant) if self.use else self.block(x)
        return self.fc(self.pool(x).flatten(1))


def half_off_scores(model: PiggybackModel, task: str) -> None:
    """Scores in [0, 1e-2): about half of them under the 5e-3 threshold (mask off)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, scores in model.task(task).scores.items():
            scores.copy_(torch.rand(scores.shape, generator=generator) * 1e-2)


def score_gradients(model: PiggybackModel, images: torch.Tensor) -> dict[str, torch.Tensor]:
    for _, scores in model.task().scores.items():
        scores.grad = None
    model(images).square().sum().backward()
    return {name: scores.grad.clone() for name, scores in model.task().scores.items()}


@pytest.mark.parametrize("reentrant", [False, True])
def test_score_gradients_with_checkpointing_equal_those_without(reentrant):
    torch.manual_seed(0)
    backbone = CheckpointedCNN(reentrant).eval()
    model = PiggybackModel(backbone)
    model.add_task("t", 3, seed=0)
    model.set_task("t")
    half_off_scores(model, "t")
    images = torch.randn(4, 3, 8, 8, requires_grad=reentrant)  # reentrant needs a grad input
    model.train()
    plain = score_gradients(model, images)
    backbone.use = True
    checkpointed = score_gradients(model, images)
    assert model.mask_density("t")["stem.weight"] < 0.7  # the mask really has zeros
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # After backward the frozen originals are back in place.
    assert model.backbone.stem.weight is model.backbone_tensors()["stem.weight"]


@pytest.mark.slow
def test_timm_resnet18_grad_checkpointing_gives_the_same_score_gradients():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, zero_init_last=False).eval()
    model = PiggybackModel(backbone)
    model.add_task("t", 5, seed=0)
    model.set_task("t")
    half_off_scores(model, "t")
    model.train()
    images = torch.randn(2, 3, 64, 64)
    plain = score_gradients(model, images)
    backbone.set_grad_checkpointing(True)
    checkpointed = score_gradients(model, images)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_originals_are_restored_after_backward_and_weights_stay_frozen():
    torch.manual_seed(0)
    backbone = CheckpointedCNN(False).eval()
    backbone.use = True
    originals = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    model = PiggybackModel(backbone)
    model.add_task("t", 3, seed=0)
    model.set_task("t")
    half_off_scores(model, "t")
    model.train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    for name, param in backbone.named_parameters():
        if name in originals:
            assert isinstance(param, nn.Parameter) and torch.equal(param, originals[name]), name


def test_one_backward_through_two_tasks_with_recomputation_is_refused():
    torch.manual_seed(0)
    backbone = CheckpointedCNN(False).eval()
    backbone.use = True
    model = PiggybackModel(backbone, PiggybackConfig())
    for name in ("a", "b"):
        model.add_task(name, 3, seed=0)
    model.train()
    model.set_task("a")
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    model.set_task("b")
    loss = loss + model(torch.randn(2, 3, 8, 8)).sum()
    with pytest.raises(TaskError, match="backward pass must cover one task"):
        loss.backward()
    # The model is usable afterwards: the slots hold the originals again.
    assert model.backbone.stem.weight is model.backbone_tensors()["stem.weight"]
