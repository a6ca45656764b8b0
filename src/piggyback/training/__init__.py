"""Training and evaluation: the paper's recipe, its baselines, checkpoints and model selection.

Attributes are imported on first use (`piggyback.lazy`), so that the command line can read the
recipe's options without importing the whole training stack.
"""

from piggyback.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "piggyback.training.loop": (
            "NonFiniteLossError",
            "Precision",
            "evaluate",
            "train_one_epoch",
        ),
        "piggyback.training.recipe": ("TrainConfig", "merge_options", "read_config_file"),
        "piggyback.training.run": ("Run", "RunError", "RunResult", "train"),
    },
)
