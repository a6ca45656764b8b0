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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from piggyback.data import load_splits
from piggyback.destination import check_writable_dir
from piggyback.device import Precision, resolve_device
from piggyback.evaluation import evaluate
from piggyback.fileio import write_json_atomic
from piggyback.model_dir import task_file
from piggyback.preprocess import Preprocess
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
from piggyback.training.distributed import Processes, start, stop
from piggyback.training.loop import NonFiniteLossError, train_one_epoch
from piggyback.training.metrics_log import MetricsLog, format_epoch
from piggyback.training.optim import build_optimizer, build_scheduler, change_learning_rates
from piggyback.training.recipe import TrainConfig, write_config
from piggyback.training.setup import (
    CHECKPOINT,
    RunError,
    build_loaders,
    check_can_start,
    clear_run,
    epoch_seed,
    prepare_model,
    resumable_checkpoint,
    seed_everything,
)

__all__ = ["CHECKPOINT", "Run", "RunError", "RunResult", "train"]


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


# -- the run ------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Learn one task on a dataset and add it to the model directory `config.output`.

    `resume` continues the interrupted run of this task from its checkpoint (with other learning
    rates if asked); `overwrite` starts the task afresh, replacing a finished or unfinished
    earlier run of it. Nothing is written before the settings, the destination, the data, the
    backbone and the model directory have all been checked.
    """
    cfg = config.resolve()
    model_dir = Path(cfg.output)
    run_dir = model_dir / "runs" / cfg.task
    check_writable_dir(model_dir, "the model")
    processes, device = start(resolve_device(cfg.device))
    if config.task is None and processes.is_main:
        log(f"task name {cfg.task!r} (from the dataset's folder name; --task to choose another)")
    try:
        checkpoint = resumable_checkpoint(cfg, run_dir) if resume else None
        if checkpoint is None and not overwrite:
            check_can_start(cfg, model_dir, run_dir)
        run = Run(cfg, model_dir, run_dir, log, processes=processes, device=device)
        processes.barrier()  # every process has checked before the first one changes anything
        if processes.is_main:
            if overwrite and not resume:
                clear_run(run_dir)
            write_config(cfg, run_dir / "config.yaml")
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
        self.preprocess = Preprocess.from_data_config(backbone.data_config, cfg.image_size)
        self.loaders = build_loaders(self.splits, self.preprocess, cfg, processes)
        self.network = self.model  # what training calls: the model, or its DDP wrapper
        if processes.distributed:
            ids = [self.precision.device.index] if self.precision.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = self.precision.scaler()
        self.state = RunState()
        self.lr_changes: dict[str, tuple[float, float]] = {}
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
        changed = change_learning_rates(self.optimizer, self.scheduler, self.cfg)
        if changed:
            self.lr_changes = changed  # recorded with the next epoch's metrics
            shown = ", ".join(f"{name} {old:g} -> {new:g}" for name, (old, new) in changed.items())
            self.log(f"learning rates changed on resume: {shown}")

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
            raise NonFiniteLossError(f"{error}: training stopped. {self._nan_advice()}") from error
        finally:
            metrics.close()
        return self.finish()

    def _nan_advice(self) -> str:
        """What to do after a NaN / infinite loss, true to what is on disk."""
        lower = (
            f"a lower learning rate (--lr, --lr-scores, --lr-head; e.g. --lr {self.cfg.lr / 10:g})"
        )
        precision = " or --precision 32" if self.cfg.precision != "32" else ""
        if self.state.epoch == 0:
            return (
                "No epoch was completed, so there is no checkpoint: train again with "
                f"{lower}{precision}"
            )
        return (
            f"The last good checkpoint (after epoch {self.state.epoch}) is kept at "
            f"{self.checkpoint}: continue from it with --resume and {lower}{precision}"
        )

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
        if self.lr_changes:
            record["lr_changed"] = {name: list(pair) for name, pair in self.lr_changes.items()}
            self.lr_changes = {}
        state.history.append(record)
        state.epoch = epoch + 1
        if state.best is None or record["val_top1"] > state.best["val_top1"]:
            state.best = record
            # Packed: cheap to write at every new best epoch; the saved task file is coded.
            tensors, coding = task_tensors(self.model, cfg.task, codec="packed")
            state.best_task = (task_metadata(self.model, cfg.task, tensors, coding), tensors)

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
        task_state.metadata.preprocess = self.preprocess.to_dict()
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
            model.save_pretrained(self.model_dir, tasks=[cfg.task], head_dtype=cfg.head_dtype)
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
        preprocess = self.preprocess.to_dict()
        batches = routing_batches(
            self.splits.train, preprocess, batch_size=2 * cfg.batch_size, workers=cfg.workers
        )
        return fit_routing_profile(self.model, batches, preprocess)


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
