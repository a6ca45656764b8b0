"""Serving many tasks from one backbone: memory, task switches, mixed batches, routing.

Measured side by side in one run with the `Predictor`:
- memory: resident memory (also after `malloc_trim`) of a process holding one backbone and
  1 / 10 / 50 loaded (packed) tasks, each configuration in a fresh subprocess, against the bytes
  the tasks' files hold and the Predictor's own accounting; then with 4 tasks' masked weights
  cached;
- task switch, batch 1: a forward pass of a task whose masked weights are not cached (cold:
  unpack the bits, W * mask) against one whose are (warm), interleaved, median;
- mixed-task batches: a batch of 32 spread over 4 cached tasks against a batch of 32 of one task,
  and the same mixed batch with `batch_invariant=True` (each sample run alone: exact answers);
- routing overhead: `tasks="auto"` against the known task (batch 1 and 32);
- routing on real data (with `--routing-model`): trained tasks, their test images mixed; routing
  accuracy and end-to-end top-1 against knowing the task, for the prototypes the library uses,
  one mean per task and prediction entropy; and a same-domain stress mix (each dataset's classes
  split into two pseudo-tasks, no training needed: routing uses the frozen backbone only).

ResNet-50 gets random weights (timm, pretrained=False; timing and memory do not depend on them),
EfficientNet-Lite0 its real ones. Task masks are random (uniform score init), 100-class heads.

    python benchmarks/serving.py --routing-model ../bench-work/lite0-binary
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment
from serving_routing import routing_on_real_data

from piggyback import PiggybackConfig, PiggybackModel, Predictor
from piggyback.backbones import Backbone, create_backbone
from piggyback.route_fit import fit_routing_profile

NUM_CLASSES = 100
CACHED = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["timm:resnet50", "efficientnet_lite0"])
    parser.add_argument("--task-counts", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--routing-model", type=Path, default=None, help="model directory of trained tasks"
    )
    parser.add_argument(
        "--routing-datasets",
        nargs="*",
        default=["flowers102", "gtsrb"],
        help="without --routing-model: routing accuracy of these datasets under the frozen "
        "EfficientNet-Lite0 (no trained tasks needed); none to skip",
    )
    parser.add_argument("--routing-image-size", type=int, default=128)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument(
        "--routing-images", type=int, default=None, help="test images per task (default: all)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work/serving"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving-cpu"))
    parser.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_backbone(name: str) -> Backbone:
    """The same weights in every process (seeded random init for the timm ResNet-50)."""
    torch.manual_seed(0)
    return create_backbone(name, pretrained=(name == "efficientnet_lite0"))


def task_directory(name: str, count: int, work_dir: Path) -> Path:
    """A model directory with `count` random-mask tasks t00, t01, ... (made once, then reused)."""
    directory = work_dir / name.replace(":", "-")
    have = directory / "tasks" / f"t{count - 1:02d}.safetensors"
    if have.is_file():
        return directory
    backbone = load_backbone(name)
    config = PiggybackConfig(init="uniform")
    model = PiggybackModel(backbone.model, config, backbone_spec=backbone.spec)
    for index in range(count):
        task = f"t{index:02d}"
        model.add_task(task, NUM_CLASSES, seed=index)  # its own random mask
        # packed masks: the form a loaded task keeps in memory, whose size is the goal
        model.save_pretrained(directory, tasks=[task], codec="packed")
        model.delete_task(task)  # keep one task's float scores in memory at a time
    return directory


# -- memory -------------------------------------------------------------------------------------


def rss() -> int:
    gc.collect()
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def trimmed_rss() -> int:
    """RSS after glibc hands freed heap back to the OS (`malloc_trim`): the memory the loaded
    objects hold, without the allocator's free pages left by transient copies while loading
    (kept for reuse: the next load takes them). Plain RSS where glibc is absent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: resident memory of the backbone, then of `count` loaded tasks."""
    directory = args.memory_child
    model = PiggybackModel.from_pretrained(directory, load_backbone(args.model).model, tasks=[])
    predictor = Predictor(model.eval(), max_cached_tasks=CACHED)
    x = torch.randn(1, 3, args.image_size, args.image_size)
    with torch.inference_mode():
        model.backbone_features(x)  # allocator and kernel warm-up before the baseline
    before = trimmed_rss()
    names = [f"t{i:02d}" for i in range(args.count)]
    for name in names:
        model.load_task(directory / "tasks" / f"{name}.safetensors")
    loaded = rss()
    live = trimmed_rss()
    accounted = predictor.memory()
    for name in names[:CACHED]:
        predictor.logits(x, name)
    cached = trimmed_rss()
    files = sum((directory / "tasks" / f"{n}.safetensors").stat().st_size for n in names)
    print(
        json.dumps(
            {
                "tasks": args.count,
                "rss_backbone": before,
                "rss_tasks": loaded - before,
                "rss_tasks_trimmed": live - before,
                "file_bytes": files,
                "accounted_tasks_bytes": accounted["tasks_bytes"],
                "accounted_backbone_bytes": accounted["backbone_bytes"],
                "cached_tasks": len(predictor.cache_info().tasks),
                "rss_cache": cached - live,
                "accounted_cache_bytes": predictor.memory()["cache_bytes"],
            }
        )
    )


def memory(name: str, directory: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for count in args.task_counts:
        command = [
            sys.executable, __file__, "--memory-child", str(directory), "--model", name,
            "--count", str(count), "--image-size", str(args.image_size),
        ]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["rss_per_task"] = row["rss_tasks"] / count
        row["rss_per_task_trimmed"] = row["rss_tasks_trimmed"] / count
        row["file_bytes_per_task"] = row["file_bytes"] / count
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# -- timing -------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Any], steps: int, repeats: int) -> dict[str, float]:
    """Median over repeats of each function's seconds per call, the functions taking turns."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            samples[key].append((time.perf_counter() - start) / steps)
    return {key: statistics.median(values) for key, values in samples.items()}


