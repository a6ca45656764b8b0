"""Mask kinds and methods are strategy objects: a new one is one class plus its registration."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN, randomize_norms
from test_model import train_steps

from piggyback import PiggybackConfig, PiggybackModel
from piggyback.mask_kinds import MaskKind, register_mask_kind, unregister_mask_kind
from piggyback.methods import TaskMethod, get_method, register_method, unregister_method
from piggyback.training.recipe import TrainConfig


class _TopHalf(torch.autograd.Function):
    """1 for the largest half of the scores, 0 elsewhere; straight-through gradient."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        cut = scores.flatten().kthvalue(max(1, scores.numel() // 2)).values
        return (scores > cut).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class TopHalfKind(MaskKind):
    """A SupSup-style top-k mask (k = 50%): the toy kind a user would write."""

    name = "top-half"
    code_bits = 1
    num_codes = 2

    def mask(self, scores, config):
        return _TopHalf.apply(scores)

    def to_codes(self, mask):
        return (mask > 0).to(torch.uint8)

    def from_codes(self, codes, dtype):
        return codes.to(dtype)

    def check(self, config):  # no threshold involved: any init works
        pass


@pytest.fixture
def top_half():
    kind = register_mask_kind(TopHalfKind())
    yield kind
    unregister_mask_kind(kind.name)


def test_a_mask_kind_registered_in_a_test_trains_saves_and_loads(top_half, images, tmp_path):
    torch.manual_seed(0)
    backbone = randomize_norms(TinyCNN()).eval()
    config = PiggybackConfig(mask_kind="top-half", init="uniform")
    model = PiggybackModel(backbone, config)
    model.add_task("t", 3, seed=0)
    model.set_task("t")
    before = {n: s.detach().clone() for n, s in model.task("t").scores.items()}
    train_steps(model, images)
    assert any(not torch.equal(s, before[n]) for n, s in model.task("t").scores.items())
    assert 0.45 < model.overall_density("t") < 0.55  # its own rule, not the threshold
    model.eval()
    with torch.no_grad():
        expected = model(images)
    model.save_pretrained(tmp_path / "model")
    restored = PiggybackModel.from_pretrained(tmp_path / "model", randomize_norms(_same(0)).eval())
    assert restored.config.kind is top_half
    restored.set_task("t")
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(images), expected)
    assert restored.task("t").is_packed  # stored and held at its 1 code bit per weight


def _same(seed: int) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


def test_an_unknown_mask_kind_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown mask_kind 'top-half'.*binary.*ternary"):
        PiggybackConfig(mask_kind="top-half")


class HeadAndBiasMethod(TaskMethod):
    """A toy method: the head plus the recipe defaults of its own."""

    name = "toy-head"
    default_optimizer = "adam"
    default_lr = 3e-3
    decays_lr = False


def test_a_method_registered_in_a_test_brings_its_own_recipe_defaults(images, tmp_path):
    method = register_method(HeadAndBiasMethod())
    try:
        config = TrainConfig(data="somewhere", method="toy-head", epochs=4).resolve()
        assert (config.optimizer, config.lr, config.lr_decay_epochs) == ("adam", 3e-3, [])
        torch.manual_seed(0)
        model = PiggybackModel(randomize_norms(TinyCNN()).eval())
        model.add_task("t", 3, method="toy-head", seed=0)
        assert model.task("t").method is get_method("toy-head") is method
        model.save_pretrained(tmp_path / "m")
        torch.manual_seed(0)
        restored = PiggybackModel.from_pretrained(tmp_path / "m", randomize_norms(TinyCNN()))
        assert restored.task("t").method_name == "toy-head"
    finally:
        unregister_method("toy-head")
