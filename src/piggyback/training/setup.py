"""What a run is built from, and every check made before it writes anything.

A run that cannot succeed must fail before it creates its model directory or run folder: the
settings, the data, the backbone and its weights, an existing directory's backbone and mask
settings, and a checkpoint to resume are all checked here first (`Run.__init__` builds everything
from these functions without writing a file).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from piggyback.backbones import Backbone, create_backbone
from piggyback.config import PiggybackConfig
from piggyback.data import DatasetSplits, ImageDataset
from piggyback.errors import FingerprintMismatchError, PiggybackError
from piggyback.model import PiggybackModel
from piggyback.model_dir import CONFIG_NAME, read_model_config, task_file
from piggyback.preprocess import Preprocess
from piggyback.training.checkpoint import Checkpoint, read_checkpoint
from piggyback.training.distributed import EpochShuffle, Processes, Shard
from piggyback.training.recipe import TrainConfig, config_differences

CHECKPOINT = "checkpoint.safetensors"


class RunError(PiggybackError):
    """A run cannot start or continue as asked (existing task, nothing to resume, ...)."""


# -- seeding ------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- model and data -----------------------------------------------------------------------------


def prepare_model(cfg: TrainConfig, model_dir: Path) -> tuple[PiggybackModel, Backbone]:
    """A new model directory's model, or the existing one's (same backbone, same mask settings)."""
    backbone = create_backbone(cfg.backbone, weights=cfg.weights)
    if not (model_dir / CONFIG_NAME).exists():
        model = PiggybackModel(backbone.model, cfg.model_config(), backbone_spec=backbone.spec)
        return model, backbone
    index = read_model_config(model_dir)
    saved = index["config"]
    wanted = cfg.model_config().to_dict()
    different = {k: (saved[k], wanted[k]) for k in ("mask_kind", "threshold", "init", "init_value")}
    different = {k: v for k, v in different.items() if v[0] != v[1]}
    if different:
        raise RunError(
            f"{model_dir} holds tasks with other mask settings (saved, asked): {different}; "
            "use the same settings or another --output"
        )
    config = PiggybackConfig.from_dict(saved)
    model = PiggybackModel(backbone.model, config, backbone_spec=backbone.spec)
    _check_same_backbone(model, model_dir, index["backbone"])
    return model, backbone


def _check_same_backbone(model: PiggybackModel, model_dir: Path, saved: dict) -> None:
    """The directory's tasks were learned on exactly these weights (its spec vs this run's)."""
    if saved["fingerprint"] == model.fingerprint:
        return
    raise FingerprintMismatchError(
        f"{model_dir} holds tasks for backbone {saved.get('spec') or 'unnamed'} (weights "
        f"{saved['fingerprint']}), but this run asked for backbone {model.backbone_spec} "
        f"(weights {model.fingerprint}). A mask only works on the weights it was learned on: "
        "train with that --backbone / --weights, or into another --output"
    )


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader | None
    shuffle: EpochShuffle


def build_loaders(
    splits: DatasetSplits, preprocess: Preprocess, cfg: TrainConfig, processes: Processes
) -> Loaders:
    common = {"num_workers": cfg.workers, "pin_memory": torch.cuda.is_available()}

    def dataset(samples, *, train: bool) -> ImageDataset:
        # Cheap reduced-scale JPEG decoding for training images only: evaluation decodes in full,
        # exactly as `piggyback eval`, `predict` and exported models will see the images.
        return ImageDataset(
            samples,
            preprocess.transform(train=train),
            class_names=splits.class_names,
            strict=cfg.strict,
            draft_size=preprocess.resize_size if train else None,
        )

    def evaluation(samples) -> DataLoader:
        data = dataset(samples, train=False)
        return DataLoader(data, 2 * cfg.batch_size, sampler=Shard(len(data), processes), **common)

    train_set = dataset(splits.train, train=True)
    shuffle = EpochShuffle(len(train_set), processes)
    # A last batch of one image breaks batch norm in training mode: drop only that case.
    drop_last = len(shuffle) % cfg.batch_size == 1
    train = DataLoader(train_set, cfg.batch_size, sampler=shuffle, drop_last=drop_last, **common)
    test = evaluation(splits.test) if splits.test else None
    return Loaders(train, evaluation(splits.val), test, shuffle)


# -- starting or resuming ------------------------------------------------------------------------


def resumable_checkpoint(cfg: TrainConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint to resume from; refused if its settings would change the run's result
    (other than its learning rates, which may be lowered after a NaN loss, see `Run.resume`).

    The settings are compared with those stored in the checkpoint itself, not with config.yaml,
    so a checkpoint left by another run can never be continued by mistake.
    """
    if not (run_dir / CHECKPOINT).exists():
        raise RunError(f"nothing to resume: no {CHECKPOINT} in {run_dir}")
    meta, tensors = read_checkpoint(run_dir / CHECKPOINT)
    changed = config_differences(TrainConfig.from_dict(meta["config"]), cfg)
    if changed:
        raise RunError(
            f"--resume with other settings than the interrupted run (saved, asked): {changed}; "
            "resume with the same options (only learning rates may change), or start a new run "
            "with --overwrite"
        )
    return meta, tensors


def check_can_start(cfg: TrainConfig, model_dir: Path, run_dir: Path) -> None:
    if task_file(model_dir, cfg.task).exists():
        raise RunError(
            f"task {cfg.task!r} already exists in {model_dir}; choose another --task, "
            "or --overwrite to train it again"
        )
    if (run_dir / CHECKPOINT).exists():
        raise RunError(
            f"an unfinished run of task {cfg.task!r} is in {run_dir}; --resume to continue it, "
            "or --overwrite to start over"
        )


def clear_run(run_dir: Path) -> None:
    """--overwrite: remove what a previous run of this task left (its whole run folder, logs and
    TensorBoard events included), so nothing of it is resumed or mixed into the new run's logs."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
