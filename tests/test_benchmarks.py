"""The benchmark scripts run end to end on a tiny backbone and tiny data."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.slow


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_accuracy_benchmark_tables_plots_and_order_check(tiny_data, tiny_weights, tmp_path):
    accuracy = load("accuracy")
    out = tmp_path / "out"
    report = accuracy.main(
        [
            "--dataset", f"colours={tiny_data}",
            "--dataset", f"again={tiny_data}",
            "--backbone", "timm:test_efficientnet",
            "--weights", str(tiny_weights),
            "--epochs", "1",
            "--image-size", "32",
            "--batch-size", "8",
            "--workers", "0",
            "--work-dir", str(tmp_path / "work"),
            "--out", str(out),
        ]
    )  # fmt: skip
    runs = report["runs"]
    assert len(runs) == 2 * sum(len(points) for points in accuracy.GRID.values())
    for method in accuracy.METHODS:
        for name in ("colours", "again"):
            chosen = report["selected"][method][name]
            group = [r for r in runs if r["method"] == method and r["dataset"] == name]
            assert chosen["tuned"]["val_top1"] == max(r["val_top1"] for r in group)
            assert chosen["paper"]["point"] == "paper"
    assert all(t["files_identical"] for t in report["order_check"]["tasks"].values())
    for name in ("table.md", "accuracy.png", "density-colours.png", "results.json"):
        assert (out / name).is_file(), name
    assert "| piggyback | paper recipe |" in (out / "table.md").read_text()


def test_cost_benchmark_reports_ratios(tmp_path):
    cost = load("cost")
    out = tmp_path / "cost"
    report = cost.main(
        ["--models", "timm:test_efficientnet", "--image-size", "32", "--batch-size", "4",
         "--steps", "1", "--repeats", "1", "--out", str(out)]
    )  # fmt: skip
    result = report["results"]["timm:test_efficientnet"]
    assert set(result["train_seconds"]) == {"piggyback", "finetune", "classifier"}
    assert all(v > 0 for v in result["train_peak_bytes"].values())
    assert result["storage"]["finetuned_over_task"] > 1
    assert result["inference"]["batch1"]["ratio"] > 0
    assert json.loads((out / "results.json").read_text())["environment"]["machine"]["cores"]
    assert "pb / ft time" in (out / "table.md").read_text()


def test_mask_codec_benchmark_measures_real_and_synthetic_masks(tiny_weights, tmp_path):
    import torch

    from piggyback import PiggybackModel
    from piggyback.backbones import create_backbone

    backbone = create_backbone("timm:test_efficientnet", weights=tiny_weights)
    model = PiggybackModel(backbone.model, backbone_spec=backbone.spec)
    model.add_task("learned", 3, seed=0)
    generator = torch.Generator().manual_seed(0)
    for _, scores in model.task("learned").scores.items():
        scores.data[torch.rand(scores.shape, generator=generator) < 0.03] = 0.0  # switched off
    model.save_pretrained(tmp_path / "model")
    benchmark = load("mask_codecs")
    out = tmp_path / "codec"
    report = benchmark.main(
        ["--real", str(tmp_path / "model"), "--models", "timm:test_efficientnet",
         "--densities", "0.99", "--repeats", "1", "--out", str(out)]
    )  # fmt: skip
    results = report["results"]
    assert [r["set"] for r in results] == ["model/learned", *["iid 0.990"] * 2, "channels"]
    learned = results[0]
    assert 0.95 < learned["density"] < 0.99
    for result in results:
        assert set(result["codecs"]) == {"packed", "zstd", "ans", "zstd(packed)"}
        assert result["codecs"]["zstd"]["bytes"] < result["codecs"]["packed"]["bytes"]
        assert result["load_seconds"]["packed"] > 0 and result["coded_load_ratio"] > 0
    assert json.loads((out / "results.json").read_text())["environment"]["versions"]["zstandard"]
    assert "zstd bits/weight" in (out / "table.md").read_text()


def test_serve_load_benchmark_compares_batched_and_one_at_a_time_servers(tiny_weights, tmp_path):
    serve_load = load("serve_load")
    out = tmp_path / "serve"
    report = serve_load.main(
        ["--backbone", "timm:test_efficientnet", "--weights", str(tiny_weights), "--tasks", "2",
         "--image-size", "32", "--num-images", "4", "--clients", "1", "4", "--requests", "8",
         "--repeats", "1", "--max-batch-size", "4", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    assert report["tasks"] == ["task0", "task1"]
    for clients in ("1", "4"):
        row = report["results"][clients]
        for mode in ("batched", "one_at_a_time"):
            assert row[mode]["requests"] == 8 and row[mode]["failures"] == 0
            assert 0 < row[mode]["p50_ms"] <= row[mode]["p99_ms"]
        assert row["one_at_a_time"]["mean_batch_size"] == 1.0
        assert row["one_at_a_time"]["batch_sizes"] == {"1": 8}
        assert sum(int(s) * n for s, n in row["batched"]["batch_sizes"].items()) == 8
        assert row["speedup"] == round(
            row["batched"]["throughput_rps"] / row["one_at_a_time"]["throughput_rps"], 2
        )
        assert row["round_speedups"] == [row["speedup"]]  # one round: its ratio is the headline
    assert 1.0 <= report["results"]["4"]["batched"]["mean_batch_size"] <= 4
    assert "| 4 |" in (out / "table.md").read_text()
    alone = report["model_only"]
    assert alone["images"] == 4 and alone["speedup"] > 0


def test_serving_benchmark_measures_memory_switches_mixed_batches_and_routing(
    tiny_data, tiny_weights, tmp_path
):
    from conftest import write_image_folder
    from typer.testing import CliRunner

    from piggyback.cli import app

    model = tmp_path / "model"
    shades = write_image_folder(tmp_path / "shades", {"train": 6, "test": 3}, classes=4, size=30)
    for task, data in (("colours", tiny_data), ("shades", shades)):
        args = [
            "train", "--data", data, "--task", task, "--output", model,
            "--backbone", "timm:test_efficientnet", "--weights", tiny_weights,
            "--epochs", 1, "--batch-size", 8, "--image-size", 32, "--workers", 0, "--no-progress",
        ]  # fmt: skip
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    report = load("serving").main(
        ["--models", "timm:test_efficientnet", "--task-counts", "2", "--image-size", "32",
         "--batch-size", "4", "--steps", "1", "--repeats", "1", "--threads", "1",
         "--routing-model", str(model), "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    )  # fmt: skip
    result = report["results"]["models"]["timm:test_efficientnet"]
    assert [row["tasks"] for row in result["memory"]] == [2]
    for row in result["memory"]:  # the accounting is the packed bits + head of each task
        assert 0 < row["accounted_tasks_bytes"] <= row["file_bytes"]
        assert row["cached_tasks"] == 2
    timings = result["timings"]
    assert timings["mixed_batch"]["ratio"] > 0 and timings["switch_batch1"]["cold"] > 0
    assert timings["mixed_batch"]["invariant_ratio"] > 0
    assert set(timings["routing"]) == {"batch1", "batch4"}
    routing = report["results"]["routing_real"]
    assert set(routing["methods"]) == {
        "class prototypes",
        "class means, all",
        "task mean",
        "entropy",
    }
    for method in routing["methods"].values():
        assert 0 <= method["routing_accuracy"] <= 1 and method["images"] == 9 + 12
        assert method["known_task_top1"] is not None
    assert "routing accuracy" in (out / "table.md").read_text()
