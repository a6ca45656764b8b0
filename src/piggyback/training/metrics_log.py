"""Per-epoch metrics: a JSONL log, a CSV of the same, optional TensorBoard, and the printed line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from piggyback.errors import PiggybackError
from piggyback.fileio import write_atomic


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """Nested values (the per-group learning rates) as 'lr/scores' columns."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


class MetricsLog:
    """metrics.jsonl and metrics.csv in the run folder, rewritten from the run's history.

    Rewriting from the checkpointed history (rather than only appending) keeps the logs equal to
    the checkpoint after an interruption between the two writes.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled  # False in all but the first of several processes
        self.history: list[dict[str, Any]] = []
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise PiggybackError(
                    "--tensorboard needs the tensorboard package: "
                    "pip install 'piggyback[tensorboard]'"
                ) from error
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def rewrite(self, history: list[dict[str, Any]]) -> None:
        self.history = list(history)
        self._write()

    def append(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._write()
        if self.writer is not None:
            for key, value in _flat(record).items():
                if isinstance(value, int | float) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def _write(self) -> None:
        if not self.enabled:
            return
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        write_atomic(self.run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
        rows = [_flat(r) for r in self.history]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.run_dir / "metrics.csv", lambda tmp: tmp.write_text(buffer.getvalue()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch: loss, accuracies, mask density, learning rate, throughput."""
    density = record.get("density")
    lr = "/".join(f"{v:.0e}" for v in record["lr"].values())
    parts = [
        f"epoch {record['epoch']:>3}/{epochs}",
        f"loss {record['train_loss']:.3f}",
        f"train {record['train_top1']:5.1f}%",
        f"val {record['val_top1']:5.1f}% (top-5 {record['val_top5']:5.1f}%)",
        f"density {density:6.1%}" if density is not None else "",
        f"lr {lr}",
        f"{record['images_per_second']:.0f} img/s",
    ]
    return "  ".join(p for p in parts if p)
