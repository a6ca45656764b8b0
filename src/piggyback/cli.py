"""The `piggyback` command: train, eval, predict, info, repair, convert, route-fit, export, serve.

Each command is a thin layer over the library: it parses options, calls one library function and
prints its result. Library errors (PiggybackError) and bad options become one clear line on stderr
and exit status 2, not a traceback.
"""

from __future__ import annotations

import errno
import inspect
import json
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from piggyback.cli_signature import options_signature, parsed, with_signature
from piggyback.errors import PiggybackError
from piggyback.serving.command import serve_command
from piggyback.training.recipe import TrainConfig

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


#: What to do about the file-system errors a user can fix.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some space and run again (no file was left half-written)",
    errno.EDQUOT: "free some space and run again (no file was left half-written)",
    errno.EROFS: "choose an output on a writable file system",
    errno.EACCES: "check the permissions, or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
}


def _os_error_line(error: OSError) -> str:
    """`[Errno 28] No space left on device: 'x'` as 'No space left on device: x; <advice>'."""
    where = f": {error.filename}" if error.filename else ""
    text = f"{error.strerror}{where}" if error.strerror else str(error)
    advice = _OS_ERROR_ADVICE.get(error.errno)
    return f"{text}; {advice}" if advice else text


def friendly_errors(command: Callable) -> Callable:
    """Library errors, bad values and file-system failures as one readable line (exit 2);
    Ctrl-C as a hint to resume."""

    @wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (PiggybackError, ValueError) as error:
            _fail(str(error))
        except OSError as error:
            _fail(_os_error_line(error))
        except KeyboardInterrupt:
            resume = "; the run continues from its last epoch with --resume"
            _fail("interrupted" + (resume if command.__name__ == "train" else ""), 130)

    return run


Opt = typer.Option

#: `piggyback train`'s options: every TrainConfig field (help, flag and range declared there), the
#: config file after --data, and the two ways to treat an earlier run of the task at the end.
TRAIN_SIGNATURE = options_signature(
    TrainConfig,
    first=["data"],
    before=[
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                Opt(
                    help="YAML or TOML file of options (the keys are the flags' names); flags "
                    "override it.",
                    show_default=False,
                    rich_help_panel="Run",
                ),
            ],
        )
    ],
    after=[
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, Opt(f"--{name}", help=text, rich_help_panel="Run")],
        )
        for name, text in (
            ("resume", "Continue the interrupted run of this task (learning rates may change)."),
            ("overwrite", "Train the task again, replacing it."),
        )
    ],
)


@app.command()
@with_signature(TRAIN_SIGNATURE)
@friendly_errors
def train(
    *, config: Path | None = None, resume: bool = False, overwrite: bool = False, **flags: Any
) -> None:
    """Learn one task on a dataset and save it into a model directory."""
    from piggyback.training import merge_options, read_config_file
    from piggyback.training import train as run_training

    file_values = read_config_file(config) if config else {}
    cfg = merge_options(file_values, parsed(TrainConfig, flags), source=str(config))
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
    batch_size: Annotated[int, Opt(min=1, max=65_536)] = 64,
    workers: Annotated[int, Opt(min=0, max=1024)] = 2,
    device: Annotated[str, Opt()] = "auto",
    precision: Annotated[str, Opt()] = "32",
    per_class: Annotated[
        bool, Opt("--per-class/--no-per-class", help="Print per-class accuracy.")
    ] = True,
    progress: Annotated[bool, Opt("--progress/--no-progress")] = True,
) -> None:
    """Top-1, top-5 and per-class accuracy of a saved task on a dataset split (printed and JSON)."""
    from piggyback.destination import check_writable_file
    from piggyback.evaluation import evaluate_task, format_evaluation

    path = check_writable_file(output or model_dir / "runs" / task / f"eval-{split}.json")
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
    top_k: Annotated[int, Opt(help="Classes per image.", min=1)] = 5,
    batch_size: Annotated[int, Opt(min=1, max=65_536)] = 32,
    device: Annotated[str, Opt()] = "auto",
    as_json: Annotated[bool, Opt("--json", help="Print JSON instead of text.")] = False,
    batch_invariant: Annotated[
        bool, Opt(help="Each image's answer exactly as if it ran alone (CPU; slower).")
    ] = False,
) -> None:
    """Top-k class names with probabilities for images, from saved tasks (or routed: auto)."""
    from piggyback.predict import predict_files
    from piggyback.predictor import AUTO, Predictor

    task = list(dict.fromkeys(task))  # a task asked for twice is answered once
    load = None if AUTO in task else task  # auto may pick any task
    predictor = Predictor.from_pretrained(
        model_dir, device=device, tasks=load, batch_invariant=batch_invariant
    )
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
    max_images: Annotated[
        int, Opt(help="Images used at most (stratified by class).", min=1)
    ] = 2000,
    batch_size: Annotated[int, Opt(min=1, max=65_536)] = 64,
    workers: Annotated[int, Opt(min=0, max=1024)] = 2,
    device: Annotated[str, Opt()] = "auto",
) -> None:
    """Add routing prototypes (what --task auto compares images with) to a saved task."""
    from piggyback.device import resolve_device
    from piggyback.model import PiggybackModel
    from piggyback.route_fit import fit_routing_from_data

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
    """Backbone, fingerprint, tasks, classes, bytes on disk and mask density of a model folder.

    Exits with status 1 when a task file is missing, damaged or made for other backbone weights
    (each is named), so scripts can check a model directory with it.
    """
    from piggyback.describe import describe_model_dir, format_description

    description = describe_model_dir(model_dir)
    if as_json:
        typer.echo(json.dumps(description, indent=2, default=str))
    else:
        typer.echo(format_description(description, verbose=verbose))
    problems = _task_problems(description["tasks"])
    if problems:
        _fail(f"{len(problems)} task(s) of {model_dir} cannot be used: {'; '.join(problems)}", 1)


