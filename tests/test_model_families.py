"""Representative models of every family piggyback meets, computed for real at tiny sizes.

`test_model_coverage.py` checks the structure piggyback finds in every timm and torchvision
classifier; this runs about 40 of them (small variants, random weights, 32-224 px inputs, batch
2) through what a user does: train with gradients reaching every score, add a task without
touching the first, merge, save and load. Families: plain / depthwise / grouped CNNs, Conv2dSame,
CondConv, StdConv / ScaledStdConv, re-parameterisable blocks (before and after), layer scales and
GRN, a conv head, windowed, relative-position and rotary attention, nn.MultiheadAttention, MLPs,
and every two-head (distillation / auxiliary head) family.
"""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import timm
import timm.models
import torch
import torchvision
from timm.layers import StdConv2d
from timm.utils.model import reparameterize_model
from torch import nn

from piggyback import PiggybackModel
from piggyback.norms import is_norm
from piggyback.swap import Slot
from piggyback.targets import in_any_subtree

pytestmark = pytest.mark.slow


def _timm(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


def _timm_class(model_class, variant: str, **kwargs) -> nn.Module:
    """A smaller instance of a timm architecture, with the pretrained_cfg (declared heads) of
    `variant`, for models whose registered variants fix their depth."""
    return timm.models.build_model_with_cfg(model_class, variant, pretrained=False, **kwargs)


def _reparameterized(name: str, **kwargs) -> nn.Module:
    return reparameterize_model(_timm(name, **kwargs).eval())


def _tv_vit() -> nn.Module:
    """torchvision's ViT (nn.MultiheadAttention), one small layer."""
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )


