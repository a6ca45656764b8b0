"""Training and evaluation: the paper's recipe, its baselines, checkpoints and model selection."""

from piggyback.training.loop import NonFiniteLossError, Precision, evaluate, train_one_epoch
from piggyback.training.recipe import TrainConfig, merge_options, read_config_file
from piggyback.training.run import Run, RunError, RunResult, train

__all__ = [
    "NonFiniteLossError",
    "Precision",
    "Run",
    "RunError",
    "RunResult",
    "TrainConfig",
    "evaluate",
    "merge_options",
    "read_config_file",
    "train",
    "train_one_epoch",
]
