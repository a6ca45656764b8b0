"""Model directories: index entries stay inside the directory, concurrent writers lose no task,
and task files the index misses are listed and can be put back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_serialization import make_model, trained
from typer.testing import CliRunner

from piggyback import PiggybackModel, TaskFileError
from piggyback import model_dir as md
from piggyback.cli import app
from piggyback.describe import describe_model_dir, format_description
from piggyback.repair import repair_index, unindexed_task_files

TESTS = Path(__file__).resolve().parent
SRC = Path(md.__file__).resolve().parents[1]  # the piggyback under test, for child processes


@pytest.fixture
def model_dir(tmp_path, images) -> Path:
    """A directory holding tasks "t" (trained) and "other"."""
    model = trained(images)
    model.add_task("other", 5, seed=1)
    return model.save_pretrained(tmp_path / "model")


def edit_index(directory: Path, edit) -> None:
    """Change the index as someone crafting it would: with a matching checksum."""
    path = directory / md.CONFIG_NAME
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(md.sealed(config)))


def load(directory: Path) -> PiggybackModel:
    return PiggybackModel.from_pretrained(directory, make_model().unload())


# -- item 2: index entries --------------------------------------------------------------------


@pytest.fixture
def outside_file(tmp_path, images) -> Path:
    """A valid task file "t" of the same backbone in another model directory."""
    return trained(images).save_pretrained(tmp_path / "elsewhere") / "tasks" / "t.safetensors"


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink"])
def test_an_index_entry_leading_out_of_the_directory_is_refused(model_dir, outside_file, how):
    if how == "symlink":
        (model_dir / "tasks" / "t.safetensors").unlink()
        (model_dir / "tasks" / "t.safetensors").symlink_to(outside_file)
        file = "tasks/t.safetensors"
    else:
        file = "../elsewhere/tasks/t.safetensors" if how == "dot-dot" else str(outside_file)

    def point_outside(index):
        index["tasks"]["t"]["file"] = file

    edit_index(model_dir, point_outside)
    with pytest.raises(TaskFileError, match=r"task 't' points to .*out.* the model directory"):
        load(model_dir)
    assert "model directory" in describe_model_dir(model_dir)["tasks"]["t"]["error"]


def test_the_name_inside_a_task_file_must_match_its_index_entry(model_dir):
    edit_index(model_dir, lambda index: index["tasks"].update(renamed=index["tasks"].pop("t")))
    with pytest.raises(TaskFileError, match=r"holds task 't', but the model index lists it as 'r"):
        load(model_dir)
    assert "holds task 't'" in describe_model_dir(model_dir)["tasks"]["renamed"]["error"]


def test_an_invalid_config_in_the_index_is_a_task_file_error(model_dir):
    edit_index(model_dir, lambda index: index["config"].update(init="onas"))
    with pytest.raises(TaskFileError, match=r"invalid 'config'.*onas"):
        load(model_dir)


def test_entries_inside_the_directory_still_load(model_dir):
    (model_dir / "tasks" / "sub").mkdir()
    (model_dir / "tasks" / "t.safetensors").rename(model_dir / "tasks" / "sub" / "t.safetensors")
    edit_index(model_dir, lambda index: index["tasks"]["t"].update(file="tasks/sub/t.safetensors"))
    assert load(model_dir).tasks == ["t", "other"]


# -- item 3: concurrent writers ---------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from test_serialization import make_model

    directory, worker, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    model = make_model()
    names = [f"w{worker}_{i}" for i in range(rounds)]
    for name in names:
        model.add_task(name, 2, seed=worker)
    (directory.parent / f"ready{worker}").touch()
    while not (directory.parent / "go").exists():
        time.sleep(0.01)
    for name in names:
        model.save_pretrained(directory, tasks=[name])
    """
)


def test_processes_saving_tasks_into_one_directory_at_once_keep_every_task(tmp_path):
    workers, rounds = 4, 4
    directory = tmp_path / "shared" / "model"
    directory.parent.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory), str(worker), str(rounds)],
            env=env,
            cwd=TESTS,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(workers)
    ]
    deadline = time.monotonic() + 300
    while not all((directory.parent / f"ready{w}").exists() for w in range(workers)):
        assert all(p.poll() is None for p in processes), [p.stderr.read() for p in processes]
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.05)
    (directory.parent / "go").touch()  # all start saving at the same moment
    for process in processes:
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors
    expected = {f"w{w}_{i}" for w in range(workers) for i in range(rounds)}
    assert set(md.read_model_config(directory)["tasks"]) == expected
    assert unindexed_task_files(directory) == []
    assert set(load(directory).tasks) == expected


def test_a_writer_waits_for_the_lock_and_gives_up_with_one_line(model_dir, monkeypatch):
    model = make_model()
    model.add_task("late", 2, seed=0)
    monkeypatch.setattr(md, "LOCK_TIMEOUT_S", 0.2)
    with md.index_lock(model_dir):
        with pytest.raises(TaskFileError, match=r"another process has been writing to .*model"):
            model.save_pretrained(model_dir, tasks=["late"])
        saver = threading.Thread(target=model.save_pretrained, args=(model_dir, ["late"]))
        monkeypatch.setattr(md, "LOCK_TIMEOUT_S", 60)
        saver.start()
        time.sleep(0.3)
        assert "late" not in md.read_model_config(model_dir)["tasks"]  # waiting for the lock
    saver.join(60)
    assert "late" in md.read_model_config(model_dir)["tasks"]


# -- item 3: task files the index misses ------------------------------------------------------


def test_task_files_missing_from_the_index_are_listed_and_repaired(model_dir, tmp_path, images):
    lost = trained(images, name="lost").save_task(model_dir / "tasks" / "lost.safetensors")
    foreign = make_model(seed=7)
    foreign.add_task("foreign", 2, seed=0)
    foreign.save_task(model_dir / "tasks" / "foreign.safetensors", "foreign")
    (model_dir / "tasks" / ".half-written.safetensors.tmp").write_bytes(b"")
    assert unindexed_task_files(model_dir) == [
        model_dir / "tasks" / "foreign.safetensors",
        lost,
    ]
    text = format_description(describe_model_dir(model_dir))
    assert "index does not list" in text and "lost.safetensors" in text

    result = CliRunner().invoke(app, ["repair", str(model_dir)])
    assert result.exit_code == 2, result.output  # one file could not be added
    assert "added to the index: lost" in result.output
    assert "foreign.safetensors was made for another backbone" in result.output
    assert load(model_dir).tasks == ["t", "other", "lost"]
    added, refused = repair_index(model_dir)  # once added, a file is no longer missing
    assert added == [] and len(refused) == 1 and "foreign.safetensors" in refused[0]


def test_repair_refuses_a_second_file_for_a_listed_task(model_dir):
    copy = model_dir / "tasks" / "copy_of_t.safetensors"
    copy.write_bytes((model_dir / "tasks" / "t.safetensors").read_bytes())
    added, refused = repair_index(model_dir)
    assert added == [] and "which the index lists with another file" in refused[0]
