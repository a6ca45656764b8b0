"""Tests of the backbone factory.

The key claim is that the offline default (timm's tf_efficientnet_lite0 with the packaged
lukemelas weights renamed) *is* the original network: it is checked against the original
implementation on real photographs, not only on key names and shapes. Nothing here downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import timm.data
import torch
import torchvision
from matplotlib import cbook
from PIL import Image

from piggyback.backbones import (
    Backbone,
    create_backbone,
    create_backbone_from_spec,
    list_backbones,
    read_state_dict,
)
from piggyback.backbones import lite0 as lite0_module
from piggyback.errors import BackboneError

FLOWERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flowers102"
# ImageNet-1k indices used for sanity checks of the predictions.
MILITARY_UNIFORM, DAISY, ARTICHOKE = 652, 985, 944
# Logits of the two implementations are computed by the same float32 ops; any mapping error
# (a swapped BN, a wrong block) moves logits by whole units, so a tight bound proves the mapping.
LOGIT_ATOL = 1e-4
TINY = "timm:test_resnet"  # a few-kB timm test model: fast weight-file round trips


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def preprocess(paths: list[Path], data_config: dict) -> torch.Tensor:
    """The backbone's own eval preprocessing (resize, centre crop, normalise) via timm."""
    transform = timm.data.create_transform(**data_config)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return create_backbone()


