"""Which modules of a model are its classifier heads (the modules each task replaces).

timm models say so twice: `pretrained_cfg["classifier"]` names the head layer(s) (a tuple for
distilled models: `("head", "head_dist")`), and `get_classifier()` returns the classifier
module(s). Neither is complete on its own: VOLO's config names its auxiliary token head, which
`get_classifier()` leaves out, and the untrained LeViT-384/s8 config names `head.linear` only
although the model also has, and averages in, `head_dist`. So every declared layer is a head, and
a classifier module holding none of them contributes its last layer with weights. A timm model
that declares no classifier at all (an image encoder) is refused rather than guessed at. Other
models: the last nn.Linear, or a final convolution (torchvision's SqueezeNet).
"""

from __future__ import annotations

from torch import nn

from piggyback.errors import UnsupportedModelError
from piggyback.norms import is_norm, norm_types

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_TYPES = (nn.Linear, *_CONV_TYPES)  # the layers a classifier ends in


def _config(model: nn.Module) -> dict | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return cfg if isinstance(cfg, dict) else None


def _existing(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            continue
    return found


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    """What timm's get_classifier() returns, as a list (none for other models)."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return []
    try:
        classifier = get_classifier()
    except Exception:  # a model's own method; any failure just means it tells us nothing
        return []
    modules = list(classifier) if isinstance(classifier, tuple) else [classifier]
    return [m for m in modules if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]


def _last_layer(module: nn.Module, names: dict[int, str]) -> str | None:
    layers = [m for m in module.modules() if isinstance(m, _LAYER_TYPES)]
    return names.get(id(layers[-1])) if layers else None


def declared_heads(model: nn.Module) -> list[str] | None:
    """The heads a timm model declares, in declaration order; None for a non-timm model."""
    cfg = _config(model)
    if cfg is None:
        return None
    declared = cfg.get("classifier")
    names = [declared] if isinstance(declared, str) else list(declared or ())
    found = _existing(model, names)
    heads = [name for name, module in found.items() if not isinstance(module, nn.Identity)]
    if found and not heads:
        raise UnsupportedModelError(
            f"the model's classifier {next(iter(found))!r} is an nn.Identity (a timm model built "
            "with num_classes=0): build it with a classifier, e.g. "
            "timm.create_model(name, num_classes=1000), to have a head to replace"
        )
    module_names = {id(m): n for n, m in model.named_modules()}
    head_modules = [found[name] for name in heads]
    for classifier in _classifier_modules(model):
        if not any(h is m for h in head_modules for m in classifier.modules()):
            extra = _last_layer(classifier, module_names)
            if extra is not None and extra not in heads:
                heads.append(extra)
    if not heads:
        raise UnsupportedModelError(
            f"this timm model declares no classifier (pretrained_cfg['classifier'] = {declared!r}"
            " names no module): it is an image encoder, with no head for a task to replace. "
            "Use a classification model, or name the head with PiggybackConfig(head='name')"
        )
    return heads


def find_heads(model: nn.Module) -> list[str]:
    """The dotted names of the classifier head(s): those a timm model declares, else the last
    nn.Linear, else a convolution that is the last layer with weights (SqueezeNet)."""
    declared = declared_heads(model)
    if declared is not None:
        return declared
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return [linears[-1]]
    norms = norm_types()
    weighted = [
        (name, m)
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) and not is_norm(m, norms)
    ]
    if weighted and isinstance(weighted[-1][1], _CONV_TYPES):
        return [weighted[-1][0]]
    last = [f"{name} ({type(m).__name__})" for name, m in weighted[-3:]]
    raise UnsupportedModelError(
        "could not find the classifier head (no timm pretrained_cfg['classifier'], no nn.Linear, "
        f"and the last layers with weights are {last}, not a convolution); name it with "
        "PiggybackConfig(head='module.name')"
    )
