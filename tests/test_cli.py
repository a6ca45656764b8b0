"""The command line end to end on a tiny backbone: train -> eval -> predict -> info -> export."""

from __future__ import annotations

import errno
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


def test_predict_batch_invariant_answers_each_image_exactly_as_alone(trained_dir, tiny_data):
    folder = tiny_data / "test" / "class_1"
    args = ("predict", trained_dir, "--task", "colours", "--json", "--batch-invariant")
    together = json.loads(invoke(args[0], args[1], folder, *args[2:]))
    alone = [json.loads(invoke(args[0], args[1], row["path"], *args[2:]))[0] for row in together]
    assert together == alone and len(together) == 3


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


def test_warnings_reach_the_terminal_as_one_line_without_source_paths(
    trained_dir, tiny_data, tmp_path
):
    import os
    import subprocess
    import sys

    directory = copied_with_a_second_task(trained_dir, tmp_path)
    folder = tiny_data / "test" / "class_0"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    script = Path(sys.executable).with_name("piggyback")  # the installed console command
    for program in ([str(script)], [sys.executable, "-m", "piggyback.cli"]):
        command = [*program, "predict", str(directory), str(folder), "--task", "auto", "--json"]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        warned = [line for line in out.stderr.splitlines() if "routing prototypes" in line]
        assert len(warned) == 1
        assert warned[0].startswith("warning: task(s) ['copy'] have no routing")
        assert ".py:" not in out.stderr and "warnings.warn" not in out.stderr


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


def test_route_fit_keeps_the_mask_codec_and_head_dtype_convert_chose(
    trained_dir, tiny_data, tmp_path
):
    from piggyback.taskfile import read_task_file

    directory = copied_with_a_second_task(trained_dir, tmp_path)
    invoke("convert", directory, "--head-dtype", "float16", "--codec", "packed")
    invoke("route-fit", directory, "--task", "copy", "--data", tiny_data, "--workers", 0)
    meta, tensors = read_task_file(directory / "tasks" / "copy.safetensors")
    assert (meta["codec"], meta["head_dtype"]) == ("packed", "float16")
    assert meta["routing"] is not None and tensors["head/weight"].dtype == torch.float16


def test_a_task_asked_for_twice_is_answered_once(trained_dir, tiny_data):
    image = next((tiny_data / "test" / "class_2").iterdir())
    once = invoke("predict", trained_dir, image, "--task", "colours")
    assert invoke("predict", trained_dir, image, "--task", "colours", "--task", "colours") == once


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
    assert bad.exit_code == 2 and "--method must be one of piggyback" in bad.output
    unknown = runner.invoke(app, ["eval", str(output), "--task", "nope", "--data", str(tiny_data)])
    assert unknown.exit_code == 2 and "nope" in unknown.output


# -- failures: one line, exit status 2, nothing written -----------------------------------------


