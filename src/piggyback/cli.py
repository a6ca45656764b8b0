"""The `piggyback` command: train, eval, predict, info, export, serve.

Each command is a thin layer over the library: it parses options, calls one library function and
prints its result. Library errors (PiggybackError) and bad options become one clear line on stderr
and exit status 2, not a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer

from piggyback.errors import PiggybackError
from piggyback.serving.command import serve_command

app = typer.Typer(
    name="piggyback",
    help="Adapt one frozen pretrained network to many tasks by learning a binary mask per task.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def friendly_errors(command: Callable) -> Callable:
    """Library errors and bad values as one readable line; Ctrl-C as a hint to resume."""

    @wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (PiggybackError, ValueError, FileNotFoundError) as error:
            _fail(str(error))
        except KeyboardInterrupt:
            _fail("interrupted; a training run continues from its last epoch with --resume", 130)

    return run


def _decay_epochs(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--lr-decay-epochs takes comma-separated epochs, got {text!r}") from error


Opt = typer.Option

#: Help of the train options (kept apart so the signature stays readable).
HELP = {
    "data": "Dataset: ImageFolder root, list file/folder, or a paper dataset's official layout.",
    "config": "YAML or TOML file of options; flags override it.",
    "task": "Task name (default: the dataset folder's name).",
    "output": "Model directory to create or add the task to (default: piggyback-model).",
    "method": "piggyback | finetune | classifier (default: piggyback).",
    "backbone": "efficientnet_lite0 (offline), timm:NAME or torchvision:NAME.",
    "weights": "Local backbone state dict (.safetensors, or .pt/.pth loaded weights-only).",
    "data_format": "auto | imagefolder | list | classfolders | cub | cars | flowers102 | "
    "sketch | wikiart.",
    "epochs": "(default: 30)",
    "batch_size": "(default: 32)",
    "image_size": "Crop size (default: 224); resize is 256/224 of it.",
    "optimizer": "adam | sgd (default: adam for piggyback, sgd for the baselines).",
    "lr": "Learning rate (default: 1e-4 piggyback, 1e-3 baselines).",
    "lr_scores": "Learning rate of the mask scores (default: --lr).",
    "lr_head": "Learning rate of the head (and task norms) (default: --lr).",
    "momentum": "SGD momentum (default: 0.9).",
    "weight_decay": "(default: 0)",
    "lr_decay_epochs": "Epochs (comma-separated) where the lr is multiplied by --lr-decay-factor "
    "(default: half the epochs; none for classifier).",
    "lr_decay_factor": "(default: 0.1)",
    "mask_kind": "binary | ternary (default: binary).",
    "threshold": "(default: 5e-3)",
    "init": "ones | uniform score initialisation (default: ones).",
    "init_value": "(default: 1e-2)",
    "task_norms": "Own normalization per task, trained (default: frozen).",
    "val_fraction": "Share of train held out as val when the data has no val split (default: 0.1).",
    "strict": "Fail on unreadable images instead of skipping them.",
    "max_train_batches": "Stop each epoch after this many batches (quick runs).",
    "seed": "(default: 0)",
    "workers": "Data loading processes (default: 2).",
    "device": "auto | cpu | cuda | cuda:N (default: auto).",
    "precision": "32 | bf16 | 16-mixed (default: 32).",
    "progress": "Progress bars.",
    "channels_last": "Channels-last memory layout (faster convolutions) (default: on).",
    "tensorboard": "Also log to TensorBoard.",
    "download": "Download flowers102 / cars with torchvision when missing.",
    "resume": "Continue the interrupted run of this task.",
    "overwrite": "Train the task again, replacing it.",
}


@app.command()
@friendly_errors
def train(
    data: Annotated[str | None, Opt(help=HELP["data"])] = None,
    config: Annotated[Path | None, Opt(help=HELP["config"])] = None,
    task: Annotated[str | None, Opt(help=HELP["task"])] = None,
    output: Annotated[str | None, Opt(help=HELP["output"])] = None,
    method: Annotated[str | None, Opt(help=HELP["method"])] = None,
    backbone: Annotated[str | None, Opt(help=HELP["backbone"])] = None,
    weights: Annotated[str | None, Opt(help=HELP["weights"])] = None,
    data_format: Annotated[str | None, Opt(help=HELP["data_format"])] = None,
    epochs: Annotated[int | None, Opt(help=HELP["epochs"])] = None,
    batch_size: Annotated[int | None, Opt(help=HELP["batch_size"])] = None,
    image_size: Annotated[int | None, Opt(help=HELP["image_size"])] = None,
    optimizer: Annotated[str | None, Opt(help=HELP["optimizer"])] = None,
    lr: Annotated[float | None, Opt(help=HELP["lr"])] = None,
    lr_scores: Annotated[float | None, Opt(help=HELP["lr_scores"])] = None,
    lr_head: Annotated[float | None, Opt(help=HELP["lr_head"])] = None,
    momentum: Annotated[float | None, Opt(help=HELP["momentum"])] = None,
    weight_decay: Annotated[float | None, Opt(help=HELP["weight_decay"])] = None,
    lr_decay_epochs: Annotated[str | None, Opt(help=HELP["lr_decay_epochs"])] = None,
    lr_decay_factor: Annotated[float | None, Opt(help=HELP["lr_decay_factor"])] = None,
    mask_kind: Annotated[str | None, Opt(help=HELP["mask_kind"])] = None,
    threshold: Annotated[float | None, Opt(help=HELP["threshold"])] = None,
    init: Annotated[str | None, Opt(help=HELP["init"])] = None,
    init_value: Annotated[float | None, Opt(help=HELP["init_value"])] = None,
    task_norms: Annotated[
        bool | None, Opt("--task-norms/--frozen-norms", help=HELP["task_norms"])
    ] = None,
    val_fraction: Annotated[float | None, Opt(help=HELP["val_fraction"])] = None,
    strict: Annotated[bool | None, Opt("--strict", help=HELP["strict"])] = None,
    max_train_batches: Annotated[int | None, Opt(help=HELP["max_train_batches"])] = None,
    seed: Annotated[int | None, Opt(help=HELP["seed"])] = None,
    workers: Annotated[int | None, Opt(help=HELP["workers"])] = None,
    device: Annotated[str | None, Opt(help=HELP["device"])] = None,
    precision: Annotated[str | None, Opt(help=HELP["precision"])] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress", help=HELP["progress"])] = None,
    channels_last: Annotated[
        bool | None, Opt("--channels-last/--no-channels-last", help=HELP["channels_last"])
    ] = None,
    tensorboard: Annotated[bool | None, Opt("--tensorboard", help=HELP["tensorboard"])] = None,
    download: Annotated[bool | None, Opt("--download", help=HELP["download"])] = None,
    resume: Annotated[bool, Opt("--resume", help=HELP["resume"])] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help=HELP["overwrite"])] = False,
) -> None:
    """Learn one task on a dataset and save it into a model directory."""
    options = dict(locals())  # every option, None where not given (first, before other names)
    from piggyback.training import merge_options, read_config_file
    from piggyback.training import train as run_training

    flags = {k: v for k, v in options.items() if k not in ("config", "resume", "overwrite")}
    flags["lr_decay_epochs"] = _decay_epochs(lr_decay_epochs)
    file_values = read_config_file(config) if config else {}
    cfg = merge_options(file_values, flags)
    result = run_training(cfg, resume=resume, overwrite=overwrite, log=typer.echo)
    if result.test is not None:
        typer.echo(f"test top-1: {result.test['top1']:.2f}%")


@app.command("eval")
@friendly_errors
def eval_command(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    task: Annotated[str, Opt(help="Task to evaluate.")],
    data: Annotated[str, Opt(help="Dataset (same forms as for train).")],
    split: Annotated[str, Opt(help="test | val | train.")] = "test",
    data_format: Annotated[str, Opt(help="Dataset layout (see train).")] = "auto",
    output: Annotated[
        Path | None, Opt(help="JSON file (default: MODEL_DIR/runs/TASK/eval-SPLIT.json).")
    ] = None,
    batch_size: Annotated[int, Opt()] = 64,
    workers: Annotated[int, Opt()] = 2,
    device: Annotated[str, Opt()] = "auto",
    precision: Annotated[str, Opt()] = "32",
    per_class: Annotated[
        bool, Opt("--per-class/--no-per-class", help="Print per-class accuracy.")
    ] = True,
    progress: Annotated[bool, Opt("--progress/--no-progress")] = True,
) -> None:
    """Top-1, top-5 and per-class accuracy of a saved task on a dataset split (printed and JSON)."""
    from piggyback.evaluation import evaluate_task, format_evaluation

    result = evaluate_task(
        model_dir,
        task,
        data,
        split=split,
        data_format=data_format,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        progress=progress,
    )
    path = output or model_dir / "runs" / task / f"eval-{split}.json"
    from piggyback.fileio import write_json_atomic

    write_json_atomic(path, result)
    typer.echo(format_evaluation(result, per_class=per_class))
    typer.echo(f"written to {path}")


@app.command()
@friendly_errors
def predict(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    task: Annotated[
        list[str],
        Opt(
            help="Task whose classes to predict; 'auto' picks each image's task; repeat for "
            "several tasks' answers."
        ),
    ],
    top_k: Annotated[int, Opt(help="Classes per image.")] = 5,
    batch_size: Annotated[int, Opt()] = 32,
    device: Annotated[str, Opt()] = "auto",
    as_json: Annotated[bool, Opt("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Top-k class names with probabilities for images, from saved tasks (or routed: auto)."""
    from piggyback.predict import predict_files
    from piggyback.predictor import AUTO, Predictor

    load = None if AUTO in task else list(dict.fromkeys(task))  # auto may pick any task
    predictor = Predictor.from_pretrained(model_dir, device=device, tasks=load)
    found = predict_files(predictor, images, task, top_k=top_k, batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps([{"path": str(p)} | a.to_dict() for p, a in found], indent=2))
        return
    for path, answer in found:
        ranked = ", ".join(f"{name} {prob:.1%}" for name, prob in answer.top)
        if task == [answer.task]:  # one named task: the plain form
            typer.echo(f"{path}: {ranked}")
        elif answer.routed:
            typer.echo(f"{path} [{answer.task}, routed {answer.confidence:.0%}]: {ranked}")
        else:
            typer.echo(f"{path} [{answer.task}]: {ranked}")


