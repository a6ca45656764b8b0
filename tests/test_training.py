"""Training runs on a tiny backbone and tiny data: recipe, selection, checkpoints, resume."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from piggyback import FingerprintMismatchError, PiggybackModel
from piggyback.training import NonFiniteLossError, RunError, TrainConfig, train
from piggyback.training import loop as loop_module
from piggyback.training.checkpoint import read_checkpoint
from piggyback.training.recipe import merge_options, read_config_file


def tiny_config(data, weights, output, **overrides) -> TrainConfig:
    options = {
        "data": str(data),
        "output": str(output),
        "backbone": "timm:test_efficientnet",
        "weights": str(weights),
        "epochs": 3,
        "batch_size": 8,
        "image_size": 32,
        "workers": 0,
        "progress": False,
        "lr": 1e-2,
        "task": "data",
    }
    return TrainConfig(**{**options, **overrides})


def quiet(_: str) -> None:
    pass


def interrupt_after_first_epoch(line: str) -> None:
    """A training log that stops the run like Ctrl-C once the first epoch is reported."""
    if line.startswith("epoch   1/"):
        raise KeyboardInterrupt


def test_train_saves_the_best_validation_epoch_and_reports_test(tiny_data, tiny_weights, tmp_path):
    result = train(tiny_config(tiny_data, tiny_weights, tmp_path / "model"), log=quiet)
    history = result.history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    val = [r["val_top1"] for r in history]
    assert result.best_epoch == val.index(max(val)) + 1  # selected on val, first best wins
    assert result.val["top1"] == max(val)  # the saved task reproduces its val score
    assert result.test is not None and result.test["images"] == 9
    run_dir = tmp_path / "model" / "runs" / "data"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.csv",
        "results.json",
        "checkpoint.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    model = PiggybackModel.from_pretrained(tmp_path / "model", tasks=["data"])
    metadata = model.task("data").metadata
    assert metadata.preprocess["image_size"] == 32
    # the backbone's own data config: test_efficientnet's crop_pct 0.95 and bicubic resizing
    assert metadata.preprocess["resize_size"] == 33
    assert metadata.preprocess["interpolation"] == "bicubic"
    assert metadata.results["test_top1"] == result.test["top1"]
    assert model.task("data").class_names == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("options", [{}, {"method": "finetune"}, {"task_norms": True}])
def test_resume_after_interruption_matches_uninterrupted_run_bit_for_bit(
    tiny_data, tiny_weights, tmp_path, options
):
    # piggyback (Adam), finetune (SGD momentum, batch-norm buffers), task norms (own statistics)
    straight = train(tiny_config(tiny_data, tiny_weights, tmp_path / "a", **options), log=quiet)

    config = tiny_config(tiny_data, tiny_weights, tmp_path / "b", **options)
    with pytest.raises(KeyboardInterrupt):
        train(config, log=interrupt_after_first_epoch)
    assert read_checkpoint(tmp_path / "b/runs/data/checkpoint.safetensors")[0]["epoch"] == 1
    resumed = train(config, resume=True, log=quiet)

    timing = ("images_per_second", "seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in timing} for r in straight.history
    ]
    a = load_file(straight.task_file)
    b = load_file(resumed.task_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # masks and head
    state_a = read_checkpoint(straight.run_dir / "checkpoint.safetensors")[1]
    state_b = read_checkpoint(resumed.run_dir / "checkpoint.safetensors")[1]
    assert state_a.keys() == state_b.keys()
    for key in state_a:  # scores / weights / norms, head, optimizer moments, best task
        assert torch.equal(state_a[key], state_b[key]), key


def poison_loss(monkeypatch, after_calls: int) -> None:
    """Every training loss after the first `after_calls` cross-entropy calls becomes NaN."""
    real = loop_module.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, labels, **kwargs):
        calls["n"] += 1
        loss = real(logits, labels, **kwargs)
        return loss * float("nan") if calls["n"] > after_calls else loss

    monkeypatch.setattr(loop_module.F, "cross_entropy", poisoned)


def test_nan_loss_keeps_the_last_good_checkpoint_and_resuming_with_a_lower_lr_works(
    tiny_data, tiny_weights, tmp_path, monkeypatch
):
    poison_loss(monkeypatch, after_calls=4)  # epoch 1: 3 train batches + 1 val batch
    config = tiny_config(tiny_data, tiny_weights, tmp_path / "m")
    with pytest.raises(NonFiniteLossError) as stopped:
        train(config, log=quiet)
    message = str(stopped.value)
    assert re.search(r"loss is nan.*last good checkpoint \(after epoch 1\)", message)
    assert "--resume and a lower learning rate" in message and "--lr 0.001" in message
    meta, _ = read_checkpoint(tmp_path / "m/runs/data/checkpoint.safetensors")
    assert meta["epoch"] == 1

    monkeypatch.undo()  # the cause of the NaN is fixed by the lower learning rate
    lines: list[str] = []
    lower = tiny_config(tiny_data, tiny_weights, tmp_path / "m", lr=1e-3)
    resumed = train(lower, resume=True, log=lines.append)
    assert "learning rates changed on resume: scores 0.01 -> 0.001, head 0.01 -> 0.001" in lines
    first, second, third = resumed.history
    assert first["lr"] == {"scores": 1e-2, "head": 1e-2} and "lr_changed" not in first
    # the decay reached at epoch 1 (3 // 2) still applies, to the new rates
    assert second["lr"] == pytest.approx({"scores": 1e-4, "head": 1e-4})
    assert second["lr_changed"] == {"scores": [1e-2, 1e-3], "head": [1e-2, 1e-3]}
    assert "lr_changed" not in third
    logged = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").open()]
    assert logged[1]["lr_changed"] == second["lr_changed"]  # the change is in the run's metrics
    assert yaml.safe_load((resumed.run_dir / "config.yaml").read_text())["lr"] == 1e-3


def test_nan_loss_in_the_first_epoch_says_there_is_no_checkpoint_and_training_again_works(
    tiny_data, tiny_weights, tmp_path, monkeypatch
):
    poison_loss(monkeypatch, after_calls=0)
    with pytest.raises(NonFiniteLossError) as stopped:
        train(tiny_config(tiny_data, tiny_weights, tmp_path / "m"), log=quiet)
    message = str(stopped.value)
    assert "No epoch was completed, so there is no checkpoint: train again" in message
    assert "after epoch 0" not in message and "--resume" not in message
    assert not (tmp_path / "m/runs/data/checkpoint.safetensors").exists()

    monkeypatch.undo()
    again = tiny_config(tiny_data, tiny_weights, tmp_path / "m", lr=1e-3, epochs=1)
    assert train(again, log=quiet).task_file.is_file()  # as advised: no --overwrite needed


def test_recipe_defaults_are_the_papers():
    piggyback = TrainConfig(data="x").resolve()
    assert (piggyback.optimizer, piggyback.lr_scores, piggyback.lr_head) == ("adam", 1e-4, 1e-4)
    assert piggyback.lr_decay_epochs == [15] and piggyback.lr_decay_factor == 0.1
    assert (piggyback.epochs, piggyback.batch_size, piggyback.weight_decay) == (30, 32, 0.0)
    assert not piggyback.task_norms
    finetune = TrainConfig(data="x", method="finetune").resolve()
    assert (finetune.optimizer, finetune.lr, finetune.momentum) == ("sgd", 1e-3, 0.9)
    assert finetune.lr_decay_epochs == [15]
    classifier = TrainConfig(data="x", method="classifier").resolve()
    assert (classifier.optimizer, classifier.lr_head, classifier.lr_decay_epochs) == (
        "sgd",
        1e-3,
        [],
    )
    assert TrainConfig(data="x", epochs=8).resolve().lr_decay_epochs == [4]  # scaled schedule


def test_optimizer_groups_and_schedule_follow_the_recipe(tiny_data, tiny_weights, tmp_path):
    result = train(
        tiny_config(
            tiny_data, tiny_weights, tmp_path / "m", lr_scores=1e-3, lr_head=1e-2, epochs=3
        ),
        log=quiet,
    )
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == {"scores": 1e-3, "head": 1e-2}
    assert lrs[1] == pytest.approx({"scores": 1e-4, "head": 1e-3})  # x0.1 at epoch 1 (= 3 // 2)


@pytest.mark.parametrize("method", ["finetune", "classifier"])
def test_baselines_train_and_save(tiny_data, tiny_weights, tmp_path, method):
    result = train(
        tiny_config(tiny_data, tiny_weights, tmp_path / "m", method=method, epochs=2, lr=1e-2),
        log=quiet,
    )
    assert result.density is None
    model = PiggybackModel.from_pretrained(tmp_path / "m", tasks=["data"])
    assert model.task("data").method_name == method


def test_config_file_values_and_flag_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 7\nlr-head: 0.5\nmethod: finetune\n")
    (tmp_path / "run.toml").write_text("epochs = 9\nbatch_size = 4\n")
    config = merge_options(read_config_file(tmp_path / "run.yaml"), {"epochs": 3, "data": "d"})
    assert (config.epochs, config.lr_head, config.method) == (3, 0.5, "finetune")
    assert read_config_file(tmp_path / "run.toml") == {"epochs": 9, "batch_size": 4}
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown training options \['epoch'\]"):
        merge_options(read_config_file(tmp_path / "bad.yaml"), {})


def test_resolved_config_is_saved_with_the_run(tiny_data, tiny_weights, tmp_path):
    train(tiny_config(tiny_data, tiny_weights, tmp_path / "m", epochs=1), log=quiet)
    saved = yaml.safe_load((tmp_path / "m/runs/data/config.yaml").read_text())
    assert saved["optimizer"] == "adam" and saved["lr_decay_epochs"] == [1]
    assert saved["lr_scores"] == 1e-2 and saved["task"] == "data"


def test_model_directory_collects_tasks_and_refuses_mistakes(tiny_data, tiny_weights, tmp_path):
    output = tmp_path / "m"
    train(tiny_config(tiny_data, tiny_weights, output, epochs=1, task="first"), log=quiet)
    train(tiny_config(tiny_data, tiny_weights, output, epochs=1, task="second"), log=quiet)
    index = json.loads((output / "piggyback_config.json").read_text())["tasks"]
    assert set(index) == {"first", "second"}
    with pytest.raises(RunError, match="already exists"):
        train(tiny_config(tiny_data, tiny_weights, output, epochs=1, task="first"), log=quiet)
    with pytest.raises(RunError, match="other mask settings"):
        config = tiny_config(
            tiny_data, tiny_weights, output, epochs=1, task="t3", mask_kind="ternary"
        )
        train(config, log=quiet)
    with pytest.raises(RunError, match="nothing to resume"):
        train(tiny_config(tiny_data, tiny_weights, output, task="new"), resume=True, log=quiet)
    old_events = output / "runs" / "first" / "tensorboard" / "events.old"
    old_events.parent.mkdir()
    old_events.write_text("the first run's TensorBoard events")
    again = tiny_config(tiny_data, tiny_weights, output, epochs=2, task="first", lr=1e-3)
    result = train(again, overwrite=True, log=quiet)
    assert not old_events.exists()  # nothing of the old run mixes into the new one's logs
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    index = json.loads((output / "piggyback_config.json").read_text())["tasks"]
    assert set(index) == {"first", "second"}


def test_resume_after_an_interrupted_overwrite_continues_the_new_run(
    tiny_data, tiny_weights, tmp_path
):
    output = tmp_path / "m"
    train(tiny_config(tiny_data, tiny_weights, output, epochs=3), log=quiet)  # finished, old
    new = tiny_config(tiny_data, tiny_weights, output, epochs=3, lr=1e-3)

    with pytest.raises(KeyboardInterrupt):
        train(new, overwrite=True, log=interrupt_after_first_epoch)
    meta, _ = read_checkpoint(output / "runs/data/checkpoint.safetensors")
    assert meta["epoch"] == 1 and meta["config"]["lr"] == 1e-3  # the old run's state is gone
    resumed = train(new, resume=True, log=quiet)
    assert [r["lr"]["scores"] for r in resumed.history] == pytest.approx([1e-3, 1e-4, 1e-4])


def test_resume_refuses_other_backbone_weights(tiny_data, tiny_weights, tmp_path):
    import shutil

    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny_weights, weights)

    config = tiny_config(tiny_data, weights, tmp_path / "m")
    with pytest.raises(KeyboardInterrupt):
        train(config, log=interrupt_after_first_epoch)
    torch.manual_seed(99)  # the same file name, other weights
    other = timm.create_model("test_efficientnet").state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(weights))
    with pytest.raises(FingerprintMismatchError, match="was made for backbone weights"):
        train(config, resume=True, log=quiet)


def test_resume_refuses_changed_settings(tiny_data, tiny_weights, tmp_path):
    config = tiny_config(tiny_data, tiny_weights, tmp_path / "m")
    with pytest.raises(KeyboardInterrupt):
        train(config, log=interrupt_after_first_epoch)
    changed = tiny_config(tiny_data, tiny_weights, tmp_path / "m", seed=1)
    with pytest.raises(RunError, match=r"other settings than the interrupted run.*'seed'"):
        train(changed, resume=True, log=quiet)


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_mixed_precision_runs(tiny_data, tiny_weights, tmp_path, precision):
    config = tiny_config(tiny_data, tiny_weights, tmp_path / "m", epochs=1, precision=precision)
    result = train(config, log=quiet)
    assert result.history[0]["train_loss"] > 0 and result.test["images"] == 9


def test_tensorboard_and_worker_processes(tiny_data, tiny_weights, tmp_path):
    config = tiny_config(tiny_data, tiny_weights, tmp_path / "m", epochs=1, tensorboard=True)
    result = train(config, log=quiet)
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    with_workers = [
        train(
            tiny_config(tiny_data, tiny_weights, tmp_path / f"w{i}", epochs=1, workers=2), log=quiet
        )
        for i in range(2)
    ]
    a, b = (load_file(r.task_file) for r in with_workers)
    assert all(torch.equal(a[k], b[k]) for k in a)  # worker processes keep runs reproducible
