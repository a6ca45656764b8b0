"""A task's lifecycle: trainable when added, frozen when packed or loaded, unfrozen explicitly."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN, randomize_norms
from test_model import add_trained_task, train_steps

from piggyback import PiggybackConfig, PiggybackModel
from piggyback.tasks import TaskPhase, TaskStateError


def fresh_model(config: PiggybackConfig | None = None) -> PiggybackModel:
    torch.manual_seed(0)
    return PiggybackModel(randomize_norms(TinyCNN()).eval(), config)


def outputs(model: PiggybackModel, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.fixture
def loaded(tmp_path, images) -> PiggybackModel:
    add_trained_task(fresh_model(), images).save_pretrained(tmp_path / "m")
    model = PiggybackModel.from_pretrained(tmp_path / "m", fresh_model().unload())
    model.set_task("t")
    return model


def test_a_new_task_is_trainable_and_a_loaded_one_frozen(loaded):
    assert fresh_model().add_task("x", 3).phase is TaskPhase.TRAINABLE
    assert loaded.task("t").phase is TaskPhase.FROZEN
    assert not any(p.requires_grad for p in loaded.task("t").parameters())


def test_training_a_loaded_task_is_refused_with_what_to_do(loaded, images):
    with pytest.raises(TaskStateError, match=r"frozen.*unfreeze_task\('t'\)"):
        loaded.trainable_parameters("t")
    loaded.train()
    with pytest.raises(TaskStateError, match="unfreeze_task"):
        loaded(images)  # a training forward pass would silently train nothing but the head
    loaded.eval()
    with torch.no_grad():
        loaded(images)  # inference is what a frozen task is for


def test_unfreezing_rebuilds_scores_that_reproduce_the_saved_task_exactly(loaded, images):
    before = outputs(loaded, images)
    masks = [m.clone() for m in loaded.task("t").masks(loaded.targets, loaded.config)]
    loaded.unfreeze_task("t")
    state = loaded.task("t")
    assert state.phase is TaskPhase.TRAINABLE and not state.is_packed
    with torch.no_grad():
        rebuilt = state.masks(loaded.targets, loaded.config)
    assert all(torch.equal(a, b) for a, b in zip(masks, rebuilt, strict=True))
    assert torch.equal(outputs(loaded, images), before)
    groups = {g["name"] for g in loaded.trainable_parameters("t")}
    assert groups == {"scores", "head"}  # the mask trains again, not only the head
    scores = {n: s.detach().clone() for n, s in state.scores.items()}
    train_steps(loaded, images)
    assert any(not torch.equal(s, scores[n]) for n, s in state.scores.items())


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_freezing_packs_the_masks_and_keeps_the_outputs(images, kind):
    model = add_trained_task(fresh_model(PiggybackConfig(mask_kind=kind)), images)
    expected = outputs(model, images)
    model.freeze_task("t")
    state = model.task("t")
    assert state.is_packed and len(state.scores) == 0
    assert torch.equal(outputs(model, images), expected)


def test_invalid_transitions_raise(images):
    model = add_trained_task(fresh_model(), images)
    model.freeze_task("t")
    with pytest.raises(TaskStateError, match="already frozen"):
        model.freeze_task("t")
    model.unfreeze_task("t")
    with pytest.raises(TaskStateError, match="already trainable"):
        model.unfreeze_task("t")


def test_class_count_has_one_definition_the_head():
    model = fresh_model()
    state = model.add_task("x", 4, class_names=["a", "b", "c", "d"])
    assert state.num_classes == 4 == state.head.out_features
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        state.class_names = ["a", "b", "c"]