@app.command("route-fit")
@friendly_errors
def route_fit(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    task: Annotated[str, Opt(help="Task to add routing prototypes to.")],
    data: Annotated[str, Opt(help="Images of the task (same forms as for train; train split).")],
    data_format: Annotated[str, Opt(help="Dataset layout (see train).")] = "auto",
    max_images: Annotated[int, Opt(help="Images used at most (stratified by class).")] = 2000,
    batch_size: Annotated[int, Opt()] = 64,
    workers: Annotated[int, Opt()] = 2,
    device: Annotated[str, Opt()] = "auto",
) -> None:
    """Add routing prototypes (what --task auto compares images with) to a saved task."""
    from piggyback.model import PiggybackModel
    from piggyback.route_fit import fit_routing_from_data
    from piggyback.training.run import resolve_device

    model = PiggybackModel.from_pretrained(model_dir, tasks=[task]).to(resolve_device(device))
    profile = fit_routing_from_data(
        model,
        task,
        data,
        data_format=data_format,
        max_images=max_images,
        batch_size=batch_size,
        workers=workers,
    )
    model.save_pretrained(model_dir, tasks=[task])
    described = profile.describe()
    typer.echo(
        f"task {task!r}: {described['prototypes']} routing prototypes from {profile.images} "
        f"images ({described['bytes'] / 1024:.1f} KiB) saved in {model_dir}"
    )


