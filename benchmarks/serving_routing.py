"""Task routing on real data, for `benchmarks/serving.py --routing-model DIR`.

The model directory's trained tasks (e.g. Flowers-102 and GTSRB) answer their test images mixed
together. Routing prototypes are computed as training computes them (the task's training split,
the library's `routing_batches` / `class_feature_means`), in memory: the directory is not changed.
Each test image is run once through the frozen backbone (routing features) and once under every
task (probabilities), and every routing method is then scored on the same numbers:

- class prototypes (what the library stores: class means, at most 32 per task);
- one mean per task (the "nearest task mean" of the issue);
- lowest normalized prediction entropy (the fallback for tasks without prototypes).

Routing accuracy = the image's own task chosen; end-to-end top-1 = that and the right class,
against the top-1 when the task is known. A stress mix with no training behind it splits each
dataset's classes into two pseudo-tasks (same domain: only class-level prototypes can separate
them). Finally the Predictor itself routes a slice of the images, to check it agrees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from piggyback import PiggybackModel, Predictor
from piggyback.backbones import create_backbone
from piggyback.data import ImageDataset, load_splits
from piggyback.preprocess import Preprocess
from piggyback.route_fit import (
    MAX_IMAGES,
    class_feature_means,
    prototypes_from_class_means,
    routing_batches,
    stratified_subset,
)
from piggyback.routing import RoutingProfile, route_by_entropy, route_by_prototypes


def task_data(predictor: Predictor, task: str, data_root: Path) -> Path:
    """The dataset a task was trained on: recorded by training, else `data_root/<task>`."""
    recorded = (predictor.model.task(task).metadata.training or {}).get("data")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return data_root / task


def measure(predictor: Predictor, args: argparse.Namespace, trained: bool) -> dict[str, Any]:
    """Class means of the training images and, for the mixed test images, the routing features
    and (for trained tasks) every task's probabilities."""
    model, tasks = predictor.model, predictor.tasks
    preprocess = predictor.preprocess(tasks[0])
    if any(predictor.preprocess(t) != preprocess for t in tasks):
        raise SystemExit("this measurement assumes tasks with one preprocessing")
    transform = Preprocess.from_dict(preprocess).transform()
    out: dict[str, Any] = {
        "tasks": tasks,
        "means": {},
        "counts": {},
        "test": {},
        "trained": trained,
    }
    for task in tasks:
        splits = load_splits(task_data(predictor, task, args.data_root))
        batches = routing_batches(splits.train, preprocess, max_images=MAX_IMAGES)
        out["means"][task], out["counts"][task] = class_feature_means(model, batches)
        chosen = stratified_subset([s.label for s in splits.test], args.routing_images)
        samples = [splits.test[i] for i in chosen]
        loader = DataLoader(ImageDataset(samples, transform), batch_size=64)
        features, labels, probs = [], [], {t: [] for t in tasks if trained}
        with torch.inference_mode():
            for images, batch_labels in loader:
                features.append(model.backbone_features(images).float())
                labels.append(batch_labels)
                for other in probs:
                    probs[other].append(predictor.logits(images, other).float().softmax(1))
        out["test"][task] = {
            "features": torch.cat(features),
            "labels": torch.cat(labels),
            "probs": {t: torch.cat(p) for t, p in probs.items()},
        }
        print(f"routing data: {task}: {len(samples)} test images", flush=True)
    return out


def cached_measure(predictor: Predictor, args: argparse.Namespace, trained: bool) -> dict:
    source = str(args.routing_model.resolve()) if trained else args.routing_image_size
    key = json.dumps([source, args.routing_images, predictor.tasks, trained])
    path = args.work_dir / f"routing-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    data = measure(predictor, args, trained)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def profiles_for(means: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], kind: str):
    profiles = {}
    for task, task_means in means.items():
        if kind == "class prototypes":
            prototypes = prototypes_from_class_means(task_means)
        elif kind == "class means, all":
            prototypes = prototypes_from_class_means(task_means, max_prototypes=10**6)
        else:  # one mean per task: the count-weighted mean of its class means
            weights = counts[task].float()[:, None]
            prototypes = F.normalize((task_means * weights).sum(0, keepdim=True), dim=1)
        profiles[task] = RoutingProfile(prototypes, {}, int(counts[task].sum()))
    return profiles


def score(data: dict[str, Any], kind: str) -> dict[str, Any]:
    tasks = data["tasks"]
    routed_right = known_right = both_right = total = 0
    per_task = {}
    for index, task in enumerate(tasks):
        test = data["test"][task]
        if kind == "entropy":
            routes = route_by_entropy(test["probs"])
        else:
            profiles = profiles_for(data["means"], data["counts"], kind)
            routes = route_by_prototypes({t: test["features"] for t in tasks}, profiles)
        chosen = torch.tensor([tasks.index(r.task) for r in routes])
        right_task = chosen == index
        if data["trained"]:
            own = test["probs"][task].argmax(1) == test["labels"]
        else:  # routing only: no trained heads to answer with
            own = torch.zeros_like(right_task)
        per_task[task] = float(right_task.float().mean())
        routed_right += int(right_task.sum())
        known_right += int(own.sum())
        both_right += int((right_task & own).sum())
        total += len(routes)
    trained = data["trained"]
    return {
        "routing_accuracy": routed_right / total,
        "per_task": per_task,
        "end_to_end_top1": both_right / total if trained else None,
        "known_task_top1": known_right / total if trained else None,
        "images": total,
    }


