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