@app.command()
@friendly_errors
def info(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Per-layer mask density.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Backbone, fingerprint, tasks, classes, bytes on disk and mask density of a model folder."""
    from piggyback.describe import describe_model_dir, format_description

    description = describe_model_dir(model_dir)
    if as_json:
        typer.echo(json.dumps(description, indent=2, default=str))
    else:
        typer.echo(format_description(description, verbose=verbose))


@app.command()
@friendly_errors
def export(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    task: Annotated[str, Opt(help="Task to export.")],
    output: Annotated[Path | None, Opt(help="Folder (default: MODEL_DIR/export).")] = None,
    format: Annotated[
        list[str] | None,
        Opt(
            "--format",
            "-f",
            help="onnx | torchscript | exported (torch.export .pt2); repeat for several.",
        ),
    ] = None,
    image_size: Annotated[int | None, Opt(help="Example input size (default: the task's).")] = None,
) -> None:
    """A task merged into a plain model (no piggyback needed to run it), as ONNX / TorchScript."""
    from piggyback.export import export_task
    from piggyback.model import PiggybackModel

    model = PiggybackModel.from_pretrained(model_dir, tasks=[task])
    formats = tuple(format or ["onnx"])
    written = export_task(
        model, task, output or model_dir / "export", formats=formats, image_size=image_size
    )
    for kind, path in written.items():
        typer.echo(f"{kind}: {path}")


app.command("serve")(friendly_errors(serve_command))


@app.callback()
def _setup() -> None:
    """Adapt one frozen pretrained network to many tasks by learning a binary mask per task."""
    from piggyback.runtime import tune_allocator

    tune_allocator()


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="piggyback")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