def fail(*args: object, code: int = 2) -> str:
    """Run a command that must fail with `code` and one `error:` line on stderr; that line."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def tiny_train_args(data, weights, output, *extra: object) -> list[object]:
    return [
        "train", "--data", data, "--output", output, "--backbone", "timm:test_efficientnet",
        "--weights", weights, "--epochs", 1, "--batch-size", 8, "--image-size", 32,
        "--workers", 0, "--no-progress", *extra,
    ]  # fmt: skip


def files_below(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_an_output_whose_parent_is_a_file_fails_before_any_work(tiny_data, trained_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = fail(*tiny_train_args(tiny_data, "unused", blocker / "model"))
    assert f"{blocker} is a file, not a folder" in line
    line = fail("eval", trained_dir, "--task", "colours", "--data", tiny_data,
                "--output", blocker / "eval.json")  # fmt: skip
    assert "is a file, not a folder" in line
    line = fail("export", trained_dir, "--task", "colours", "--output", blocker / "export")
    assert "is a file, not a folder" in line
    assert files_below(tmp_path) == ["a-file"]


def test_a_read_only_destination_is_found_before_eval_and_export_work(
    trained_dir, tiny_data, tmp_path, monkeypatch
):
    import tempfile

    import piggyback.evaluation
    import piggyback.export

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    def never(*args, **kwargs):
        raise AssertionError("the work started before the destination was checked")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(piggyback.evaluation, "evaluate_task", never)
    monkeypatch.setattr(piggyback.export, "export_task", never)
    line = fail("eval", trained_dir, "--task", "colours", "--data", tiny_data,
                "--output", tmp_path / "ro" / "eval.json")  # fmt: skip
    assert "cannot write the result to" in line and "Read-only file system" in line
    line = fail("export", trained_dir, "--task", "colours", "--output", tmp_path / "ro")
    assert "cannot write the export to" in line and "Read-only file system" in line
    assert files_below(tmp_path) == []


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(
    trained_dir, tiny_data, tmp_path, monkeypatch
):
    from pathlib import Path

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    out = tmp_path / "eval.json"
    line = fail("eval", trained_dir, "--task", "colours", "--data", tiny_data,
                "--output", out, "--no-progress")  # fmt: skip
    assert line.startswith("error: No space left on device:") and "free some space" in line
    assert files_below(tmp_path) == []  # neither eval.json nor its temporary file


def test_failed_runs_leave_no_model_directory_and_no_run_folder(
    tiny_data, tiny_weights, tmp_path, trained_dir
):
    import shutil

    from conftest import write_image_folder

    empty_class = write_image_folder(tmp_path / "empty-class", {"train": 2, "test": 2})
    shutil.rmtree(empty_class / "train" / "class_1")
    (empty_class / "train" / "class_1").mkdir()
    unreadable = write_image_folder(tmp_path / "unreadable", {"train": 4, "test": 2})
    (unreadable / "train" / "class_0" / "0.jpg").write_bytes(b"<html>not an image</html>")
    bad_weights = tmp_path / "bad.safetensors"
    bad_weights.write_bytes(b"not safetensors")
    cases = {
        "missing data": (tmp_path / "nowhere", tiny_weights, []),
        "empty class folder": (empty_class, tiny_weights, []),
        "bad weights": (tiny_data, bad_weights, []),
        "--strict": (unreadable, tiny_weights, ["--strict"]),
    }
    for name, (data, weights, extra) in cases.items():
        output = tmp_path / f"model-{name}"
        fail(*tiny_train_args(data, weights, output, "--task", "t", *extra))
        assert not output.exists(), name
    existing = tmp_path / "existing"
    shutil.copytree(trained_dir, existing)
    before = files_below(existing)
    fail(*tiny_train_args(tmp_path / "nowhere", tiny_weights, existing, "--task", "t2"))
    assert files_below(existing) == before  # no runs/t2/config.yaml


def test_a_non_ascii_dataset_folder_gives_a_valid_default_task_name(tiny_weights, tmp_path):
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "données", {"train": 3, "test": 2})
    text = invoke(*tiny_train_args(data, tiny_weights, tmp_path / "m", "--max-train-batches", 1))
    assert "task name 'donnees' (from the dataset's folder name" in text
    assert (tmp_path / "m" / "tasks" / "donnees.safetensors").is_file()


def test_a_backbone_mismatch_names_what_the_new_run_asked_for(
    trained_dir, tiny_data, tiny_weights, tmp_path
):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    other = tmp_path / "other-weights.safetensors"
    state = timm.create_model("test_efficientnet").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    before = files_below(trained_dir)
    line = fail(*tiny_train_args(tiny_data, other, trained_dir, "--task", "t2"))
    assert f"'weights': '{tiny_weights}'" in line  # the directory's backbone
    assert "this run asked for backbone {'name': 'test_efficientnet'" in line
    assert f"'weights': '{other}'" in line  # what the new run asked for
    assert files_below(trained_dir) == before


def test_info_exits_non_zero_and_names_broken_or_missing_task_files(trained_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained_dir, model)
    task_file = model / "tasks" / "colours.safetensors"
    task_file.write_bytes(task_file.read_bytes()[:100])  # truncated
    line = fail("info", model, code=1)
    assert "1 task(s)" in line and "colours (" in line and "not a readable safetensors" in line
    task_file.unlink()
    assert "colours (TaskFileError: no task file at" in fail("info", model, "--json", code=1)


def test_version():
    from piggyback import __version__

    assert invoke("--version").strip() == f"piggyback {__version__}"


def test_info_reads_task_records_without_loading_torchvision(trained_dir):
    """Checking a task's preprocessing record must not import the image stack: it made
    `piggyback info` twice as slow to start."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from typer.testing import CliRunner; from piggyback.cli import app; "
        f"result = CliRunner().invoke(app, ['info', {str(trained_dir)!r}]); "
        "print(result.exit_code, 'torchvision' in sys.modules)"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["0", "False"]
