"""Every timm and every torchvision classification model, wrapped on the meta device.

The meta device gives every tensor a shape and no memory, so the whole zoo (about 1,450 models,
giants included) is built and wrapped in minutes: this checks the structure piggyback finds in
each (heads, masked weights, norms, reported weights, swap slots; see
`coverage_checks.check_wrapped`). Computation is checked on representative models in
`test_model_families.py`; `coverage_report.py` turns this test's log into docs/model-coverage.md.

Models that cannot be built on the meta device, or that piggyback refuses, are listed below with
the reason; the test checks that they still fail for that reason, so the lists stay true.
"""

from __future__ import annotations

import pytest
import timm
import torchvision
from coverage_checks import build_on_meta, check_wrapped, log_refused, log_wrapped, wrap_quietly
from torch import nn

from piggyback import UnsupportedModelError

TIMM_MODELS = timm.list_models()
TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)

#: Output size given to torchvision models: their heads are the layers with that many outputs.
SENTINEL_CLASSES = 997

#: timm / torchvision models that do not build on the meta device: name -> part of the error.
UNBUILDABLE: dict[str, str] = {}

_ENCODER = "declares no classifier"

#: Models piggyback refuses: name -> part of the UnsupportedModelError message. Image encoders
#: of vision-language models: timm builds them without any classifier (no head to replace).
REFUSED: dict[str, str] = {
    "deepseek_vit_412m_enc": _ENCODER,
    "gemma4_vit_167m_enc": _ENCODER,
    "gemma4_vit_570m_enc": _ENCODER,
    "mobilenetv5_300m_enc": _ENCODER,
    "qwen3_vit_88m_enc": _ENCODER,
    "qwen3_vit_306m_enc": _ENCODER,
    "qwen3_vit_416m_enc": _ENCODER,
}


def _expect_failure(library: str, name: str, build) -> bool:
    """Check a listed model still fails as listed; False for a model expected to work."""
    if name in UNBUILDABLE:
        with pytest.raises(Exception, match=UNBUILDABLE[name]) as failure:
            build()
        log_refused(library, name, str(failure.value), outcome="unbuildable")
    elif name in REFUSED:
        backbone = build()
        with pytest.raises(UnsupportedModelError, match=REFUSED[name]) as failure:
            wrap_quietly(backbone)
        log_refused(library, name, str(failure.value))
    else:
        return False
    return True


def _timm_classifier(backbone) -> tuple[list[str], list[nn.Module]]:
    """What a timm model calls its classifier: the layers its pretrained_cfg names (those that
    exist) and the modules get_classifier() returns."""
    declared = backbone.pretrained_cfg.get("classifier")
    names = [declared] if isinstance(declared, str) else list(declared or ())
    names = [n for n in names if _has_module(backbone, n)]
    classifier = backbone.get_classifier()
    modules = list(classifier) if isinstance(classifier, tuple) else [classifier]
    return names, [m for m in modules if not isinstance(m, nn.Identity)]


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _headless(backbone) -> bool:
    """A timm model whose declared classifier is an nn.Identity (its default has no classes)."""
    names, _ = _timm_classifier(backbone)
    return bool(names) and all(isinstance(backbone.get_submodule(n), nn.Identity) for n in names)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_every_timm_classifier_is_wrapped_as_it_declares(name):
    def build(**kwargs):
        return build_on_meta(lambda: timm.create_model(name, pretrained=False, **kwargs))

    if _expect_failure("timm", name, build):
        return
    backbone, note = build(), None
    if _headless(backbone):
        # Feature extractors by default (num_classes=0): refused with the fix, which works.
        with pytest.raises(UnsupportedModelError, match=r"is an nn\.Identity.*num_classes=1000"):
            wrap_quietly(backbone)
        backbone, note = build(num_classes=1000), "built with num_classes=1000"
    model = check_wrapped(backbone, *_timm_classifier(backbone))
    log_wrapped("timm", name, model, note)


def _torchvision_build(name: str):
    kwargs = {"num_classes": SENTINEL_CLASSES}
    if name in ("googlenet", "inception_v3"):
        # As torchvision builds them with pretrained weights (what piggyback's backbones load):
        # without the training-only auxiliary classifiers.
        kwargs |= {"aux_logits": False, "init_weights": True}
    return build_on_meta(lambda: torchvision.models.get_model(name, **kwargs))


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_every_torchvision_classifier_is_wrapped_with_its_head(name):
    def build():
        return _torchvision_build(name)

    if _expect_failure("torchvision", name, build):
        return
    backbone = build()
    heads = [
        (n, m)
        for n, m in backbone.named_modules()
        if getattr(m, "out_features", getattr(m, "out_channels", None)) == SENTINEL_CLASSES
    ]
    model = check_wrapped(backbone, [n for n, _ in heads], [m for _, m in heads])
    log_wrapped("torchvision", name, model)
