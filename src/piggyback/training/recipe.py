"""Everything a training run needs to know, with the paper's recipe as defaults.

A `TrainConfig` starts with unset (None) fields; `resolve()` fills them from the method's defaults
so the saved config states every value the run used. Values come, in increasing priority, from the
method defaults, a YAML or TOML config file, and explicit command-line flags.

Defaults (Mallya et al. 2018, and the authors' scripts):
- piggyback: Adam, lr 1e-4 for the scores and for the head, x0.1 at epoch 15 of 30, batch 32,
  weight decay 0, normalization frozen.
- finetune: SGD momentum 0.9, lr 1e-3 for every weight, x0.1 at epoch 15, batch norm trained.
- classifier: SGD momentum 0.9, lr 1e-3 for the head, no decay.
With another epoch count the decay moves to half of it (the schedule scaled to the budget).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from piggyback.config import PiggybackConfig, strict_from_dict
from piggyback.data.formats import FORMATS
from piggyback.device import PRECISIONS
from piggyback.mask_kinds import mask_kind_names
from piggyback.methods import get_method, method_names
from piggyback.options import check_option, flag_name, option, option_fields
from piggyback.task_coding import HEAD_DTYPES
from piggyback.tasks import check_task_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("adam", "sgd")
#: The largest learning rate accepted: far above any that trains (the paper uses 1e-4 / 1e-3),
#: low enough that a typo such as 1e40 is caught before it turns every weight into inf.
MAX_LR = 10.0

DATA, MODEL, MASKING, OPTIMIZATION, RUNTIME = "Data", "Model", "Masking", "Optimization", "Runtime"


def parse_epochs(text: str) -> list[int]:
    """`--lr-decay-epochs 10,20` -> [10, 20]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--lr-decay-epochs takes comma-separated epochs, got {text!r}") from error


def learning_rate(help: str, *, default: str) -> Any:
    """A learning-rate option: unset until `resolve()` picks the method's default."""
    return option(
        None, help, panel=OPTIMIZATION, low=0, low_open=True, high=MAX_LR, default_text=default
    )


