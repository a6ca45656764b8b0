"""A whole training run: data, model, epochs, model selection on validation, saving.

`train(config)` learns one task and adds it to a model directory:
    <output>/piggyback_config.json, <output>/tasks/<task>.safetensors      (the model)
    <output>/runs/<task>/config.yaml, metrics.jsonl, metrics.csv, checkpoint.safetensors,
                         results.json, tensorboard/                          (the run)
The task kept is the epoch with the best validation top-1, never chosen on the test split; its test
accuracy is reported. Each epoch reseeds every random generator from (seed, epoch), so a run
resumed from its last checkpoint ends bit-identical to an uninterrupted one (on CPU).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from piggyback.backbones import Backbone, create_backbone
from piggyback.data import DatasetSplits, ImageDataset, load_splits, resize_size, transforms_for
from piggyback.errors import PiggybackError
from piggyback.fileio import write_json_atomic
from piggyback.model import PiggybackModel
from piggyback.model_dir import CONFIG_NAME, read_model_config, task_file
from piggyback.route_fit import fit_routing_profile, routing_batches
from piggyback.routing import RoutingProfile
from piggyback.taskfile import build_task_state, task_metadata, task_tensors
from piggyback.training.checkpoint import (
    Checkpoint,
    RunState,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from piggyback.training.distributed import EpochShuffle, Processes, Shard, start, stop
from piggyback.training.loop import NonFiniteLossError, Precision, evaluate, train_one_epoch
from piggyback.training.metrics_log import MetricsLog, format_epoch
from piggyback.training.optim import build_optimizer, build_scheduler
from piggyback.training.recipe import (
    TrainConfig,
    config_differences,
    write_config,
)

CHECKPOINT = "checkpoint.safetensors"


class RunError(PiggybackError):
    """A run cannot start or continue as asked (existing task, nothing to resume, ...)."""


@dataclass
class RunResult:
    task: str
    model_dir: Path
    run_dir: Path
    best_epoch: int
    val: dict[str, Any]
    test: dict[str, Any] | None
    density: float | None
    history: list[dict[str, Any]]

    @property
    def task_file(self) -> Path:
        return task_file(self.model_dir, self.task)


# -- seeding and devices ------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


# -- model and data -----------------------------------------------------------------------------


def preprocess_info(data_config: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The evaluation preprocessing a task is trained with (saved with the task)."""
    return {
        "image_size": image_size,
        "resize_size": resize_size(image_size),
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
        "interpolation": str(data_config.get("interpolation", "bilinear")),
    }


def prepare_model(cfg: TrainConfig, model_dir: Path) -> tuple[PiggybackModel, Backbone]:
    """A new model directory's model, or the existing one's (same backbone, same mask settings)."""
    backbone = create_backbone(cfg.backbone, weights=cfg.weights)
    if not (model_dir / CONFIG_NAME).exists():
        model = PiggybackModel(backbone.model, cfg.model_config(), backbone_spec=backbone.spec)
        return model, backbone
    saved = read_model_config(model_dir)["config"]
    wanted = cfg.model_config().to_dict()
    different = {k: (saved[k], wanted[k]) for k in ("mask_kind", "threshold", "init", "init_value")}
    different = {k: v for k, v in different.items() if v[0] != v[1]}
    if different:
        raise RunError(
            f"{model_dir} holds tasks with other mask settings (saved, asked): {different}; "
            "use the same settings or another --output"
        )
    model = PiggybackModel.from_pretrained(model_dir, backbone.model, tasks=[])
    model.backbone_spec = backbone.spec
    return model, backbone


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader | None
    shuffle: EpochShuffle


