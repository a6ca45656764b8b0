"""Describing a saved model directory from its files alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, randomize_norms
from test_export import CLASSES, PREPROCESS
from test_model import train_steps

from piggyback import PiggybackConfig, PiggybackModel, TaskFileError
from piggyback.describe import describe_model_dir, format_description
from piggyback.fileio import content_checksum

METHODS = {"masks": "piggyback", "head_only": "classifier", "full": "finetune"}


def saved_model(directory: Path, config: PiggybackConfig) -> PiggybackModel:
    """One trained task per method, with class names and training info, saved to `directory`."""
    torch.manual_seed(0)
    model = PiggybackModel(randomize_norms(TinyCNN()).eval(), config)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for seed, (name, method) in enumerate(METHODS.items()):
        model.add_task(name, 3, method=method, class_names=CLASSES, seed=seed)
        model.set_task(name)
        train_steps(model, images)
        model.task(name).metadata.preprocess = PREPROCESS
        model.task(name).metadata.results = {"test_top1": 0.75}
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=["binary", "ternary"])
def saved(request, tmp_path_factory) -> tuple[Path, PiggybackModel]:
    """Built once per module (training is the slow part); tests that damage it take a copy."""
    directory = tmp_path_factory.mktemp(request.param)
    kind = request.param
    config = PiggybackConfig(mask_kind=kind, task_norms=kind == "ternary")
    return directory, saved_model(directory, config)


def copy_of(saved: tuple[Path, PiggybackModel], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "model"))


def test_describe_matches_the_model(saved):
    directory, model = saved
    kind = model.config.mask_kind
    desc = describe_model_dir(directory)
    json.dumps(desc)  # JSON-ready, for --json output
    assert desc["backbone"]["fingerprint"] == model.fingerprint
    assert desc["backbone"]["head"] == "fc"
    assert desc["backbone"]["num_masked"] == model.num_masked
    assert desc["masked_tensors"] == len(model.targets)
    assert desc["config"] == model.config.to_dict()
    assert list(desc["tasks"]) == list(METHODS)
    for name, method in METHODS.items():
        task = desc["tasks"][name]
        path = directory / "tasks" / f"{name}.safetensors"
        assert task["error"] is None
        assert task["method"] == method
        assert task["num_classes"] == 3
        assert task["class_names"] == CLASSES
        assert task["file"] == str(path)
        assert task["bytes"] == path.stat().st_size
        assert task["info"] == {"preprocess": PREPROCESS, "results": {"test_top1": 0.75}}
        assert task["fingerprint_matches"]
    masks = desc["tasks"]["masks"]
    assert masks["bits_per_weight"] == {"binary": 1, "ternary": 2}[kind]
    assert masks["mask_kind"] == kind
    assert masks["layer_density"] == model.mask_density("masks")  # exactly
    assert masks["density"] == pytest.approx(model.overall_density("masks"), abs=1e-12)
    assert masks["density"] < 1.0
    for name in ("head_only", "full"):
        assert desc["tasks"][name]["density"] is None
        assert desc["tasks"][name]["layer_density"] is None
    assert desc["total_bytes"] == sum(p.stat().st_size for p in (directory / "tasks").iterdir())


def test_format_description_lists_tasks_and_densities(saved):
    directory, model = saved
    desc = describe_model_dir(directory)
    text = format_description(desc)
    for name in METHODS:
        assert name in text
    assert "piggyback" in text and "classifier" in text and "finetune" in text
    assert "cat, dog, bird" in text
    assert "test_top1=0.75" in text
    assert "stem.weight" not in text  # per-layer densities only when verbose
    verbose = format_description(desc, verbose=True)
    for layer, density in model.mask_density("masks").items():
        assert f"{layer}  " in verbose and f"{density:.4f}" in verbose
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["task", "method"])
    header, _, *rows = lines[start : start + 2 + len(METHODS)]
    for row, method in zip(rows, METHODS.values(), strict=True):  # columns aligned
        assert row.index(method) == header.index("method")


def test_a_broken_task_file_does_not_hide_the_others(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    path = directory / "tasks" / "full.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    (directory / "tasks" / "head_only.safetensors").unlink()
    desc = describe_model_dir(directory)
    assert "truncated or corrupted" in desc["tasks"]["full"]["error"]
    assert "no task file" in desc["tasks"]["head_only"]["error"]
    assert desc["tasks"]["head_only"]["bytes"] is None
    assert desc["tasks"]["masks"]["error"] is None
    text = format_description(desc)
    assert "error" in text and "missing" in text


def test_describe_builds_no_backbone(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    config = json.loads((directory / "piggyback_config.json").read_text())
    config["backbone"]["spec"] = {
        "name": "no_such_net",
        "source": "timm",
        "pretrained": True,
        "weights": None,
    }
    config["checksum"] = content_checksum(config)  # a consistent index naming another backbone
    (directory / "piggyback_config.json").write_text(json.dumps(config))
    desc = describe_model_dir(directory)
    assert desc["backbone"]["spec"]["name"] == "no_such_net"
    assert "no_such_net (timm, pretrained)" in format_description(desc)


def test_refuses_a_folder_that_is_no_model_directory(tmp_path):
    with pytest.raises(TaskFileError, match=r"piggyback_config\.json"):
        describe_model_dir(tmp_path)
