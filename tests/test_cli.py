"""The command line end to end on a tiny backbone: train -> eval -> predict -> info -> export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from piggyback import PiggybackModel
from piggyback.cli import app
from piggyback.predict import eval_transform
from piggyback.routing import NoRoutingProfileWarning

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained_dir(tiny_data, tiny_weights, tmp_path_factory):
    output = tmp_path_factory.mktemp("cli") / "model"
    text = invoke(
        "train",
        "--data", tiny_data,
        "--task", "colours",
        "--output", output,
        "--backbone", "timm:test_efficientnet",
        "--weights", tiny_weights,
        "--epochs", 2,
        "--batch-size", 8,
        "--image-size", 32,
        "--lr", 1e-2,
        "--workers", 0,
        "--no-progress",
    )  # fmt: skip
    assert "epoch   2/2" in text and "test top-1:" in text
    return output


def test_every_command_has_help():
    for command in ("train", "eval", "predict", "info", "export", "serve"):
        assert "Usage" in invoke(command, "--help")


def test_eval_prints_and_writes_json(trained_dir, tiny_data, tmp_path):
    out = tmp_path / "eval.json"
    text = invoke(
        "eval",
        trained_dir,
        "--task",
        "colours",
        "--data",
        tiny_data,
        "--output",
        out,
        "--no-progress",
    )
    result = json.loads(out.read_text())
    assert result["split"] == "test" and result["images"] == 9
    assert set(result["per_class"]) == {"class_0", "class_1", "class_2"}
    assert f"top-1 {result['top1']:.2f}%" in text and "class_1" in text
    saved = json.loads((trained_dir / "runs/colours/results.json").read_text())
    assert result["top1"] == pytest.approx(saved["test_top1"])  # same task, same numbers


def test_eval_refuses_a_dataset_with_other_classes(trained_dir, tmp_path):
    from conftest import write_image_folder

    other = write_image_folder(tmp_path / "four", {"train": 2, "test": 2}, classes=4)
    args = ["eval", str(trained_dir), "--task", "colours", "--data", str(other)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "has 4 classes, but task 'colours' predicts 3" in result.output


def test_predict_gives_class_names_with_probabilities(trained_dir, tiny_data):
    folder = tiny_data / "test" / "class_2"
    rows = json.loads(
        invoke("predict", trained_dir, folder, "--task", "colours", "--top-k", 2, "--json")
    )
    assert len(rows) == 3
    for row in rows:
        probabilities = [t["probability"] for t in row["top"]]
        assert len(row["top"]) == 2 and probabilities == sorted(probabilities, reverse=True)
        assert {t["class"] for t in row["top"]} <= {"class_0", "class_1", "class_2"}
    text = invoke("predict", trained_dir, next(folder.iterdir()), "--task", "colours")
    assert "class_" in text and "%" in text


def copied_with_a_second_task(trained_dir, tmp_path) -> Path:
    """The trained model directory with task 'colours' also loaded as 'copy' (no prototypes)."""
    directory = Path(shutil.copytree(trained_dir, tmp_path / "model"))
    model = PiggybackModel.from_pretrained(directory)
    model.load_task(directory / "tasks" / "colours.safetensors", "copy")
    model.task("copy").routing = None
    model.save_pretrained(directory, tasks=["copy"])
    return directory


def test_predict_routes_with_auto_and_answers_with_several_tasks(trained_dir, tiny_data, tmp_path):
    folder = tiny_data / "test" / "class_0"
    rows = json.loads(invoke("predict", trained_dir, folder, "--task", "auto", "--json"))
    assert len(rows) == 3
    for row in rows:  # one task, with prototypes from training
        assert row["task"] == "colours" and row["routed_by"] == "prototypes"
        assert row["confidence"] == 1.0 and row["path"].startswith(str(folder))
    directory = copied_with_a_second_task(trained_dir, tmp_path)
    args = ("predict", directory, folder, "--task", "copy", "--task", "colours", "--json")
    rows = json.loads(invoke(*args))
    assert [row["task"] for row in rows] == ["copy", "colours"] * 3
    assert [row["path"] for row in rows[::2]] == [row["path"] for row in rows[1::2]]
    assert rows[0]["top"] == rows[1]["top"] and "confidence" not in rows[0]
    text = invoke("predict", directory, folder, "--task", "copy", "--task", "colours")
    assert text.count("[copy]") == 3 and text.count("[colours]") == 3
    with pytest.warns(NoRoutingProfileWarning, match="copy"):
        auto = json.loads(invoke("predict", directory, folder, "--task", "auto", "--json"))
    assert {row["routed_by"] for row in auto} == {"entropy"}  # 'copy' has no prototypes


def test_route_fit_adds_prototypes_to_a_saved_task(trained_dir, tiny_data, tmp_path):
    from piggyback import Predictor

    saved = Predictor.from_pretrained(trained_dir).task_description("colours")["routing"]
    assert saved["images"] == 24 and saved["prototypes"] == 3  # training: 3 classes x 8 images
    directory = copied_with_a_second_task(trained_dir, tmp_path)
    text = invoke("route-fit", directory, "--task", "copy", "--data", tiny_data, "--workers", 0)
    assert "3 routing prototypes from 24 images" in text
    predictor = Predictor.from_pretrained(directory)
    fitted = predictor.model.task("copy").routing
    # The same images as training used; other batch sizes round differently (float16 storage).
    trained = predictor.model.task("colours").routing.prototypes
    torch.testing.assert_close(fitted.prototypes, trained, atol=1e-3, rtol=0)
    rows = json.loads(invoke("predict", directory, tiny_data / "test", "--task", "auto", "--json"))
    assert {row["routed_by"] for row in rows} == {"prototypes"}


def test_info_describes_the_model_directory(trained_dir):
    text = invoke("info", trained_dir, "--verbose")
    assert "colours" in text and "sha256:" in text
    description = json.loads(invoke("info", trained_dir, "--json"))
    task = description["tasks"]["colours"]
    assert task["bytes"] == (trained_dir / "tasks/colours.safetensors").stat().st_size
    assert 0 < task["density"] <= 1 and task["layer_density"]


def test_export_onnx_matches_pytorch(trained_dir, tiny_data, tmp_path):
    import onnxruntime

    invoke("export", trained_dir, "--task", "colours", "--output", tmp_path, "--format", "onnx")
    model = PiggybackModel.from_pretrained(trained_dir, tasks=["colours"])
    model.set_task("colours")
    model.eval()
    transform = eval_transform(model, "colours")
    from PIL import Image

    images = sorted((tiny_data / "test").rglob("*.jpg"))[:4]
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    session = onnxruntime.InferenceSession(str(tmp_path / "colours.onnx"))
    name = session.get_inputs()[0].name
    onnx_out = session.run(None, {name: batch.numpy()})[0]
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-4, atol=1e-5)


def test_config_file_with_flag_override_and_clear_errors(tiny_data, tiny_weights, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'data = "{tiny_data}"\nbackbone = "timm:test_efficientnet"\nweights = "{tiny_weights}"\n'
        "epochs = 5\nbatch_size = 8\nimage_size = 32\nworkers = 0\nprogress = false\n"
    )
    output = tmp_path / "m"
    invoke("train", "--config", config, "--epochs", 1, "--output", output, "--task", "t")
    lines = (output / "runs/t/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the flag overrode the file's 5 epochs

    missing = runner.invoke(
        app, ["train", "--data", str(tmp_path / "nowhere"), "--output", str(output)]
    )
    assert missing.exit_code == 2 and "error:" in missing.output and "nowhere" in missing.output
    bad = runner.invoke(
        app, ["train", "--config", str(config), "--method", "magic", "--output", str(output)]
    )
    assert bad.exit_code == 2 and "unknown method 'magic'" in bad.output
    unknown = runner.invoke(app, ["eval", str(output), "--task", "nope", "--data", str(tiny_data)])
    assert unknown.exit_code == 2 and "nope" in unknown.output
