"""What storing heads in float16 / bfloat16 costs in accuracy, on trained tasks.

For every task of the given model directories: test top-1 / top-5 of the task as saved, and after
`piggyback convert --head-dtype D` (on a copy of the directory), with the task file sizes.

    python benchmarks/compact_heads.py --data-root ../shared/data \
        --models ../bench-work/lite0-binary ../bench-work/lite0-ternary
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import save_report

from piggyback.convert import convert_model_dir
from piggyback.evaluation import evaluate_task
from piggyback.model_dir import read_model_config, task_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True, help="model directories")
    parser.add_argument("--data-root", type=Path, required=True, help="holds <task>/ datasets")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compact-heads-cpu"))
    return parser.parse_args(argv)


def test_accuracy(directory: Path, task: str, args) -> dict[str, Any]:
    result = evaluate_task(
        directory, task, args.data_root / task, batch_size=args.batch_size,
        workers=args.workers, progress=False,
    )  # fmt: skip
    size = task_file(directory, task).stat().st_size
    return {"top1": result["top1"], "top5": result["top5"], "file_bytes": size}


def measure(directory: Path, args, tmp: Path) -> dict[str, Any]:
    tasks = list(read_model_config(directory)["tasks"])
    results = {task: {"float32": test_accuracy(directory, task, args)} for task in tasks}
    for dtype in args.dtypes:
        copy = Path(shutil.copytree(directory, tmp / f"{directory.name}-{dtype}"))
        convert_model_dir(copy, head_dtype=dtype)
        for task in tasks:
            results[task][dtype] = test_accuracy(copy, task, args)
        shutil.rmtree(copy)
    return results


def table(results: dict[str, Any], dtypes: list[str]) -> str:
    header = ["model", "task", *(f"test top-1 {d} (change)" for d in ["float32", *dtypes])]
    header += [f"task file {d} (bytes)" for d in ["float32", *dtypes]]
    rows = [header, ["---"] * len(header)]
    for model, tasks in results.items():
        for task, by_dtype in tasks.items():
            base = by_dtype["float32"]["top1"]
            rows.append(
                [model, task]
                + [f"{by_dtype[d]['top1']:.2f} ({by_dtype[d]['top1'] - base:+.2f})"
                   for d in ["float32", *dtypes]]
                + [f"{by_dtype[d]['file_bytes']:,}" for d in ["float32", *dtypes]]
            )  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {str(d.name): measure(d, args, Path(tmp)) for d in args.models}
    settings = {k: str(v) for k, v in vars(args).items()}
    return save_report(args.out, settings, results, table(results, args.dtypes))


if __name__ == "__main__":
    main()
