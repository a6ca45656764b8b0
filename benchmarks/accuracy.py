"""Accuracy of piggyback against full fine-tuning and classifier-only training, on real data.

For every dataset and method this trains each point of a small learning-rate / optimizer grid
(the same number of runs for every method; the paper's recipe is one of the points), selects the
point with the best validation top-1, and reports the test top-1 of both the paper-recipe point and
the selected ("tuned") point. It also checks that piggyback is order-free: the tasks are trained
into one model directory in every order, and their files and test results must be identical.

    python benchmarks/accuracy.py --data-root ../shared/data --epochs 8 --image-size 128

Outputs (in --out): results.json (every run), table.md, accuracy.png (bar chart), one per-layer
mask density plot per piggyback task, and environment.json (machine, versions, command). Model
directories and checkpoints go to --work-dir; finished runs are skipped and interrupted ones
resumed, so the command can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment

from piggyback.describe import describe_model_dir
from piggyback.fileio import write_json_atomic
from piggyback.runtime import tune_allocator
from piggyback.training import TrainConfig, train
from piggyback.training.run import CHECKPOINT

METHODS = ("piggyback", "finetune", "classifier")

#: The grid: three points per method, the first being the paper's recipe. Piggyback's scores stay
#: on Adam (the paper found SGD unsuited to them); the baselines try SGD and Adam.
GRID: dict[str, list[dict[str, Any]]] = {
    "piggyback": [
        {"id": "paper", "optimizer": "adam", "lr_scores": 1e-4, "lr_head": 1e-4},
        {"id": "adam-s1e-4-h1e-3", "optimizer": "adam", "lr_scores": 1e-4, "lr_head": 1e-3},
        {"id": "adam-s3e-4-h1e-3", "optimizer": "adam", "lr_scores": 3e-4, "lr_head": 1e-3},
    ],
    "finetune": [
        {"id": "paper", "optimizer": "sgd", "lr": 1e-3},
        {"id": "sgd-1e-2", "optimizer": "sgd", "lr": 1e-2},
        {"id": "adam-1e-4", "optimizer": "adam", "lr": 1e-4},
    ],
    "classifier": [
        {"id": "paper", "optimizer": "sgd", "lr": 1e-3},
        {"id": "sgd-1e-2", "optimizer": "sgd", "lr": 1e-2},
        {"id": "adam-1e-3", "optimizer": "adam", "lr": 1e-3},
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="NAME=PATH",
        help="a dataset (repeatable); default: flowers102 and gtsrb under --data-root",
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="32")
    parser.add_argument("--max-train-batches", type=int, default=None)
    parser.add_argument("--order-epochs", type=int, default=1, help="budget of the order check")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work/accuracy"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy-cpu"))
    return parser.parse_args(argv)


def datasets(args: argparse.Namespace) -> dict[str, Path]:
    if not args.dataset:
        return {name: args.data_root / name for name in ("flowers102", "gtsrb")}
    pairs = (item.split("=", 1) for item in args.dataset)
    return {name: Path(path) for name, path in pairs}


def base_config(args: argparse.Namespace, data: Path, output: Path, task: str) -> dict[str, Any]:
    return {
        "data": str(data),
        "output": str(output),
        "task": task,
        "backbone": args.backbone,
        "weights": args.weights,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "workers": args.workers,
        "device": args.device,
        "precision": args.precision,
        "max_train_batches": args.max_train_batches,
        "progress": False,
    }


def run_once(config: TrainConfig, log_path: Path) -> dict[str, Any]:
    """Train (or skip / resume) one run; returns its results.json plus the run's wall time."""
    run_dir = Path(config.output) / "runs" / config.task
    results = run_dir / "results.json"
    if results.exists():
        return json.loads(results.read_text())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:

        def log(line: str) -> None:
            print(line, file=log_file, flush=True)
            print(f"  {line}", flush=True)

        start = time.perf_counter()
        result = train(config, resume=(run_dir / CHECKPOINT).exists(), overwrite=True, log=log)
    summary = json.loads(results.read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    summary["history"] = result.history
    write_json_atomic(results, summary)  # the skip test above must never read half a file
    return summary


def run_grid(args: argparse.Namespace, sets: dict[str, Path]) -> list[dict[str, Any]]:
    rows = []
    for name, data in sets.items():
        for method in METHODS:
            for point in GRID[method]:
                output = args.work_dir / "grid" / name / f"{method}-{point['id']}"
                options = {k: v for k, v in point.items() if k != "id"}
                config = TrainConfig(
                    **base_config(args, data, output, name), method=method, **options
                )
                print(f"[{name}] {method} {point['id']}", flush=True)
                result = run_once(
                    config, args.work_dir / "logs" / f"{name}-{method}-{point['id']}.log"
                )
                rows.append(
                    {
                        "dataset": name,
                        "method": method,
                        "point": point["id"],
                        "settings": options,
                        "model_dir": str(output),
                        **{
                            k: result.get(k)
                            for k in (
                                "best_epoch",
                                "val_top1",
                                "test_top1",
                                "test_top5",
                                "density",
                                "wall_seconds",
                            )
                        },
                    }
                )
    return rows


def select(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and dataset: the paper-recipe run and the best-on-validation run."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (method, dataset), group in itertools.groupby(
        sorted(rows, key=lambda r: (r["method"], r["dataset"])),
        key=lambda r: (r["method"], r["dataset"]),
    ):
        runs = list(group)
        paper = next(r for r in runs if r["point"] == "paper")
        tuned = max(runs, key=lambda r: (r["val_top1"], r["point"] == "paper"))
        table.setdefault(method, {})[dataset] = {"paper": paper, "tuned": tuned}
    return table


def order_check(args: argparse.Namespace, sets: dict[str, Path]) -> dict[str, Any]:
    """Piggyback tasks trained into one model directory in every order give identical tasks."""
    outcomes = {}
    for order in itertools.permutations(sets):
        output = args.work_dir / "order" / "-then-".join(order)
        for name in order:
            config = TrainConfig(
                **{**base_config(args, sets[name], output, name), "epochs": args.order_epochs}
            )
            run_once(config, args.work_dir / "logs" / f"order-{'-'.join(order)}-{name}.log")
        outcomes[order] = output
    first, *others = list(outcomes.values())
    identical = {}
    for name in sets:
        reference = load_file(first / "tasks" / f"{name}.safetensors")
        same = True
        for other in others:
            tensors = load_file(other / "tasks" / f"{name}.safetensors")
            same &= reference.keys() == tensors.keys() and all(
                (reference[k] == tensors[k]).all() for k in reference
            )
        tests = [
            json.loads((d / "runs" / name / "results.json").read_text())["test_top1"]
            for d in outcomes.values()
        ]
        identical[name] = {"files_identical": bool(same), "test_top1_by_order": tests}
    return {"orders": [list(o) for o in outcomes], "epochs": args.order_epochs, "tasks": identical}


# -- reporting ----------------------------------------------------------------------------------


def markdown_table(table, names: list[str]) -> str:
    header = "| method | setting | " + " | ".join(names) + " | mean |"
    lines = [header, "|" + "---|" * (len(names) + 3)]
    for method in METHODS:
        for kind in ("paper", "tuned"):
            cells = [table[method][n][kind] for n in names]
            values = [c["test_top1"] for c in cells]
            text = [
                f"{c['test_top1']:.2f}" + (f" ({c['density']:.1%} on)" if c.get("density") else "")
                for c in cells
            ]
            setting = (
                "paper recipe"
                if kind == "paper"
                else "tuned on val: "
                + ", ".join(f"{n}={c['point']}" for n, c in zip(names, cells, strict=True))
            )
            mean = sum(values) / len(values)
            lines.append(f"| {method} | {setting} | " + " | ".join(text) + f" | {mean:.2f} |")
    return "\n".join(lines)


def bar_chart(table, names: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(names), 4.6))
    width = 0.13
    for i, (method, kind) in enumerate(itertools.product(METHODS, ("paper", "tuned"))):
        values = [table[method][n][kind]["test_top1"] for n in names]
        positions = [j + (i - 2.5) * width for j in range(len(names))]
        bars = ax.bar(
            positions,
            values,
            width,
            label=f"{method} ({kind})",
            hatch="//" if kind == "paper" else None,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # off the bars
    ax.set_title("Test top-1, selected on validation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def density_plot(model_dir: Path, task: str, path: Path) -> None:
    description = describe_model_dir(model_dir)["tasks"][task]
    densities = list(description["layer_density"].values())  # in the model's layer order
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(range(len(densities)), [100 * d for d in densities], color="tab:blue")
    ax.set_xlabel("masked layer (input to output)")
    ax.set_ylabel("weights kept (%)")
    ax.set_ylim(min(100 * min(densities) - 2, 90), 100.5)
    ax.set_title(f"{task}: per-layer mask density (overall {description['density']:.2%})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tune_allocator()  # as the CLI does
    started = environment()  # the code that runs, even if the checkout moves on meanwhile
    sets = datasets(args)
    for name, path in sets.items():
        if not path.is_dir():
            raise SystemExit(f"dataset {name} not found at {path}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_grid(args, sets)
    table = select(rows)
    order = order_check(args, sets)
    names = list(sets)
    (args.out / "table.md").write_text(markdown_table(table, names) + "\n")
    bar_chart(table, names, args.out / "accuracy.png")
    for name in names:
        tuned = table["piggyback"][name]["tuned"]
        density_plot(Path(tuned["model_dir"]), name, args.out / f"density-{name}.png")
    report = {
        "command": " ".join(sys.argv),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "grid": GRID,
        "runs": rows,
        "selected": table,
        "order_check": order,
        "environment": started,
        "finished": environment()["date"],
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown_table(table, names))
    print(json.dumps(order, indent=2))
    return report


if __name__ == "__main__":
    main()
