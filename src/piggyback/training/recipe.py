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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from piggyback.config import PiggybackConfig, strict_from_dict
from piggyback.methods import get_method
from piggyback.tasks import check_task_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRECISIONS = ("32", "bf16", "16-mixed")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    """One training run. None means "the method's default" until `resolve()` is called."""

    data: str = ""
    data_format: str = "auto"
    task: str | None = None
    output: str = "piggyback-model"
    method: str = "piggyback"
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    # Masking (piggyback); shared by every task of a model directory.
    mask_kind: str = "binary"
    threshold: float = 5e-3
    init: str = "ones"
    init_value: float = 1e-2
    task_norms: bool = False
    # Optimization.
    epochs: int = 30
    batch_size: int = 32
    image_size: int = 224
    optimizer: str | None = None
    lr: float | None = None
    lr_scores: float | None = None
    lr_head: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay_epochs: list[int] | None = None
    lr_decay_factor: float = 0.1
    # Data.
    val_fraction: float = 0.1
    strict: bool = False
    max_train_batches: int | None = None
    # Runtime.
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    precision: str = "32"
    channels_last: bool = True
    progress: bool = True
    tensorboard: bool = False
    download: bool = False

    def resolve(self) -> TrainConfig:
        """A copy with every method default filled in and every value checked."""
        cfg = dataclasses.replace(self)
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
        cfg.lr_decay_epochs = sorted(int(e) for e in cfg.lr_decay_epochs)
        cfg.check()
        return cfg

    def check(self) -> None:
        if not self.data:
            raise ValueError("no dataset given: pass --data PATH (or `data:` in the config file)")
        check_task_name(self.task or "")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
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


#: Options that may differ when a run is resumed: they do not change its result.
RESUMABLE_CHANGES = ("workers", "progress", "device", "tensorboard", "download", "channels_last")


def default_task_name(data: str) -> str:
    """The dataset folder's name, made a valid task name ('flowers102', 'gtsrb', ...)."""
    name = Path(data.rstrip("/")).name or "task"
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in name).lstrip("-")
    return cleaned[:64] or "task"


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


def merge_options(file_values: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """Config-file values overridden by the flags that were given (None = not given)."""
    given = {k: v for k, v in flags.items() if v is not None}
    return TrainConfig.from_dict({**file_values, **given})


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
        if k not in RESUMABLE_CHANGES and json.dumps(a[k]) != json.dumps(b[k])
    }
