"""piggyback: adapt one frozen pretrained network to many tasks by learning a binary mask per task.

Mallya, Davis & Lazebnik, "Piggyback: Adapting a Single Network to Multiple Tasks by Learning to
Mask Weights", ECCV 2018 (arXiv 1801.06519).

    import piggyback, timm
    model = piggyback.PiggybackModel(timm.create_model("resnet50", pretrained=True))
    model.add_task("flowers", num_classes=102)
    model.set_task("flowers")
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
"""

__version__ = "0.1.0"

from piggyback.config import PiggybackConfig
from piggyback.errors import (
    FingerprintMismatchError,
    PiggybackError,
    TaskError,
    TaskFileError,
    UnsupportedModelError,
)
from piggyback.model import PiggybackModel
from piggyback.norms import register_norm_type
from piggyback.predictor import Predictor, TaskPrediction

__all__ = [
    "FingerprintMismatchError",
    "PiggybackConfig",
    "PiggybackError",
    "PiggybackModel",
    "Predictor",
    "TaskError",
    "TaskFileError",
    "TaskPrediction",
    "UnsupportedModelError",
    "__version__",
    "register_norm_type",
]