@pytest.fixture(scope="module")
def original_lite0() -> torch.nn.Module:
    """The original lukemelas-layout implementation, with the packaged weights loaded strictly."""
    efficientnet_lite_pytorch = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="dev dependency efficientnet-lite-pytorch not installed"
    )
    model = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(lite0_module.weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def compare_with_original(
    lite0: Backbone, original: torch.nn.Module, paths: list[Path]
) -> torch.Tensor:
    x = preprocess(paths, lite0.data_config)
    assert x.shape[-2:] == (224, 224)  # the original pads statically for 224 px
    with torch.no_grad():
        ours, theirs = lite0.model(x), original(x)
    max_diff = (ours - theirs).abs().max().item()
    print(f"max |logit difference| over {len(paths)} images: {max_diff:.3g}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGIT_ATOL)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    return ours


# ---------------------------------------------------------------------------------------------
# The offline default: EfficientNet-Lite0 mapping


def test_lite0_spec_and_tf_style_data_config(lite0: Backbone) -> None:
    assert lite0.spec == {
        "name": "efficientnet_lite0",
        "source": "piggyback-offline",
        "pretrained": True,
        "weights": None,
    }
    assert lite0.data_config == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    assert not lite0.model.training
    assert timm.data.create_transform(**lite0.data_config) is not None


def test_lite0_architecture_matches_original(lite0: Backbone, original_lite0) -> None:
    """Things a state dict does not carry: BN eps, activation, parameter count."""
    ours = [m for m in lite0.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    theirs = [m for m in original_lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(ours) == len(theirs)
    assert {m.eps for m in ours} == {m.eps for m in theirs} == {1e-3}
    assert any(isinstance(m, torch.nn.ReLU6) for m in lite0.model.modules())
    count = sum(p.numel() for p in lite0.model.parameters())
    assert count == sum(p.numel() for p in original_lite0.parameters())


@pytest.mark.slow
def test_lite0_matches_original_on_grace_hopper(lite0: Backbone, original_lite0) -> None:
    photo = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    logits = compare_with_original(lite0, original_lite0, [photo])
    assert MILITARY_UNIFORM in logits[0].topk(5).indices.tolist()


@pytest.mark.slow
def test_lite0_matches_original_on_flowers102(lite0: Backbone, original_lite0) -> None:
    classes = [
        "049_oxeye_daisy",
        "029_artichoke",
        "054_sunflower",
        "050_common_dandelion",
        "001_pink_primrose",
        "073_water_lily",
    ]
    test_dir = FLOWERS / "test"
    paths = [p for c in classes for p in sorted((test_dir / c).glob("*.jpg"))[:2]]
    if len(paths) != 2 * len(classes):
        pytest.skip(f"Flowers-102 test images not found under {test_dir} (real data is optional)")
    logits = compare_with_original(lite0, original_lite0, paths)
    top5 = logits.topk(5, dim=1).indices.tolist()
    assert all(DAISY in top5[i] for i in (0, 1)), "oxeye daisies should look like ImageNet daisies"
    assert all(ARTICHOKE in top5[i] for i in (2, 3)), "artichoke flowers should rank 'artichoke'"


def test_lite0_weights_are_cached_but_models_independent() -> None:
    first = create_backbone()
    with torch.no_grad():
        for p in first.model.parameters():
            p.zero_()  # must not reach the cached state dict
    second = create_backbone()
    assert not state_dicts_equal(first.model, second.model)
    assert state_dicts_equal(second.model, create_backbone().model)


def test_lite0_without_pretrained_weights_is_untrained(lite0: Backbone) -> None:
    scratch = create_backbone(pretrained=False)
    assert scratch.spec["pretrained"] is False
    assert not state_dicts_equal(scratch.model, lite0.model)


def test_lite0_accepts_a_weights_file_in_lukemelas_naming(lite0: Backbone) -> None:
    packaged = lite0_module.weights_path()
    loaded = create_backbone(weights=packaged)
    assert loaded.spec["weights"] == str(packaged.resolve())
    assert loaded.spec["pretrained"] is False
    assert state_dicts_equal(loaded.model, lite0.model)


def _drop_key(sd: dict) -> None:
    del sd["_blocks.3._bn1.running_var"]


def _add_key(sd: dict) -> None:
    sd["_blocks.3._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)


def _reshape_key(sd: dict) -> None:
    sd["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)


def _swap_blocks(sd: dict) -> None:
    """Block 0 (no expansion) traded for block 1 (with): kinds no longer line up."""
    for key in [k for k in sd if k.startswith(("_blocks.0.", "_blocks.1."))]:
        sd[key.replace("_blocks.0.", "_blocks.X.").replace("_blocks.1.", "_blocks.0.")] = sd.pop(
            key
        )
    for key in [k for k in sd if k.startswith("_blocks.X.")]:
        sd[key.replace("_blocks.X.", "_blocks.1.")] = sd.pop(key)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_key, "blocks.2.0.bn2.running_var"),
        (_add_key, "_se_reduce"),
        (_reshape_key, "(144, 1, 3, 3)"),
        (_swap_blocks, "different kinds"),
    ],
)
def test_lite0_conversion_checks_every_key(damage, message: str) -> None:
    source = read_state_dict(lite0_module.weights_path())
    damage(source)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(BackboneError, match="Cannot map") as info:
        lite0_module.convert_lukemelas(source, target)
    assert message in str(info.value)


def test_lite0_conversion_checks_bn_eps() -> None:
    source = read_state_dict(lite0_module.weights_path())
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False, bn_eps=1e-5)
    with pytest.raises(BackboneError, match="eps"):
        lite0_module.convert_lukemelas(source, target)


# ---------------------------------------------------------------------------------------------
# timm and torchvision names


@pytest.mark.parametrize(
    ("name", "source", "arch", "interpolation", "crop_pct"),
    [
        ("timm:resnet18", "timm", "resnet18", "bicubic", 0.95),
        ("torchvision:resnet18", "torchvision", "resnet18", "bilinear", 0.875),
        ("TIMM: resnet18", "timm", "resnet18", "bicubic", 0.95),
        ("timm:efficientnet_lite0", "timm", "efficientnet_lite0", "bicubic", 0.875),
        ("mobilenetv3_small_050", "timm", "mobilenetv3_small_050", "bicubic", 0.875),
        ("mobilenet_v3_small", "torchvision", "mobilenet_v3_small", "bilinear", 0.875),
    ],
)
def test_library_names_create_models(
    name: str, source: str, arch: str, interpolation: str, crop_pct: float
) -> None:
    backbone = create_backbone(name, pretrained=False)
    assert backbone.spec == {"name": arch, "source": source, "pretrained": False, "weights": None}
    assert not backbone.model.training
    config = backbone.data_config
    assert config["input_size"] == (3, 224, 224)
    assert config["interpolation"] == interpolation
    assert config["crop_pct"] == pytest.approx(crop_pct)
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert config["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert json.loads(json.dumps(config))["mean"] == list(config["mean"])
    with torch.no_grad():
        assert backbone.model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_torchvision_data_config_follows_default_weights() -> None:
    """resnet50's DEFAULT (V2) weights resize to 232, not 256: crop_pct must say so."""
    config = create_backbone("torchvision:resnet50", pretrained=False).data_config
    assert config["crop_pct"] == pytest.approx(224 / 232)
    transform = timm.data.create_transform(**config)
    resize = next(t for t in transform.transforms if isinstance(t, torchvision.transforms.Resize))
    assert resize.size == 232


def test_timm_pretrained_tag_is_kept() -> None:
    backbone = create_backbone("timm:resnet18.a1_in1k", pretrained=False)
    assert backbone.spec["name"] == "resnet18.a1_in1k"
    assert backbone.model.pretrained_cfg["tag"] == "a1_in1k"


def test_ambiguous_bare_name_requires_prefix() -> None:
    with pytest.raises(BackboneError, match="ambiguous") as info:
        create_backbone("resnet18", pretrained=False)
    assert "'timm:resnet18'" in str(info.value)
    assert "'torchvision:resnet18'" in str(info.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet5", ["'timm:resnet50'", "'torchvision:resnet50'", "timm:<name>"]),
        ("timm:resnet5", ["'timm:resnet50'", "torchvision:<name>"]),
        ("torchvision:efficientnet_lite0", ["'torchvision:efficientnet_b0'"]),
        ("efficientnet_lite", ["'efficientnet_lite0'"]),
        ("tv:resnet18", ["piggyback-offline, timm, torchvision", "'timm:<name>'"]),
        ("", ["Expected a backbone name"]),
    ],
)
def test_unknown_names_get_helpful_errors(name: str, expected: list[str]) -> None:
    with pytest.raises(BackboneError) as info:
        create_backbone(name, pretrained=False)
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize(
    ("name", "module", "function"),
    [
        ("timm:resnet18", timm, "create_model"),
        ("torchvision:resnet18", torchvision.models, "get_model"),
    ],
)
def test_failed_download_is_a_backbone_error(monkeypatch, name: str, module, function: str) -> None:
    def offline(*args, **kwargs):
        raise OSError("simulated: no internet")

    monkeypatch.setattr(module, function, offline)
    with pytest.raises(BackboneError, match="weights=PATH") as info:
        create_backbone(name, pretrained=True)
    assert "no internet" in str(info.value)


def test_list_backbones() -> None:
    names = list_backbones()
    assert {"efficientnet_lite0", "timm:resnet18", "torchvision:resnet18"} <= set(names)
    assert all(n.startswith("torchvision:") for n in list_backbones("torchvision"))
    with pytest.raises(BackboneError):
        list_backbones("hub")


# ---------------------------------------------------------------------------------------------
# Local weight files


@pytest.fixture
def tiny() -> Backbone:
    torch.manual_seed(0)
    return create_backbone(TINY, pretrained=False)


def save(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin"])
def test_weights_file_round_trips(tiny: Backbone, tmp_path: Path, suffix: str) -> None:
    path = save(tiny.model.state_dict(), tmp_path / f"tiny{suffix}")
    loaded = create_backbone(TINY, weights=path)  # pretrained=True by default: must not download
    assert loaded.spec == {
        "name": "test_resnet",
        "source": "timm",
        "pretrained": False,
        "weights": str(path.resolve()),
    }
    assert loaded.data_config == tiny.data_config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), tiny.model(x))


def test_weights_file_does_not_ask_library_for_weights(monkeypatch, tiny, tmp_path) -> None:
    calls = []
    real_create = timm.create_model

    def recording_create(*args, **kwargs):
        calls.append(kwargs.get("pretrained"))
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording_create)
    create_backbone(TINY, pretrained=True, weights=save(tiny.model.state_dict(), tmp_path / "w.pt"))
    assert calls == [False]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "step": 10},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    ],
    ids=["state_dict", "model+module.", "_orig_mod."],
)
def test_weights_file_unwraps_checkpoints(tiny: Backbone, tmp_path: Path, wrap) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save(wrap(tiny.model.state_dict()), path)
    assert state_dicts_equal(create_backbone(TINY, weights=path).model, tiny.model)


