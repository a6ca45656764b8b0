"""What piggyback costs: training step time and memory, inference, task switching, storage.

Everything is measured side by side in one run and printed as ratios:
- training step (forward + backward + optimizer step, same batch): piggyback / fine-tuning /
  classifier-only; timings interleaved method by method, median over repeats;
- peak memory of those steps: each method in a fresh subprocess (peak RSS growth on CPU,
  torch.cuda.max_memory_allocated on GPU), so peaks do not mix;
- inference: a task's forward pass against the plain backbone (eval mode, no grad), batch 1 and
  the training batch; and the latency of switching tasks (set_task + the first forward, minus a
  cached forward), against one batch-1 forward pass;
- storage: bytes of a task file against a fine-tuned checkpoint (safetensors) of the same model.

Fine-tuning here is plain PyTorch fine-tuning of the backbone (what the paper compares against).
Random weights are used for the timm ResNet-50; EfficientNet-Lite0 has its real weights.

    python benchmarks/cost.py --models efficientnet_lite0 timm:resnet50 --image-size 224
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment

from piggyback import PiggybackModel
from piggyback.backbones import create_backbone
from piggyback.device import Precision, resolve_device
from piggyback.packing import packed_size
from piggyback.runtime import tune_allocator

METHODS = ("piggyback", "finetune", "classifier")
NUM_CLASSES = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "timm:resnet50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cost-cpu"))
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_backbone(name: str) -> torch.nn.Module:
    """The backbone in channels-last layout (as training uses it), for every method alike."""
    model = create_backbone(name, pretrained=(name == "efficientnet_lite0")).model
    return model.to(memory_format=torch.channels_last)


def build(name: str, method: str, device: torch.device):
    """(model, optimizer) for one method; fine-tuning is the plain backbone with a new head."""
    backbone = load_backbone(name)
    if method == "finetune":
        model = backbone
        model.reset_classifier(NUM_CLASSES) if hasattr(model, "reset_classifier") else None
        model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        return model, optimizer
    model = PiggybackModel(backbone)
    model.add_task("t", NUM_CLASSES, method=method, seed=0)
    model.set_task("t")
    model.to(device).train()
    model.to(memory_format=torch.channels_last)  # the new head and scores too
    if method == "piggyback":
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    else:
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
    return model, optimizer


def autocast(args, device):
    return Precision(args.precision, device).autocast()  # as training applies --precision


def make_step(model, optimizer, batch, labels, args, device):
    def step():
        with autocast(args, device):
            loss = F.cross_entropy(model(batch).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, count: int) -> float:
    """Seconds per call, averaged over `count` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        fn()
    sync(device)
    return (time.perf_counter() - start) / count


def interleaved(fns: dict[str, Any], device, count: int, repeats: int) -> dict[str, float]:
    """Median over repeats of each function's time, running them in turn (fair to drift)."""
    for fn in fns.values():
        fn()  # warm up (allocations, caches)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            samples[key].append(timed(fn, device, count))
    return {k: statistics.median(v) for k, v in samples.items()}


def training_time(name: str, args, device) -> dict[str, float]:
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    steps = {}
    for method in METHODS:
        model, optimizer = build(name, method, device)
        steps[method] = make_step(model, optimizer, batch, labels, args, device)
    return interleaved(steps, device, args.steps, args.repeats)


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); returns that RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status("VmRSS")
    except OSError:  # no /proc: fall back to the peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return _status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args) -> None:
    """Runs in a subprocess: peak memory growth of a few training steps of one method."""
    device = resolve_device(args.device)
    name = args.models[0]
    batch = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    # Peak resident memory above what the process held after its imports: the model, its
    # optimizer state and the training step's activations, as a user would see it grow.
    before = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, optimizer = build(name, args.method, device)
    step = make_step(model, optimizer, batch, labels, args, device)
    for _ in range(3):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss() - before
    print(json.dumps({"peak_bytes": peak}))


def training_memory(name: str, args) -> dict[str, int]:
    peaks = {}
    for method in METHODS:
        command = [
            sys.executable, __file__, "--memory-only", "--method", method, "--models", name,
            "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
            "--device", args.device, "--precision", args.precision,
        ]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    return peaks


