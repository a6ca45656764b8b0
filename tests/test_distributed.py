"""Two training processes (torchrun, gloo on CPU): the same code path multi-GPU runs take."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from piggyback import PiggybackModel
from piggyback.evaluation import evaluate_task

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["piggyback", "finetune"])
def test_torchrun_two_processes_train_one_task(tiny_data, tiny_weights, tmp_path, method):
    output = tmp_path / "model"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "piggyback.cli", "train",
        "--data", str(tiny_data), "--task", "colours", "--output", str(output),
        "--backbone", "timm:test_efficientnet", "--weights", str(tiny_weights),
        "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--lr", "1e-2",
        "--workers", "0", "--device", "cpu", "--no-progress", "--method", method,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("epoch   2/2") == 1  # only the first process logs
    assert "x 2 processes" in done.stdout
    results = json.loads((output / "runs/colours/results.json").read_text())
    assert results["val"]["images"] == 9 and results["test"]["images"] == 9  # shards summed
    model = PiggybackModel.from_pretrained(output, tasks=["colours"])
    assert model.task("colours").metadata.results["test_top1"] == results["test_top1"]
    # The sharded evaluation of both processes equals one process evaluating the saved task:
    # they all held process 0's weights and batch-norm statistics.
    alone = evaluate_task(output, "colours", tiny_data, split="val", workers=0, progress=False)
    assert alone["loss"] == pytest.approx(results["val"]["loss"], rel=1e-5)
