"""`piggyback train`'s options: generated from TrainConfig's fields and validated before anything
runs, whether they come from flags or from a config file."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main
from typer.testing import CliRunner

import piggyback.training
from piggyback.cli import app
from piggyback.options import flag_name
from piggyback.training import TrainConfig

runner = CliRunner()

#: Every flag `piggyback train` had when each option was written three times: none may go.
FLAGS_BEFORE = {
    "--data", "--config", "--task", "--output", "--method", "--backbone", "--weights",
    "--data-format", "--epochs", "--batch-size", "--image-size", "--optimizer", "--lr",
    "--lr-scores", "--lr-head", "--momentum", "--weight-decay", "--lr-decay-epochs",
    "--lr-decay-factor", "--mask-kind", "--threshold", "--init", "--init-value", "--task-norms",
    "--frozen-norms", "--head-dtype", "--val-fraction", "--strict", "--max-train-batches",
    "--seed", "--workers",
    "--device", "--precision", "--progress", "--no-progress", "--channels-last",
    "--no-channels-last", "--tensorboard", "--download", "--resume", "--overwrite",
}  # fmt: skip


def train_command():
    return typer.main.get_command(app).commands["train"]


@pytest.fixture
def captured(monkeypatch) -> list[TrainConfig]:
    """The configs `piggyback train` would run with; nothing is trained."""
    configs: list[TrainConfig] = []

    def fake_train(config, **_):
        configs.append(config)
        raise typer.Exit(0)

    monkeypatch.setattr(piggyback.training, "train", fake_train)
    return configs


def test_every_training_option_is_a_flag_with_its_fields_help():
    params = {p.name: p for p in train_command().params}
    flags = {flag for p in params.values() for flag in (*p.opts, *p.secondary_opts)}
    assert flags == FLAGS_BEFORE
    for field in dataclasses.fields(TrainConfig):
        spec = field.metadata["option"]
        assert flag_name(field.name, spec) in params[field.name].opts
        assert params[field.name].help.startswith(spec.help)


def test_flags_and_config_file_keys_give_the_same_config(captured, tmp_path):
    flags = [
        "--data", "d", "--lr", "0.5", "--lr-decay-epochs", "3,5", "--task-norms", "--strict",
        "--no-progress", "--batch-size", "4",
    ]  # fmt: skip
    assert runner.invoke(app, ["train", *flags]).exit_code == 0
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: d\nlr: 0.5\nlr-decay-epochs: [3, 5]\ntask_norms: true\nstrict: true\n"
        "progress: false\nbatch_size: 8\n"
    )
    # A flag overrides the file; a YAML number written without a dot (1e-3) is still a number.
    args = ["train", "--config", config, "--batch-size", "4"]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    assert captured[0] == captured[1]
    assert (captured[0].lr, captured[0].lr_decay_epochs, captured[0].batch_size) == (0.5, [3, 5], 4)
    config.write_text("data: d\nlr: 1e-3\n")
    assert runner.invoke(app, ["train", "--config", str(config)]).exit_code == 0
    assert captured[2].lr == 0.001


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "1e40"),
        ("--lr-scores", "0"),
        ("--lr-head", "-inf"),
        ("--momentum", "1.5"),
        ("--weight-decay", "-0.1"),
        ("--lr-decay-factor", "nan"),
        ("--threshold", "nan"),
        ("--init-value", "inf"),
        ("--val-fraction", "1"),
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--image-size", "0"),
        ("--workers", "-1"),
        ("--seed", "-1"),
        ("--max-train-batches", "0"),
        ("--lr-decay-epochs", "0,5"),
    ],
)
def test_a_numeric_option_out_of_range_is_refused_before_anything_runs(
    captured, tmp_path, flag, value
):
    output = tmp_path / "model"
    result = runner.invoke(app, ["train", "--data", "d", "--output", str(output), flag, value])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} must be"), result.output
    assert not captured and not output.exists()


def test_a_config_file_value_out_of_range_is_named_with_its_file(captured, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: d\nlr: .nan\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and not captured
    assert f"error: lr (in {config}) must be a finite number > 0" in result.output
    config.write_text("data: d\nepochs: three\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and f"epochs (in {config}) must be a whole number" in result.output


def test_the_python_api_checks_the_same_ranges():
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0 and <= 10, got nan"):
        TrainConfig(data="d", lr=float("nan")).resolve()
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        TrainConfig(data="d", batch_size=2.5).resolve()


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "m", "x.jpg", "--task", "t", "--top-k", "0"],
        ["eval", "m", "--task", "t", "--data", "d", "--batch-size", "0"],
        ["export", "m", "--task", "t", "--image-size", "0"],
    ],
)
def test_other_commands_refuse_out_of_range_counts(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Invalid value" in result.output


def test_the_command_line_starts_without_the_data_and_training_stacks():
    """Building train's flags from TrainConfig must not import torchvision, timm or scipy:
    they made `piggyback --help`, `--version` and `info` 2.6x slower to start."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, piggyback.cli; "
        "print([m for m in ('torchvision', 'timm', 'scipy', 'piggyback.training.run') "
        "if m in sys.modules])"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_ctrl_c_says_interrupted_and_only_train_mentions_resume(capsys):
    import typer

    from piggyback.cli import friendly_errors

    def train() -> None:
        raise KeyboardInterrupt

    def serve() -> None:
        raise KeyboardInterrupt

    for command, expected in (
        (train, "error: interrupted; the run continues from its last epoch with --resume"),
        (serve, "error: interrupted"),
    ):
        with pytest.raises(typer.Exit) as stopped:
            friendly_errors(command)()
        assert stopped.value.exit_code == 130
        assert capsys.readouterr().err.strip() == expected