def inference(name: str, args, device) -> dict[str, Any]:
    plain = load_backbone(name).to(device).eval()
    model = PiggybackModel(copy.deepcopy(plain))
    model.add_task("a", seed=0)  # the backbone's own head: same output size as the plain model
    model.add_task("b", seed=1)
    model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    model.set_task("a")
    results = {}
    with torch.inference_mode():
        for batch_size in sorted({1, args.batch_size}):
            x = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
            with autocast(args, device):
                times = interleaved(
                    {"plain": lambda x=x: plain(x), "task": lambda x=x: model(x)},
                    device,
                    args.steps * 2,
                    args.repeats,
                )
            results[f"batch{batch_size}"] = {**times, "ratio": times["task"] / times["plain"]}
        x = torch.randn(1, 3, args.image_size, args.image_size, device=device)
        tasks = iter(["b", "a"] * 1000)

        def switch_and_forward():
            model.set_task(next(tasks))
            model(x)

        with autocast(args, device):
            times = interleaved(
                {"switch": switch_and_forward, "forward": lambda: model(x)},
                device,
                args.steps,
                args.repeats,
            )
    switch = max(times["switch"] - times["forward"], 0.0)
    results["switch"] = {
        "seconds": switch,
        "batch1_forward_seconds": results["batch1"]["plain"],
        "ratio_to_batch1_forward": switch / results["batch1"]["plain"],
    }
    return results


def storage(name: str) -> dict[str, Any]:
    model = PiggybackModel(load_backbone(name))
    model.add_task("t", NUM_CLASSES, seed=0)
    model.add_task("c", NUM_CLASSES, method="classifier", seed=0)
    finetuned = load_backbone(name)
    if hasattr(finetuned, "reset_classifier"):
        finetuned.reset_classifier(NUM_CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        task_bytes = model.save_task(Path(tmp) / "t.safetensors", "t").stat().st_size
        classifier_bytes = model.save_task(Path(tmp) / "c.safetensors", "c").stat().st_size
        checkpoint = Path(tmp) / "finetuned.safetensors"
        state = {k: v.contiguous() for k, v in finetuned.state_dict().items()}
        save_file(state, str(checkpoint))
        full_bytes = checkpoint.stat().st_size
    head_bytes = sum(
        t.numel() * t.element_size() for t in model.task("t").head.state_dict().values()
    )
    mask_bytes = packed_size(model.num_masked, 1)
    masked_weight_bytes = model.num_masked * 4  # the float32 weights the masks select
    return {
        "masked_weights": model.num_masked,
        "task_file_bytes": task_bytes,
        "mask_bytes": mask_bytes,
        "head_bytes": head_bytes,
        "classifier_task_bytes": classifier_bytes,
        "finetuned_checkpoint_bytes": full_bytes,
        "finetuned_over_task": full_bytes / task_bytes,
        "weights_over_masks": masked_weight_bytes / mask_bytes,
    }


def _row(name: str, r: dict[str, Any], batch: int) -> list[str]:
    t, m, i, s = r["train_seconds"], r["train_peak_bytes"], r["inference"], r["storage"]
    switch = i["switch"]
    return [
        name,
        " / ".join(f"{t[k]:.3f}" for k in METHODS),
        f"{t['piggyback'] / t['finetune']:.2f}",
        " / ".join(f"{m[k] / 2**20:.0f}" for k in METHODS),
        f"{m['piggyback'] / max(m['finetune'], 1):.2f}",
        f"{i['batch1']['ratio']:.3f}",
        f"{i[f'batch{batch}']['ratio']:.3f}",
        f"{1000 * switch['seconds']:.2f} / {1000 * switch['batch1_forward_seconds']:.2f}"
        f" = {switch['ratio_to_batch1_forward']:.2f}",
        f"{s['task_file_bytes'] / 2**20:.2f} MiB",
        f"{s['finetuned_over_task']:.1f}x",
        f"{s['head_bytes'] / 2**20:.2f} / {s['mask_bytes'] / 2**20:.2f} MiB",
        f"{s['weights_over_masks']:.1f}x",
    ]


def report_markdown(results: dict[str, Any], args) -> str:
    header = [
        "model",
        "train step pb / ft / clf (s)",
        "pb / ft time",
        "peak mem pb / ft / clf (MiB)",
        "pb / ft mem",
        "infer b1 task / plain",
        f"infer b{args.batch_size} task / plain",
        "switch / b1 forward (ms)",
        "task file",
        "ft ckpt / task",
        "head / masks",
        "masked weights / masks",
    ]
    rows = [header, ["---"] * len(header)]
    rows += [_row(name, r, args.batch_size) for name, r in results.items()]
    settings = f"Batch {args.batch_size}, {args.image_size} px, {args.device}, {args.precision}."
    return "\n".join([settings, "", *("| " + " | ".join(row) + " |" for row in rows)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tune_allocator()  # as the CLI does
    if args.memory_only:
        memory_child(args)
        return {}
    device = resolve_device(args.device)
    results = {}
    for name in args.models:
        print(f"== {name}", flush=True)
        results[name] = {
            "train_seconds": training_time(name, args, device),
            "train_peak_bytes": training_memory(name, args),
            "inference": inference(name, args, device),
            "storage": storage(name),
        }
        print(json.dumps(results[name], indent=2), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = report_markdown(results, args)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("memory_only", "method")}
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