def build_loaders(
    splits: DatasetSplits, preprocess: dict[str, Any], cfg: TrainConfig, processes: Processes
) -> Loaders:
    common = {"num_workers": cfg.workers, "pin_memory": torch.cuda.is_available()}

    def dataset(samples, *, train: bool) -> ImageDataset:
        # Cheap reduced-scale JPEG decoding for training images only: evaluation decodes in full,
        # exactly as `piggyback eval`, `predict` and exported models will see the images.
        return ImageDataset(
            samples,
            transforms_for(preprocess, train=train),
            class_names=splits.class_names,
            strict=cfg.strict,
            draft_size=preprocess["resize_size"] if train else None,
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


# -- the run ------------------------------------------------------------------------------------


def _resumable_checkpoint(cfg: TrainConfig, run_dir: Path) -> Checkpoint:
    """The checkpoint to resume from; refused if its settings would change the run's result.

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
            "resume with the same options, or start a new run with --overwrite"
        )
    return meta, tensors


def _check_can_start(cfg: TrainConfig, model_dir: Path, run_dir: Path) -> None:
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


def _clear_run(run_dir: Path) -> None:
    """--overwrite: remove what a previous run of this task left (its whole run folder, logs and
    TensorBoard events included), so nothing of it is resumed or mixed into the new run's logs."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Learn one task on a dataset and add it to the model directory `config.output`.

    `resume` continues the interrupted run of this task from its checkpoint; `overwrite` starts
    the task afresh, replacing a finished or unfinished earlier run of it.
    """
    cfg = config.resolve()
    model_dir = Path(cfg.output)
    run_dir = model_dir / "runs" / cfg.task
    processes, device = start(resolve_device(cfg.device))
    try:
        checkpoint = _resumable_checkpoint(cfg, run_dir) if resume else None
        if checkpoint is None and not overwrite:
            _check_can_start(cfg, model_dir, run_dir)
        processes.barrier()  # every process has checked before the first one changes anything
        if processes.is_main:
            if overwrite and not resume:
                _clear_run(run_dir)
            write_config(cfg, run_dir / "config.yaml")
        run = Run(cfg, model_dir, run_dir, log, processes=processes, device=device)
        if checkpoint is not None:
            run.resume(checkpoint)
        return run.fit()
    finally:
        stop(processes)


def _silent(_: str) -> None:
    pass


class Run:
    """The objects of one run and the steps between them."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_dir: Path,
        run_dir: Path,
        log: Callable[[str], None],
        *,
        processes: Processes | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.processes = processes = processes or Processes()
        self.cfg, self.model_dir, self.run_dir = cfg, model_dir, run_dir
        self.log = log if processes.is_main else _silent
        self.checkpoint = run_dir / CHECKPOINT
        self.precision = Precision(cfg.precision, device or resolve_device(cfg.device))
        self.splits = load_splits(
            cfg.data,
            cfg.data_format,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            download=cfg.download,
        )
        seed_everything(cfg.seed)
        self.model, backbone = prepare_model(cfg, model_dir)
        self.model.add_task(
            cfg.task,
            self.splits.num_classes,
            method=cfg.method,
            class_names=self.splits.class_names,
            task_norms=cfg.task_norms,
            seed=cfg.seed,
        )
        self.model.set_task(cfg.task)
        self._place_model()
        self.preprocess = preprocess_info(backbone.data_config, cfg.image_size)
        self.loaders = build_loaders(self.splits, self.preprocess, cfg, processes)
        self.network = self.model  # what training calls: the model, or its DDP wrapper
        if processes.distributed:
            ids = [self.precision.device.index] if self.precision.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = self.precision.scaler()
        self.state = RunState()
        splits = self.splits
        where = f"{processes.world_size} processes" if processes.distributed else "1 process"
        self.log(
            f"task {cfg.task!r}: {cfg.method} on {splits.source} data, {splits.num_classes} "
            f"classes, {len(splits.train)} train / {len(splits.val)} val ({splits.val_origin}) / "
            f"{len(splits.test or [])} test images; backbone {cfg.backbone}, "
            f"{self.precision.device} x {where}, precision {cfg.precision}"
        )

    def _place_model(self) -> None:
        """On the run's device; channels-last layout, which makes convolutions 1.5x faster on
        CPU (EfficientNet-Lite0, 2 cores) and is what AMP on GPUs wants too."""
        self.model.to(self.precision.device)
        if self.cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def resume(self, checkpoint: Checkpoint | None = None) -> None:
        """Continue from this run's checkpoint; `checkpoint` is it already read (read if None)."""
        meta, tensors = checkpoint or read_checkpoint(self.checkpoint)
        parts = (self.model, self.optimizer, self.scheduler, self.scaler)
        self.state = restore_checkpoint(meta, tensors, *parts)
        self.log(f"resumed after epoch {self.state.epoch} from {self.checkpoint}")

    def fit(self) -> RunResult:
        main = self.processes.is_main
        metrics = MetricsLog(self.run_dir, tensorboard=self.cfg.tensorboard, enabled=main)
        metrics.rewrite(self.state.history)
        try:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                self.run_epoch(epoch)
                if main:
                    self.save_checkpoint()
                metrics.append(self.state.history[-1])
                self.log(format_epoch(self.state.history[-1], self.cfg.epochs))
        except NonFiniteLossError as error:
            raise NonFiniteLossError(
                f"{error}: training stopped. The last good checkpoint (after epoch "
                f"{self.state.epoch}) is kept at {self.checkpoint}; --resume from it with a "
                "lower learning rate, or use --precision 32"
            ) from error
        finally:
            metrics.close()
        return self.finish()

    def save_checkpoint(self) -> None:
        parts = (self.optimizer, self.scheduler, self.scaler)
        save_checkpoint(
            self.checkpoint, self.model, self.cfg.task, *parts, self.state, self.cfg.to_dict()
        )

    def _share_task_buffers(self) -> None:
        """Process 0's task buffers (e.g. batch-norm statistics) for every process.

        DDP keeps parameters equal, but running statistics follow each process's own batches;
        evaluating and saving must all use one model.
        """
        if self.processes.distributed:
            for buffer in self.model.task(self.cfg.task).buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _reduce(self):
        return self.processes.sum if self.processes.distributed else None

    def evaluate(self, loader: DataLoader) -> dict[str, Any]:
        return evaluate(
            self.model,
            loader,
            self.splits.num_classes,
            self.precision,
            progress=self.cfg.progress and self.processes.is_main,
            reduce=self._reduce(),
        )

    def run_epoch(self, epoch: int) -> None:
        """Train and validate one epoch; remember the task of the best validation epoch."""
        cfg, state = self.cfg, self.state
        seed = epoch_seed(cfg.seed, epoch)
        seed_everything(seed)
        self.loaders.shuffle.set_seed(seed)
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        stats = train_one_epoch(
            self.network,
            self.loaders.train,
            self.optimizer,
            self.precision,
            self.scaler,
            max_batches=cfg.max_train_batches,
            progress=cfg.progress and self.processes.is_main,
            description=f"epoch {epoch + 1}/{cfg.epochs}",
            reduce=self._reduce(),
        )
        self._share_task_buffers()
        val = self.evaluate(self.loaders.val)
        self.scheduler.step()
        record = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "train_top1": stats.accuracy,
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_loss": val["loss"],
            "density": self.model.overall_density(cfg.task),
            "lr": lrs,
            "images_per_second": stats.images_per_second,
            "seconds": stats.seconds,
        }
        state.history.append(record)
        state.epoch = epoch + 1
        if state.best is None or record["val_top1"] > state.best["val_top1"]:
            state.best = record
            tensors = task_tensors(self.model, cfg.task)
            state.best_task = (task_metadata(self.model, cfg.task, tensors), tensors)

    def finish(self) -> RunResult:
        """Keep the best validation epoch's task, test it, save it into the model directory."""
        cfg, model = self.cfg, self.model
        meta, tensors = self.state.best_task
        model.delete_task(cfg.task)
        source = Path(f"{self.checkpoint} (best epoch)")
        task_state = build_task_state(model, source, meta, tensors, cfg.task)
        model.install_task(task_state)
        model.set_task(cfg.task)
        self._place_model()
        val = self.evaluate(self.loaders.val)
        test = self.evaluate(self.loaders.test) if self.loaders.test is not None else None
        density = model.overall_density(cfg.task)
        best_epoch = self.state.best["epoch"]
        summary = {
            "best_epoch": best_epoch,
            "val_top1": val["top1"],
            "test_top1": test["top1"] if test else None,
            "test_top5": test["top5"] if test else None,
            "density": density,
        }
        task_state.metadata.preprocess = self.preprocess
        task_state.metadata.results = summary
        task_state.metadata.training = {
            "method": cfg.method,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "data": str(cfg.data),
            "data_format": cfg.data_format,
            "val_fraction": cfg.val_fraction,
            "val_split": self.splits.val_origin,
        }
        if self.processes.is_main:
            task_state.routing = self.routing_profile()
            model.save_pretrained(self.model_dir, tasks=[cfg.task])
            write_json_atomic(self.run_dir / "results.json", {**summary, "val": val, "test": test})
        self.processes.barrier()  # the files exist for every process once train() returns
        history = self.state.history
        result = RunResult(
            cfg.task, self.model_dir, self.run_dir, best_epoch, val, test, density, history
        )
        self.log(_summary_line(result))
        return result

    def routing_profile(self) -> RoutingProfile:
        """Prototypes for `tasks="auto"` from the training images (see piggyback.routing)."""
        cfg = self.cfg
        batches = routing_batches(
            self.splits.train, self.preprocess, batch_size=2 * cfg.batch_size, workers=cfg.workers
        )
        return fit_routing_profile(self.model, batches, self.preprocess)


def _summary_line(result: RunResult) -> str:
    test = result.test
    tested = (
        f"test top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}%" if test else "no test split"
    )
    on = f", {result.density:.1%} of weights on" if result.density is not None else ""
    return (
        f"best epoch {result.best_epoch} (val top-1 {result.val['top1']:.2f}%): {tested}{on}; "
        f"saved {result.task_file}"
    )