def stress(data: dict[str, Any], kind: str) -> float:
    """Routing accuracy when each dataset's classes are split into two same-domain pseudo-tasks."""
    means, counts, features, owner = {}, {}, [], []
    for task in data["tasks"]:
        half = len(data["means"][task]) // 2
        labels = data["test"][task]["labels"]
        for part, rows in (("A", slice(0, half)), ("B", slice(half, None))):
            name = f"{task}-{part}"
            means[name], counts[name] = data["means"][task][rows], data["counts"][task][rows]
            pick = labels < half if part == "A" else labels >= half
            features.append(data["test"][task]["features"][pick])
            owner += [name] * int(pick.sum())
    profiles = profiles_for(means, counts, kind)
    stacked = torch.cat(features)
    routes = route_by_prototypes({t: stacked for t in profiles}, profiles)
    return sum(r.task == o for r, o in zip(routes, owner, strict=True)) / len(owner)


def predictor_agrees(
    predictor: Predictor, data: dict[str, Any], data_root: Path, count: int = 32
) -> dict[str, Any]:
    """The Predictor's own `auto` routing against the offline scoring, on `count` images/task."""
    profiles = profiles_for(data["means"], data["counts"], "class prototypes")
    for task, profile in profiles.items():
        profile.preprocess = predictor.preprocess(task)
        predictor.model.task(task).routing = profile
    agree = total = 0
    splits = {t: load_splits(task_data(predictor, t, data_root)) for t in predictor.tasks}
    for task in predictor.tasks:
        chosen = stratified_subset([s.label for s in splits[task].test], count)
        paths = [splits[task].test[i].path for i in chosen]
        answers = predictor.predict(paths, "auto")
        agree += sum(a.task == task for a in answers)
        total += len(answers)
    return {"images": total, "routed_to_own_task": agree / total}


def untrained_predictor(args: argparse.Namespace) -> Predictor:
    """EfficientNet-Lite0 with one untrained (classifier) task per dataset: routing uses only the
    frozen backbone, so its accuracy can be measured before the tasks are trained."""
    backbone = create_backbone("efficientnet_lite0")
    model = PiggybackModel(backbone.model, backbone_spec=backbone.spec)
    for name in args.routing_datasets:
        splits = load_splits(args.data_root / name)
        task = model.add_task(name, splits.num_classes, method="classifier", seed=0)
        size = args.routing_image_size
        task.metadata.preprocess = Preprocess.from_data_config(backbone.data_config, size).to_dict()
    return Predictor(model, max_cached_tasks=None)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def routing_on_real_data(args: argparse.Namespace) -> dict[str, Any]:
    trained = args.routing_model is not None
    if trained:
        predictor = Predictor.from_pretrained(args.routing_model, device="cpu")
    else:
        predictor = untrained_predictor(args)
    data = cached_measure(predictor, args, trained)
    kinds = ("class prototypes", "class means, all", "task mean")
    kinds += ("entropy",) if trained else ()
    methods = {kind: score(data, kind) for kind in kinds}
    stress_mix = {kind: stress(data, kind) for kind in kinds if kind != "entropy"}
    check = predictor_agrees(predictor, data, args.data_root)
    sizes = profiles_for(data["means"], data["counts"], "class prototypes")
    tasks = " + ".join(f"{t} ({len(data['test'][t]['labels'])})" for t in data["tasks"])
    source = args.routing_model.name if trained else "frozen EfficientNet-Lite0, tasks untrained"
    table = [
        f"Routing on real data ({source}): test images of {tasks} mixed.",
        "",
        "| method | routing accuracy | per task | end-to-end top-1 | known-task top-1 "
        "| same-domain stress mix (4 half tasks) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, m in methods.items():
        per = ", ".join(f"{t} {100 * v:.2f}" for t, v in m["per_task"].items())
        table.append(
            f"| {kind} | {percent(m['routing_accuracy'])} | {per} | "
            f"{percent(m['end_to_end_top1'])} | {percent(m['known_task_top1'])} | "
            f"{percent(stress_mix.get(kind))} |"
        )
    table.append("")
    table.append(
        "Prototype bytes per task (float16): "
        + ", ".join(f"{t} {p.nbytes}" for t, p in sizes.items())
        + f"; Predictor `auto` on {check['images']} test images: "
        f"{100 * check['routed_to_own_task']:.2f}% to their own task."
    )
    return {
        "methods": methods,
        "stress_mix": stress_mix,
        "predictor_check": check,
        "prototypes": {t: p.describe() for t, p in sizes.items()},
        "table": table,
    }