def _task_problems(tasks: dict[str, dict[str, Any]]) -> list[str]:
    """'name (why)' for each task that does not load: file missing or damaged, other backbone."""
    problems = []
    for name, task in tasks.items():
        if task["error"]:
            problems.append(f"{name} ({task['error']})")
        elif not task["fingerprint_matches"]:
            problems.append(f"{name} (made for other backbone weights than the directory's)")
    return problems


@app.command()
@friendly_errors
def repair(model_dir: Annotated[Path, typer.Argument(help="Model directory.")]) -> None:
    """Add the task files that the directory's index misses (after a crash while saving)."""
    from piggyback.repair import repair_index

    added, refused = repair_index(model_dir)
    for reason in refused:
        typer.echo(f"not added: {reason}", err=True)
    typer.echo(f"added to the index: {', '.join(added)}" if added else "nothing to add")
    if refused:
        raise typer.Exit(2)


@app.command()
@friendly_errors
def convert(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    codec: Annotated[
        str | None,
        Opt(
            help="Mask codec: zstd (entropy-coded) or packed (1-2 bits per weight). "
            "Default: zstd, or packed where that is smaller."
        ),
    ] = None,
    head_dtype: Annotated[
        str | None,
        Opt(
            help="Store heads and task norms as float16 or bfloat16 (lossy), or back as "
            "float32. Default: as they are."
        ),
    ] = None,
) -> None:
    """Rewrite a model folder's task files with another mask codec or head dtype (each file is
    replaced only after the new one reads back exactly as meant)."""
    from piggyback.convert import convert_model_dir

    for name, done in convert_model_dir(model_dir, codec, head_dtype).items():
        typer.echo(
            f"{name}: {done['bytes_before']:,} -> {done['bytes_after']:,} bytes "
            f"(masks {done['codec_before']} -> {done['codec_after']}, "
            f"head {done['head_dtype_before']} -> {done['head_dtype_after']})"
        )


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
    image_size: Annotated[
        int | None, Opt(help="Example input size (default: the task's).", min=8, max=4096)
    ] = None,
) -> None:
    """A task merged into a plain model (no piggyback needed to run it), as ONNX / TorchScript."""
    from piggyback.destination import check_writable_dir
    from piggyback.export import export_task
    from piggyback.model import PiggybackModel

    destination = check_writable_dir(output or model_dir / "export", "the export")
    model = PiggybackModel.from_pretrained(model_dir, tasks=[task])
    formats = tuple(format or ["onnx"])
    written = export_task(model, task, destination, formats=formats, image_size=image_size)
    for kind, path in written.items():
        typer.echo(f"{kind}: {path}")


def _print_version(asked: bool) -> None:
    if asked:
        from piggyback import __version__

        typer.echo(f"piggyback {__version__}")
        raise typer.Exit()


app.command("serve")(friendly_errors(serve_command))


@app.callback()
def _setup(
    version: Annotated[
        bool,
        Opt("--version", callback=_print_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Adapt one frozen pretrained network to many tasks by learning a binary mask per task."""
    from piggyback.runtime import tune_allocator

    tune_allocator()


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """`warning: <message>` for people at a terminal, as errors are one line too; Python's
    default names the library's file and line and prints its source, which tells them nothing."""
    return f"warning: {message}\n"


def main() -> None:  # pragma: no cover - console entry point
    warnings.formatwarning = _one_line_warning  # the command line only, not the library
    app(prog_name="piggyback")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
