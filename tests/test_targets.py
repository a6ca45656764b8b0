"""What gets masked, what is a norm, what is reported, and which module is the head."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm.layers
import timm.models.nfnet
import torch
import torchvision
from conftest import TinyCNN
from torch import nn

from piggyback import PiggybackConfig, PiggybackModel, UnsupportedModelError, register_norm_type
from piggyback.norms import _registered, is_norm


def wrap(backbone: nn.Module, config: PiggybackConfig | None = None) -> PiggybackModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmasked tensors are reported; asserted where it matters
        return PiggybackModel(backbone, config)


def outputs_with_mask(model: PiggybackModel, images: torch.Tensor, name: str, on: bool):
    """Outputs of the active task with every score of target `name` switched on or off."""
    with torch.no_grad():
        model.task().scores[name].fill_(1.0 if on else -1.0)
        return model(images)


# -- norms by type ------------------------------------------------------------------------------


class WeightNormConv2d(nn.Module):
    """A user's convolution whose class name says "Norm": its weight must be masked or reported."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight / self.weight.norm(), padding=1)


class NormalizedConv2d(nn.Conv2d):
    """An nn.Conv2d subclass named like a norm: a convolution to mask, never a per-task norm."""


class MyRMSNorm(nn.Module):
    """A hand-written norm deriving from no torch norm: known only once registered."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * self.scale[:, None, None]


class Sandwich(nn.Module):
    """stem -> middle -> pool -> fc, with any middle module."""

    def __init__(self, middle: nn.Module, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.middle = middle
        self.fc = nn.Linear(channels, 4)

    def forward(self, x):
        return self.fc(self.middle(self.stem(x)).mean((2, 3)))


def test_a_module_named_norm_with_a_conv_weight_is_reported_not_taken_for_a_norm():
    model = wrap(Sandwich(WeightNormConv2d()))
    assert not is_norm(model.backbone.middle)
    assert model.unmasked == ["middle.weight"] and model.norm_names == []


def test_a_conv_subclass_named_norm_is_masked_and_its_mask_acts_with_task_norms(images):
    torch.manual_seed(0)
    model = wrap(Sandwich(NormalizedConv2d(8, 8, 3, padding=1)), PiggybackConfig(task_norms=True))
    assert "middle.weight" in {t.name for t in model.targets}
    assert not any(n.startswith("middle.") for n in model.norm_names)
    model.add_task("t", 3, seed=0)
    model.set_task("t")
    model.eval()
    on = outputs_with_mask(model, images, "middle.weight", on=True)
    assert not torch.equal(on, outputs_with_mask(model, images, "middle.weight", on=False))


def test_timm_norm_free_block_is_not_a_norm_and_keeps_training_mode(images):
    block = timm.models.nfnet.NormFreeBlock(8, 8, act_layer=nn.ReLU, drop_path_rate=0.5)
    model = wrap(Sandwich(block))
    assert not is_norm(block)
    assert not any(n.startswith("middle.") for n in model.norm_names)
    model.add_task("t", 3)
    model.set_task("t")
    model.train()
    assert block.training and block.drop_path.training  # DropPath trains
    assert {"middle.conv1.weight", "middle.conv3.weight"} <= {t.name for t in model.targets}


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm2d(8),
        nn.GroupNorm(2, 8),
        nn.InstanceNorm2d(8, affine=True),
        timm.layers.BatchNormAct2d(8),
        timm.layers.GroupNormAct(8, num_groups=2),
        timm.layers.LayerNorm2d(8),
        timm.layers.RmsNorm2d(8),
        timm.layers.EvoNorm2dS0(8),
        timm.layers.FilterResponseNormAct2d(8),
        timm.layers.FrozenBatchNormAct2d(8),
        torchvision.ops.misc.FrozenBatchNorm2d(8),
    ],
    ids=lambda m: type(m).__name__,
)
def test_torch_timm_and_torchvision_norms_are_recognised_by_type(norm):
    model = wrap(Sandwich(norm), PiggybackConfig(task_norms=True))
    assert is_norm(norm)
    own = [n for n, _ in norm.named_parameters()] + [n for n, _ in norm.named_buffers()]
    assert set(model.norm_names) == {f"middle.{n}" for n in own}
    assert not any(n.startswith("middle.") for n in model.unmasked)


def test_register_norm_type_makes_a_user_norm_a_norm(images):
    torch.manual_seed(0)
    backbone = Sandwich(MyRMSNorm(8))
    with pytest.warns(UserWarning, match=r"middle\.scale"):
        assert PiggybackModel(copy.deepcopy(backbone)).unmasked == ["middle.scale"]
    register_norm_type(MyRMSNorm)
    try:
        model = wrap(backbone, PiggybackConfig(task_norms=True))
        assert model.norm_names == ["middle.scale"] and model.unmasked == []
        model.add_task("t", 3, seed=0)
        assert [n for n, _ in model.task("t").norms.items()] == ["middle.scale"]
    finally:
        _registered.remove(MyRMSNorm)
    with pytest.raises(TypeError, match=r"nn\.Module classes"):
        register_norm_type("MyRMSNorm")


# -- parametrized weights -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parametrize", "fix"),
    [
        (nn.utils.parametrizations.weight_norm, "remove_parametrizations"),
        (nn.utils.parametrizations.spectral_norm, "remove_parametrizations"),
        (nn.utils.weight_norm, "remove_weight_norm"),
        (nn.utils.spectral_norm, "remove_spectral_norm"),
    ],
    ids=["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"],
)
def test_parametrized_weights_are_refused_at_wrap_time_with_the_fix(parametrize, fix):
    def parametrized() -> TinyCNN:
        model = TinyCNN().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
            parametrize(model.grouped)
        return model

    with pytest.raises(UnsupportedModelError, match=rf"\['grouped\.weight'\].*{fix}\("):
        PiggybackModel(parametrized())
    wrap(parametrized(), PiggybackConfig(exclude=("grouped",)))  # or left out on purpose


def test_a_parametrization_baked_in_as_the_message_says_wraps_exactly(images):
    torch.manual_seed(0)
    backbone = TinyCNN().eval()
    nn.utils.parametrizations.weight_norm(backbone.grouped)
    with torch.no_grad():
        expected = backbone(images)
    nn.utils.parametrize.remove_parametrizations(backbone.get_submodule("grouped"), "weight")
    model = wrap(backbone)
    model.add_task("same")
    model.set_task("same")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), expected)


# -- CondConv2d and one-dimensional weights -----------------------------------------------------


class CondConvNet(nn.Module):
    """timm's CondConv2d (per-sample mixture of expert kernels), routed as in efficientnet_cc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.routing = nn.Linear(8, 4)
        self.cond = timm.layers.CondConv2d(8, 8, 3, padding=1, num_experts=4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        routing = torch.sigmoid(self.routing(x.mean((2, 3))))
        return self.fc(self.cond(x, routing).mean((2, 3)))


def test_condconv_expert_kernels_are_masked_exactly(images):
    torch.manual_seed(0)
    backbone = CondConvNet().eval()
    reference = copy.deepcopy(backbone)
    model = wrap(backbone)
    assert "cond.weight" in {t.name for t in model.targets} and model.unmasked == []
    model.add_task("t")
    model.set_task("t")
    model.eval()
    mask = torch.rand(4, 8 * 8 * 9, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        model.task().scores["cond.weight"].copy_(torch.where(mask, 1.0, -1.0))
        reference.cond.weight.mul_(mask)
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)


def test_transposed_convolution_weights_are_masked_exactly(images):
    torch.manual_seed(0)
    backbone = Sandwich(nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)).eval()
    reference = copy.deepcopy(backbone)
    model = wrap(backbone)
    assert "middle.weight" in {t.name for t in model.targets} and model.unmasked == []
    model.add_task("t")
    model.set_task("t")
    model.eval()
    mask = torch.rand(8, 8, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        model.task().scores["middle.weight"].copy_(torch.where(mask, 1.0, -1.0))
        reference.middle.weight.mul_(mask)
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)