#: name -> (factory, input size). Two-head models are marked in the name.
FAMILIES = {
    "resnet18": (partial(_timm, "resnet18"), 32),
    "tv_resnet18": (torchvision.models.resnet18, 32),
    "tv_densenet121": (torchvision.models.densenet121, 32),
    "tv_squeezenet1_1 (conv head)": (torchvision.models.squeezenet1_1, 64),
    "tv_mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, 32),
    "tv_vit (nn.MultiheadAttention)": (_tv_vit, 32),
    "tf_efficientnet_b0 (Conv2dSame)": (partial(_timm, "tf_efficientnet_b0"), 32),
    "efficientnet_cc_b0_4e (CondConv2d)": (partial(_timm, "efficientnet_cc_b0_4e"), 32),
    "mobilenetv3_small_050": (partial(_timm, "mobilenetv3_small_050"), 32),
    "mobilenetv4_conv_small_035": (partial(_timm, "mobilenetv4_conv_small_035"), 32),
    "regnetx_002": (partial(_timm, "regnetx_002"), 32),
    "convnext_atto (layer scale)": (partial(_timm, "convnext_atto"), 32),
    "convnextv2_atto (GRN)": (partial(_timm, "convnextv2_atto"), 32),
    "test_nfnet (ScaledStdConv2d)": (partial(_timm, "test_nfnet"), 32),
    "resnetv2 BiT (StdConv2d)": (
        partial(
            _timm_class,
            timm.models.resnetv2.ResNetV2,
            "resnetv2_50x1_bit",
            layers=(1, 1, 1, 1),
            stem_type="fixed",
            conv_layer=partial(StdConv2d, eps=1e-8),
        ),
        32,
    ),
    "repvgg_a0": (partial(_timm, "repvgg_a0"), 32),
    "repvgg_a0 reparameterized": (partial(_reparameterized, "repvgg_a0"), 32),
    "fastvit_t8": (partial(_timm, "fastvit_t8"), 64),
    "fastvit_t8 reparameterized": (partial(_reparameterized, "fastvit_t8"), 64),
    "ghostnet_050": (partial(_timm, "ghostnet_050"), 32),
    "test_vit": (partial(_timm, "test_vit", img_size=32), 32),
    "swin (windows)": (
        partial(
            _timm,
            "swin_tiny_patch4_window7_224",
            img_size=32,
            window_size=2,
            depths=(1, 1, 1, 1),
            embed_dim=24,
            num_heads=(1, 1, 1, 1),
        ),
        32,
    ),
    "test_maxvit": (partial(_timm, "test_maxvit", img_size=64), 64),
    "test_coatnet": (partial(_timm, "test_coatnet", img_size=64), 64),
    "mobilevit_xxs": (partial(_timm, "mobilevit_xxs"), 64),
    "mixer": (
        partial(
            _timm_class,
            timm.models.mlp_mixer.MlpMixer,
            "mixer_s32_224",
            img_size=32,
            patch_size=8,
            num_blocks=2,
            embed_dim=64,
        ),
        32,
    ),
    "xcit_nano": (partial(_timm, "xcit_nano_12_p16_224", img_size=32, depth=2), 32),
    "beit (relative position)": (
        partial(_timm, "beit_base_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2),
        32,
    ),
    "eva02 (rotary)": (
        partial(_timm, "eva02_tiny_patch14_224", img_size=28, depth=1, num_classes=10),
        28,
    ),
    "cait (class attention)": (partial(_timm, "cait_xxs24_224", img_size=32, depth=1), 32),
    "efficientvit_m0": (partial(_timm, "efficientvit_m0"), 64),
    "lowformer_b0 (ConvTranspose2d)": (partial(_timm, "lowformer_b0"), 64),
    "sequencer2d (nn.LSTM, reported)": (
        partial(
            _timm_class,
            timm.models.sequencer.Sequencer2d,
            "sequencer2d_s",
            img_size=56,
            layers=(1, 1, 1, 1),
            embed_dims=(32, 64, 64, 64),
            hidden_sizes=(8, 16, 16, 16),
        ),
        56,
    ),
    "deit distilled (two heads)": (
        partial(_timm, "deit_tiny_distilled_patch16_224", img_size=32, depth=1),
        32,
    ),
    "pit distilled (two heads)": (partial(_timm, "pit_ti_distilled_224", img_size=64), 64),
    "levit (two heads)": (partial(_timm, "levit_128s", img_size=64), 64),
    "levit_conv (two heads)": (partial(_timm, "levit_conv_128s", img_size=64), 64),
    "efficientformer (two heads)": (
        partial(
            _timm_class,
            timm.models.efficientformer.EfficientFormer,
            "efficientformer_l1",
            depths=(1, 1, 1, 1),
            embed_dims=(16, 32, 48, 64),
            num_vit=1,
        ),
        224,
    ),
    "efficientformerv2 (two heads)": (partial(_timm, "efficientformerv2_s0", img_size=64), 64),
    "crossvit (two heads)": (
        partial(_timm, "crossvit_tiny_240", img_size=96, img_scale=(1.0, 1.0)),
        96,
    ),
    "repvit (two heads)": (partial(_timm, "repvit_m0_9"), 64),
    "swiftformer (two heads)": (partial(_timm, "swiftformer_xs"), 64),
    "volo (two heads)": (
        partial(
            _timm_class,
            timm.models.volo.VOLO,
            "volo_d1_224",
            layers=(1, 1, 1, 1),
            img_size=64,
            embed_dims=(32, 64, 64, 64),
            num_heads=(1, 2, 2, 2),
        ),
        64,
    ),
}


def _without_zero_tensors(model: nn.Module) -> nn.Module:
    """Random weights, but none all-zero: timm zero-initialises some layers (last norm of a
    residual branch, skip-init gains, layer scales), which would make every gradient upstream of
    them zero and hide a score that gets no gradient. Norm running statistics are made non-trivial
    so that frozen norms are not the identity."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif tensor.numel() and not tensor.any():
                tensor.normal_(0, 0.1, generator=generator)
    return model


def _wrap(backbone: nn.Module) -> PiggybackModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmasked tensors are reported
        return PiggybackModel(backbone)


def _half_off(model: PiggybackModel, task: str, seed: int) -> None:
    """Switch about half of the task's mask off, at random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, scores in model.task(task).scores.items():
            off = torch.rand(scores.shape, generator=generator) < 0.5
            scores[off] = -1e-2


def _train_step(model: PiggybackModel, images: torch.Tensor, classes: int) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    loss = nn.functional.cross_entropy(model(images), torch.arange(len(images)) % classes)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()


def _assert_backbone_unchanged(model: PiggybackModel, pristine: nn.Module) -> None:
    """Every tensor of the backbone outside its heads is bit for bit what it was before wrapping
    (the frozen weights, and the norms' running statistics)."""
    for name, tensor in pristine.state_dict().items():
        if not in_any_subtree(name, model.head_names):
            assert torch.equal(Slot.resolve(model.backbone, name).get(), tensor), name


def _outputs(model: PiggybackModel, task: str, images: torch.Tensor) -> torch.Tensor:
    model.set_task(task)
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_isolates_tasks_merges_and_round_trips(name, tmp_path):
    factory, size = FAMILIES[name]
    torch.manual_seed(0)
    backbone = _without_zero_tensors(factory().eval())
    pristine = copy.deepcopy(backbone)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = _wrap(backbone)
    assert not any(is_norm(backbone.get_submodule(n.rpartition(".")[0])) for n in model.unmasked)

    # Task A: a 3-class head, half its mask off; one step reaches every score.
    model.add_task("a", 3, seed=0)
    _half_off(model, "a", seed=0)
    model.set_task("a")
    model.train()
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 2]))
    loss.backward()
    scores = model.task("a").scores.items()
    no_gradient = [n for n, s in scores if s.grad is None or not s.grad.any()]
    assert not no_gradient, f"scores without gradient: {no_gradient[:5]}"
    model.eval()
    before = _outputs(model, "a", images)
    assert before.shape == (2, 3)
    scores_a = {n: s.detach().clone() for n, s in model.task("a").scores.items()}

    # Task B trains: task A and the backbone do not change, bit for bit.
    model.add_task("b", 5, seed=1)
    _half_off(model, "b", seed=1)
    model.set_task("b")
    _train_step(model, images, 5)
    assert torch.equal(_outputs(model, "a", images), before)
    assert all(torch.equal(s, scores_a[n]) for n, s in model.task("a").scores.items())
    _assert_backbone_unchanged(model, pristine)
    output_b = _outputs(model, "b", images)
    assert output_b.shape == (2, 5)

    # Merged: a plain model that computes task B, bit for bit. Compared with requires_grad off,
    # as the task's swapped-in tensors are: torch.matmul picks another kernel for a 3-D
    # non-contiguous input when the weight requires grad (measured on PiT: last-bit differences).
    merged = model.merge("b").requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(merged(images), output_b)

    # Saved and loaded onto a fresh copy of the backbone: the same outputs.
    model.save_pretrained(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmasked tensors are reported again
        restored = PiggybackModel.from_pretrained(tmp_path / "model", pristine)
    assert torch.equal(_outputs(restored, "a", images), before)
    assert torch.equal(_outputs(restored, "b", images), output_b)