def test_weights_mismatch_names_the_keys(tiny: Backbone, tmp_path: Path) -> None:
    state_dict = tiny.model.state_dict()
    del state_dict["fc.bias"]
    state_dict["extra.weight"] = torch.zeros(3)
    state_dict["fc.weight"] = torch.zeros(10, state_dict["fc.weight"].shape[1])
    path = save(state_dict, tmp_path / "bad.safetensors")
    with pytest.raises(BackboneError) as info:
        create_backbone(TINY, weights=path)
    message = str(info.value)
    for text in ("1 missing (fc.bias)", "1 unexpected (extra.weight)", "fc.weight: file (10,"):
        assert text in message
    assert str(path.resolve()) in message


class CodeOnLoad:
    """Pickles to a call of os.system: a weights file must never be able to run this."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_file_needing_unpickling_is_refused(tiny: Backbone, tmp_path: Path) -> None:
    marker = tmp_path / "code-was-run"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny.model.state_dict(), "hook": CodeOnLoad(marker)}, path)
    with pytest.raises(BackboneError, match="unpickling"):
        create_backbone(TINY, weights=path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("missing.pth", None, "found nothing there"),
        ("weights.npz", b"PK", "Expected a weights file ending in"),
        ("broken.safetensors", b"not a safetensors file", "valid safetensors"),
        ("broken.pth", b"not a zip", "damaged or holds other Python objects"),
        ("list.pth", [torch.zeros(1)], "found list"),
        ("empty.pth", {}, "found keys []"),
        ("no-tensors.pth", {"epoch": 3}, "found keys ['epoch']"),
    ],
)
def test_bad_weights_files(tmp_path: Path, filename: str, content, message: str) -> None:
    path = tmp_path / filename
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(BackboneError) as info:
        create_backbone(TINY, weights=path)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# Specs


def test_spec_json_round_trip_rebuilds_offline_default(lite0: Backbone) -> None:
    spec = json.loads(json.dumps(lite0.spec))
    rebuilt = create_backbone_from_spec(spec)
    assert rebuilt.spec == lite0.spec
    assert rebuilt.data_config == lite0.data_config
    assert state_dicts_equal(rebuilt.model, lite0.model)
    assert not rebuilt.model.training


def test_spec_json_round_trip_with_weights_file(tiny: Backbone, tmp_path: Path) -> None:
    built = create_backbone(TINY, weights=save(tiny.model.state_dict(), tmp_path / "t.safetensors"))
    rebuilt = create_backbone_from_spec(json.loads(json.dumps(built.spec)))
    assert rebuilt.spec == built.spec
    assert state_dicts_equal(rebuilt.model, tiny.model)


def test_spec_of_library_model_round_trips() -> None:
    built = create_backbone("torchvision:resnet18", pretrained=False)
    rebuilt = create_backbone_from_spec(json.loads(json.dumps(built.spec)))
    assert rebuilt.spec == built.spec
    assert type(rebuilt.model) is type(built.model)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "efficientnet_lite0"}, "exactly the keys"),
        (
            {"name": "resnet18", "source": "timm", "pretrained": False, "weights": None, "x": 1},
            "exactly the keys",
        ),
        ({"name": "resnet18", "source": "hub", "pretrained": False, "weights": None}, "'hub'"),
        ({"name": "resnet18", "source": "timm", "pretrained": "no", "weights": None}, "bool"),
        ({"name": "resnet5", "source": "timm", "pretrained": False, "weights": None}, "resnet50"),
        ("efficientnet_lite0", "exactly the keys"),
    ],
)
def test_invalid_specs_are_refused(spec, message: str) -> None:
    with pytest.raises(BackboneError) as info:
        create_backbone_from_spec(spec)
    assert message in str(info.value)