@dataclass
class TrainConfig:
    """One training run. None means "the method's default" until `resolve()` is called.

    Each field is also a `piggyback train` flag (`--batch-size` for batch_size) and a config-file
    key, with the help, range and choices declared here (see `piggyback.options`).
    """

    data: str = option(
        "",
        "Dataset (required): ImageFolder root, list file/folder, or a paper dataset's "
        "official layout.",
        panel=DATA,
    )
    data_format: str = option("auto", "Dataset layout.", panel=DATA, choices=FORMATS)
    task: str | None = option(
        None,
        "Task name: letters, digits, '_' and '-'.",
        panel=MODEL,
        default_text="the dataset folder's name",
    )
    output: str = option(
        "piggyback-model", "Model directory to create or add the task to.", panel=MODEL
    )
    method: str = option("piggyback", "Learning method.", panel=MODEL, choices=method_names)
    backbone: str = option(
        "efficientnet_lite0",
        "efficientnet_lite0 (offline), timm:NAME or torchvision:NAME.",
        panel=MODEL,
    )
    weights: str | None = option(
        None,
        "Local backbone state dict (.safetensors, or .pt/.pth loaded weights-only).",
        panel=MODEL,
    )
    # Masking (piggyback); shared by every task of a model directory.
    mask_kind: str = option(
        "binary", "Mask kind (piggyback.mask_kinds).", panel=MASKING, choices=mask_kind_names
    )
    threshold: float = option(
        5e-3, "A score above it switches its weight on.", panel=MASKING, low=0, high=10
    )
    init: str = option("ones", "ones | uniform score initialisation.", panel=MASKING)
    init_value: float = option(
        1e-2, "Initial score (uniform: the range).", panel=MASKING, low=0, high=10, low_open=True
    )
    task_norms: bool = option(
        False,
        "Own normalization per task, trained (or frozen, the backbone's).",
        panel=MASKING,
        flag="--task-norms/--frozen-norms",
    )
    head_dtype: str | None = option(
        None,
        "Save the head and task norms as float16 or bfloat16: smaller task files, slightly "
        "rounded weights.",
        panel=MODEL,
        choices=tuple(HEAD_DTYPES),
        default_text="float32",
    )
    # Optimization.
    epochs: int = option(30, "Training epochs.", panel=OPTIMIZATION, low=1, high=100_000)
    batch_size: int = option(32, "Images per step.", panel=OPTIMIZATION, low=1, high=65_536)
    image_size: int = option(
        224,
        "Crop size; images are resized to it divided by the backbone's crop fraction "
        "(256 for 224 on most backbones).",
        panel=OPTIMIZATION,
        low=8,
        high=4096,
    )
    optimizer: str | None = option(
        None,
        "Optimizer.",
        panel=OPTIMIZATION,
        choices=OPTIMIZERS,
        default_text="adam for piggyback, sgd for the baselines",
    )
    lr: float | None = learning_rate("Learning rate.", default="1e-4 piggyback, 1e-3 baselines")
    lr_scores: float | None = learning_rate("Learning rate of the mask scores.", default="--lr")
    lr_head: float | None = learning_rate(
        "Learning rate of the head (and task norms).", default="--lr"
    )
    momentum: float = option(
        0.9, "SGD momentum.", panel=OPTIMIZATION, low=0, high=1, high_open=True
    )
    weight_decay: float = option(
        0.0, "L2 weight decay.", panel=OPTIMIZATION, low=0, high=1, high_open=True
    )
    lr_decay_epochs: list[int] | None = option(
        None,
        "Epochs (comma-separated) where the learning rates are multiplied by --lr-decay-factor.",
        panel=OPTIMIZATION,
        low=1,
        high=100_000,
        parse=parse_epochs,
        metavar="E1,E2",
        default_text="half the epochs; none for classifier",
    )
    lr_decay_factor: float = option(
        0.1, "Learning-rate decay factor.", panel=OPTIMIZATION, low=0, high=1, low_open=True
    )
    # Data.
    val_fraction: float = option(
        0.1,
        "Share of train held out as val when the data has no val split.",
        panel=DATA,
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    strict: bool = option(
        False, "Fail on unreadable images instead of skipping them.", panel=DATA, flag="--strict"
    )
    max_train_batches: int | None = option(
        None,
        "Stop each epoch after this many batches (quick runs).",
        panel=OPTIMIZATION,
        low=1,
        default_text="all",
    )
    # Runtime.
    seed: int = option(0, "Random seed.", panel=RUNTIME, low=0, high=2**63 - 1)
    workers: int = option(2, "Data loading processes.", panel=RUNTIME, low=0, high=1024)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.", panel=RUNTIME)
    precision: str = option("32", "Training precision.", panel=RUNTIME, choices=PRECISIONS)
    channels_last: bool = option(
        True, "Channels-last memory layout (faster convolutions).", panel=RUNTIME
    )
    progress: bool = option(True, "Progress bars.", panel=RUNTIME)
    tensorboard: bool = option(
        False, "Also log to TensorBoard.", panel=RUNTIME, flag="--tensorboard"
    )
    download: bool = option(
        False,
        "Download flowers102 / cars with torchvision when missing.",
        panel=DATA,
        flag="--download",
    )

    def resolve(self) -> TrainConfig:
        """A copy with every method default filled in and every value checked."""
        cfg = dataclasses.replace(self)
        cfg.check_values()
        method = get_method(cfg.method)
        cfg.optimizer = cfg.optimizer or method.default_optimizer
        if cfg.lr is None:
            cfg.lr = method.default_lr
        if method.uses_masks and cfg.lr_scores is None:
            cfg.lr_scores = cfg.lr
        if cfg.lr_head is None:
            cfg.lr_head = cfg.lr
        if cfg.lr_decay_epochs is None:
            cfg.lr_decay_epochs = [max(1, cfg.epochs // 2)] if method.decays_lr else []
        if cfg.task is None:
            cfg.task = default_task_name(cfg.data)
        cfg.lr_decay_epochs = sorted(cfg.lr_decay_epochs)
        cfg.check()
        return cfg

    def check_values(self, labels: Mapping[str, str] | None = None) -> None:
        """Every field against its declared type, range and choices (numbers given as text
        are converted); `labels` names fields in messages (default: the field name)."""
        for field, spec, annotation in option_fields(type(self)):
            label = (labels or {}).get(field.name, field.name)
            value = check_option(label, getattr(self, field.name), spec, annotation)
            setattr(self, field.name, value)

    def check(self) -> None:
        self.check_values()
        if not self.data:
            raise ValueError("no dataset given: pass --data PATH (or `data:` in the config file)")
        check_task_name(self.task or "")
        self.model_config()  # mask settings are checked by PiggybackConfig

    def model_config(self) -> PiggybackConfig:
        """The mask settings of the model directory this run writes into."""
        return PiggybackConfig(
            mask_kind=self.mask_kind,
            threshold=self.threshold,
            init=self.init,
            init_value=self.init_value,
            task_norms=self.task_norms,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return strict_from_dict(cls, data, "training options")


#: Options that may differ when a run is resumed: they do not change its result...
RESUMABLE_CHANGES = (
    "workers", "progress", "device", "tensorboard", "download", "channels_last", "head_dtype",
)  # fmt: skip
#: ... and those that do but may change on purpose (e.g. lowered after a NaN loss); a resumed run
#: applies them from its next epoch and records the change in its metrics.
LEARNING_RATES = ("lr", "lr_scores", "lr_head")


def default_task_name(data: str) -> str:
    """The dataset folder's name made a valid task name: 'flowers102', 'données' -> 'donnees'.

    Task names stay ASCII because they become file names and module keys on every system: accents
    are dropped (Unicode NFKD splits 'é' into 'e' and a combining accent), every other character
    becomes '_', and a name with no ASCII letter or digit left falls back to 'task'.
    """
    name = Path(os.path.abspath(os.path.expanduser(data))).name
    decomposed = unicodedata.normalize("NFKD", name)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c))
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", letters).lstrip("-")[:64]
    return cleaned if re.search(r"[A-Za-z0-9]", cleaned) else "task"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or TOML (.toml) file; dashes in keys become underscores."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"config file {path} cannot be parsed: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return {key.replace("-", "_"): value for key, value in data.items()}


def merge_options(
    file_values: dict[str, Any], flags: dict[str, Any], *, source: str = "the config file"
) -> TrainConfig:
    """Config-file values overridden by the flags that were given (None = not given).

    Every value is checked here, before anything runs, and a bad one is named as it was given:
    `--lr` for a flag, `lr (in run.yaml)` for a config-file key.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    config = TrainConfig.from_dict({**file_values, **given})
    names = {field.name: spec for field, spec, _ in option_fields(TrainConfig)}
    labels = {
        name: flag_name(name, names[name]) if name in given else f"{name} (in {source})"
        for name in names
    }
    config.check_values(labels)
    return config


def write_config(config: TrainConfig, path: Path) -> None:
    """The resolved config as YAML (atomically), so the run can be repeated exactly."""
    from piggyback.fileio import write_atomic

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def config_differences(saved: TrainConfig, requested: TrainConfig) -> dict[str, tuple]:
    """Options that differ and would change the result of a resumed run."""
    a, b = saved.to_dict(), requested.to_dict()
    return {
        k: (a[k], b[k])
        for k in a
        if k not in (*RESUMABLE_CHANGES, *LEARNING_RATES) and json.dumps(a[k]) != json.dumps(b[k])
    }