def domain_images(seed: int, task: int, count: int, size: int) -> torch.Tensor:
    """Noise around a per-task colour offset: inputs whose domain routing can tell apart."""
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    images[:, task % 3] += 1.5 * (1 + task // 3)
    return images


def timings(name: str, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Timed in this process with the allocator as `piggyback serve` sets it (memory is measured
    in fresh subprocesses that keep glibc's default: it returns freed memory)."""
    from piggyback.runtime import tune_allocator

    tune_allocator()  # else large batches page-fault their activations in again every call
    tasks = [f"t{i:02d}" for i in range(2 * CACHED)]
    predictor = Predictor.from_pretrained(
        directory,
        backbone=load_backbone(name).model,
        device="cpu",
        tasks=tasks,
        max_cached_tasks=CACHED,
    )
    model, size = predictor.model, args.image_size
    warm, cold = tasks[:CACHED], tasks[CACHED:]
    for index, task in enumerate(tasks):  # prototypes from each task's own 'domain'
        batches = [(domain_images(100 + index, index, 8, size), torch.zeros(8, dtype=torch.long))]
        model.task(task).routing = fit_routing_profile(model, batches, predictor.preprocess(task))
    one = torch.randn(1, 3, size, size)
    turn = {"warm": 0, "cold": 0}

    def run_warm() -> None:
        turn["warm"] += 1
        predictor.logits(one, warm[turn["warm"] % CACHED])

    def run_cold() -> None:
        turn["cold"] += 1
        for task in cold:  # as if evicted: the next call unpacks the bits and computes W * mask
            predictor.task_cache.discard(task)
        predictor.logits(one, cold[turn["cold"] % CACHED])

    # Room for the warm tasks and the one cold task computed at a time: no warm one is evicted.
    predictor.task_cache.configure(max_tasks=CACHED + 1, max_bytes=None)
    switch = interleaved({"warm": run_warm, "cold": run_cold}, args.steps, args.repeats)
    predictor.task_cache.configure(max_tasks=CACHED, max_bytes=None)
    for task in warm:  # the 4 tasks cached for what follows
        predictor.logits(one, task)
    batch = torch.randn(args.batch_size, 3, size, size)
    mixed_tasks = [warm[i % CACHED] for i in range(args.batch_size)]

    def mixed_invariant() -> None:
        predictor.batch_invariant = True
        try:
            predictor.predict(batch, mixed_tasks)
        finally:
            predictor.batch_invariant = False

    throughput = interleaved(
        {
            "single": lambda: predictor.predict(batch, warm[0]),
            "mixed": lambda: predictor.predict(batch, mixed_tasks),
            "mixed_invariant": mixed_invariant,
        },
        args.steps,
        args.repeats,
    )
    routing = {}
    for count in (1, args.batch_size):
        images = domain_images(7, 0, count, size)  # all from task 0's domain
        routed = predictor.predict(images, "auto")
        times = interleaved(
            {
                "known": lambda images=images: predictor.predict(images, warm[0]),
                "auto": lambda images=images: predictor.predict(images, "auto"),
            },
            args.steps,
            args.repeats,
        )
        routing[f"batch{count}"] = {
            **times,
            "ratio": times["auto"] / times["known"],
            "routed_to_task": sum(a.task == warm[0] for a in routed) / count,
        }
    info = predictor.cache_info()
    return {
        "switch_batch1": {
            **switch,
            "cold_minus_warm": switch["cold"] - switch["warm"],
        },
        "mixed_batch": {
            **throughput,
            "batch_size": args.batch_size,
            "tasks": CACHED,
            "ratio": throughput["mixed"] / throughput["single"],
            "invariant_ratio": throughput["mixed_invariant"] / throughput["single"],
        },
        "routing": routing,
        "cache": info.to_dict(),
    }


# -- report -------------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


def report_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{args.image_size} px, CPU float32, {args.threads} torch threads, channels-last; "
        f"{NUM_CLASSES}-class heads; medians of {args.repeats} repeats.",
        "",
        "| model | tasks | RSS of tasks (MiB) | per task: RSS / trimmed RSS / packed file (MiB) "
        "| accounted (MiB) "
        f"| + {CACHED} cached: RSS / accounted (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["models"].items():
        for row in r["memory"]:
            lines.append(
                f"| {name} | {row['tasks']} | {mib(row['rss_tasks'])} | "
                f"{mib(row['rss_per_task'])} / {mib(row['rss_per_task_trimmed'])} / "
                f"{mib(row['file_bytes_per_task'])} | "
                f"{mib(row['accounted_tasks_bytes'])} | "
                f"{mib(row['rss_cache'])} / {mib(row['accounted_cache_bytes'])} |"
            )
    lines += [
        "",
        "| model | backbone (MiB) | switch b1 cold / warm (ms) | cold - warm (ms) "
        f"| b{args.batch_size} mixed ({CACHED} tasks) / single (s) | ratio "
        "| batch-invariant mixed (s) / single | auto / known b1 | auto / known b32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["models"].items():
        t = r["timings"]
        s, m = t["switch_batch1"], t["mixed_batch"]
        b1, bn = t["routing"]["batch1"], t["routing"][f"batch{args.batch_size}"]
        lines.append(
            f"| {name} | {mib(r['memory'][0]['accounted_backbone_bytes'])} | "
            f"{1000 * s['cold']:.1f} / {1000 * s['warm']:.1f} | "
            f"{1000 * s['cold_minus_warm']:.1f} | "
            f"{m['mixed']:.3f} / {m['single']:.3f} | {m['ratio']:.2f} | "
            f"{m['mixed_invariant']:.3f} / {m['invariant_ratio']:.2f} | "
            f"{b1['ratio']:.2f} | {bn['ratio']:.2f} |"
        )
    routing = results.get("routing_real")
    if routing:
        lines += ["", *routing["table"]]
    return "\n".join(lines)


def save_partial(results: dict[str, Any], args: argparse.Namespace) -> None:
    """What is measured so far, in the work folder: a long run that is stopped keeps it."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "partial-results.json").write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args)
        return {}
    results: dict[str, Any] = {"models": {}}
    for name in args.models:
        print(f"== {name}", flush=True)
        directory = task_directory(name, max(max(args.task_counts), 2 * CACHED), args.work_dir)
        results["models"][name] = {
            "memory": memory(name, directory, args),
            "timings": timings(name, directory, args),
        }
        print(json.dumps(results["models"][name]["timings"], indent=2), flush=True)
        save_partial(results, args)
    if args.routing_model is not None or args.routing_datasets:
        results["routing_real"] = routing_on_real_data(args)
        save_partial(results, args)
    table = report_markdown(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("memory_child", "model")}
    report = {
        "command": " ".join(sys.argv),
        "settings": settings,
        "results": results,
        "environment": environment(),
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