class Scales(nn.Module):
    """Per-channel scales the way real models store them: 1-D, 3-D, and a PReLU slope."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(8))  # ConvNeXt's layer scale
        self.alpha = nn.Parameter(torch.ones(1, 8, 1))  # ResMLP's Affine
        self.act = nn.PReLU(8)

    def forward(self, x):
        return self.act(x * self.gamma[:, None, None] * self.alpha[..., None])


def test_one_dimensional_weights_are_reported_like_the_others():
    with pytest.warns(UserWarning, match=r"3 parameter tensors are not masked"):
        model = PiggybackModel(Sandwich(Scales()))
    assert model.unmasked == ["middle.gamma", "middle.alpha", "middle.act.weight"]


# -- refusals ---------------------------------------------------------------------------------


def test_a_head_that_cannot_be_found_names_the_option():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), Scales())
    with pytest.raises(UnsupportedModelError, match=r"PiggybackConfig\(head='module\.name'\)"):
        wrap(backbone)


class RawAttention(nn.Module):
    """Attention whose projections are raw parameters, not nn.Linear layers."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv_weight = nn.Parameter(torch.randn(3 * dim, dim))

    def forward(self, x):
        q, k, v = (x.flatten(2).transpose(1, 2) @ self.qkv_weight.T).chunk(3, -1)
        out = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        return out.transpose(1, 2).reshape(x.shape)


def test_raw_attention_weights_are_refused_with_what_would_help():
    with pytest.raises(UnsupportedModelError) as error:
        PiggybackModel(Sandwich(RawAttention()))
    message = str(error.value)
    assert "middle.qkv_weight" in message and "exclude=['middle']" in message
    assert "add 'attention'" not in message  # it is in layer_types already
    model = wrap(Sandwich(RawAttention()), PiggybackConfig(exclude=("middle",)))
    assert "middle.qkv_weight" not in {t.name for t in model.targets}
