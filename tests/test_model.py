"""PiggybackModel on tiny models: exactness, isolation of tasks, caching, norms, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyCNN, TinyConvNd, TinyTransformer, randomize_norms
from torch import nn

from piggyback import PiggybackConfig, PiggybackModel, TaskError, UnsupportedModelError
from piggyback.heads import TaskHeads


def train_steps(model: PiggybackModel, images: torch.Tensor, steps: int = 3, lr: float = 1e-2):
    """A few Adam steps on a fixed batch (large lr so that masks really change)."""
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    targets = torch.arange(images.shape[0]) % 2
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def add_trained_task(
    model: PiggybackModel, images: torch.Tensor, name: str = "t", seed: int = 0, **task_kwargs
) -> PiggybackModel:
    """Add a 3-class task `name`, set it and train it a few steps; returns the model."""
    model.add_task(name, 3, seed=seed, **task_kwargs)
    model.set_task(name)
    train_steps(model, images)
    return model


def backbone_state(model: PiggybackModel) -> dict[str, torch.Tensor]:
    """Every original backbone tensor (head wrapper excluded), cloned."""
    return {
        n: t.detach().clone()
        for n, t in model.backbone.state_dict().items()
        if not n.startswith(model.head_name + ".")
    }


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("factory", [TinyCNN, TinyTransformer])
def test_all_ones_masks_with_backbone_head_are_exact(factory, kind, images):
    torch.manual_seed(0)
    original = randomize_norms(factory()).eval()
    reference = copy.deepcopy(original)
    model = PiggybackModel(original, PiggybackConfig(mask_kind=kind))
    model.add_task("same")  # no num_classes: a copy of the backbone's own head
    model.set_task("same")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    model.train()  # frozen norms stay in eval mode, so training-mode outputs are exact too
    assert torch.equal(model(images), reference(images).detach())


def test_conv1d_conv3d_are_masked_and_exact():
    torch.manual_seed(0)
    original = TinyConvNd().eval()
    reference = copy.deepcopy(original)
    model = PiggybackModel(original)
    assert {t.name for t in model.targets} == {"conv1d.weight", "conv3d.weight"}
    model.add_task("t")
    model.set_task("t")
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(model(x), reference(x))


def test_training_b_leaves_task_a_and_backbone_bit_identical(tiny_cnn, images):
    model = add_trained_task(PiggybackModel(tiny_cnn), images, "a", seed=1)
    with torch.no_grad():
        before_a = model(images)
    backbone_before = backbone_state(model)
    a_state_before = {k: v.clone() for k, v in model.task("a").state_dict().items()}

    model.add_task("b", 7, seed=2)
    model.set_task("b")
    train_steps(model, images)
    assert model.overall_density("b") < 1.0  # b really learned a mask

    model.set_task("a")
    with torch.no_grad():
        assert torch.equal(model(images), before_a)
    for name, tensor in backbone_state(model).items():
        assert torch.equal(tensor, backbone_before[name]), name
    for key, value in model.task("a").state_dict().items():
        assert torch.equal(value, a_state_before[key]), key


def test_order_of_adding_tasks_does_not_matter(images):
    outputs = {}
    for order in (("a", "b"), ("b", "a")):
        torch.manual_seed(123)  # same backbone for both orders
        model = PiggybackModel(randomize_norms(TinyCNN()).eval())
        for name in order:
            model.add_task(name, 3 if name == "a" else 4, seed=ord(name))
            model.set_task(name)
            torch.manual_seed(ord(name))
            train_steps(model, images)
        with torch.no_grad():
            for name in ("a", "b"):
                model.set_task(name)
                outputs[(order, name)] = model(images)
    for name in ("a", "b"):
        assert torch.equal(outputs[(("a", "b"), name)], outputs[(("b", "a"), name)])


def test_every_backbone_tensor_is_frozen(tiny_transformer):
    model = PiggybackModel(tiny_transformer)
    heads = model.heads
    for name, param in model.backbone.named_parameters():
        if not name.startswith(model.head_name + "."):
            assert not param.requires_grad, name
    assert not any(p.requires_grad for p in heads.original.parameters())


def test_trainable_parameters_are_exactly_the_active_tasks(tiny_cnn):
    model = PiggybackModel(tiny_cnn)
    model.add_task("a", 3)
    model.add_task("b", 3, task_norms=True)
    model.set_task("b")
    groups = {g["name"]: g["params"] for g in model.trainable_parameters()}
    assert set(groups) == {"scores", "head", "norms"}
    assert len(groups["scores"]) == len(model.targets)
    assert [tuple(p.shape) for p in groups["scores"]] == [t.shape for t in model.targets]
    assert {id(p) for p in groups["head"]} == {id(p) for p in model.task("b").head.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g}  # nothing of task a trains
    optimizer = torch.optim.Adam(model.trainable_parameters("b"), lr=1e-4)
    assert [g["name"] for g in optimizer.param_groups] == ["scores", "head", "norms"]


def test_clear_errors_without_a_task_or_with_unknown_names(tiny_cnn, images):
    model = PiggybackModel(tiny_cnn)
    with pytest.raises(TaskError, match="no task is set"):
        model(images)
    model.add_task("a", 3)
    with pytest.raises(TaskError, match=r"unknown task 'nope'; this model has tasks \['a'\]"):
        model.set_task("nope")
    with pytest.raises(TaskError, match="already exists"):
        model.add_task("a", 3)
    for bad in ("bad.name", "trailing\n", "", "-dash", "x" * 65):
        with pytest.raises(TaskError, match="invalid task name"):
            model.add_task(bad, 3)
    with pytest.raises(TaskError, match=r"'auto'.* reserved for task routing"):
        model.add_task("auto", 3)
    model.set_task("a")
    model.delete_task("a")
    assert model.tasks == [] and model.active_task is None
    with pytest.raises(TaskError, match="no task is set"):
        model(images)


def test_eval_forward_reuses_cached_masked_weights(tiny_cnn, images, monkeypatch):
    model = PiggybackModel(tiny_cnn)
    model.add_task("a", 3)
    model.add_task("b", 3)
    model.set_task("a")
    model.eval()
    calls = []
    compute = model._compute_tensors
    monkeypatch.setattr(model, "_compute_tensors", lambda s: calls.append(s) or compute(s))
    with torch.no_grad():
        first = model(images)
        for _ in range(3):
            assert torch.equal(model(images), first)
    assert len(calls) == 1  # computed once for this task
    model.set_task("b")
    with torch.no_grad():
        model(images)
        model(images)
    assert len(calls) == 2  # once more per task switch
    with torch.no_grad():  # an in-place change of the scores is noticed
        model.task("b").scores["stem.weight"].fill_(-1.0)
        changed = model(images)
    assert len(calls) == 3 and not torch.equal(changed, first)


def test_eval_with_gradients_still_reaches_the_scores(tiny_cnn, images):
    model = PiggybackModel(tiny_cnn)
    model.add_task("a", 3)
    model.set_task("a")
    model.eval()
    model(images).sum().backward()
    assert model.task("a").scores["stem.weight"].grad is not None


def test_shared_norms_frozen_in_train_mode_task_norms_learn(tiny_cnn, images):
    model = PiggybackModel(tiny_cnn)
    model.add_task("frozen", 3)
    model.add_task("own", 3, task_norms=True)
    shared_mean = tiny_cnn.bn1.running_mean.clone()
    model.set_task("frozen")
    model.train()
    assert not tiny_cnn.bn1.training
    model(images)
    assert torch.equal(tiny_cnn.bn1.running_mean, shared_mean)
    model.set_task("own")
    assert tiny_cnn.bn1.training  # the task's own statistics are updated in training
    model(images)
    own_mean = model.task("own").norms["bn1.running_mean"]
    assert not torch.equal(own_mean, shared_mean)
    assert torch.equal(tiny_cnn.bn1.running_mean, shared_mean)  # backbone untouched
    model.eval()
    assert not tiny_cnn.bn1.training


def test_classifier_and_finetune_baselines(tiny_cnn, images):
    reference = copy.deepcopy(tiny_cnn)
    model = PiggybackModel(tiny_cnn)
    model.add_task("clf", 3, method="classifier")
    model.add_task("ft", 3, method="finetune")
    model.set_task("clf")
    assert [g["name"] for g in model.trainable_parameters()] == ["head"]
    model.set_task("ft")
    assert [g["name"] for g in model.trainable_parameters()] == ["backbone", "head"]
    before = backbone_state(model)
    train_steps(model, images, lr=1e-2)
    ft_stem = model.task("ft").weights["stem.weight"]
    assert not torch.equal(ft_stem, reference.stem.weight)  # fine-tuning changed its copy
    for name, tensor in backbone_state(model).items():
        assert torch.equal(tensor, before[name]), name  # ...and nothing of the backbone


@pytest.mark.parametrize("method", ["piggyback", "finetune", "classifier"])
def test_merge_matches_and_holds_no_piggyback_class(tiny_transformer, images, method):
    model = PiggybackModel(tiny_transformer)
    model.add_task("t", 6, method=method, task_norms=True, seed=0)
    model.set_task("t")
    train_steps(model, images)
    merged = model.merge("t")
    with torch.no_grad():
        torch.testing.assert_close(merged(images), model(images), rtol=1e-5, atol=1e-6)
    assert not [m for m in merged.modules() if type(m).__module__.startswith("piggyback")]
    assert not any(isinstance(m, TaskHeads) for m in merged.modules())
    assert model.task("t") is not None and isinstance(model.heads, TaskHeads)  # model unchanged


def test_merged_model_exports_with_torch_export(tiny_cnn, images):
    model = add_trained_task(PiggybackModel(tiny_cnn), images)
    merged = model.merge()
    exported = torch.export.export(merged, (images,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(images), model(images))


def test_mha_input_projection_is_masked(tiny_transformer, images):
    model = PiggybackModel(tiny_transformer)
    names = {t.name for t in model.targets}
    assert "encoder.self_attn.in_proj_weight" in names
    assert "encoder.self_attn.out_proj.weight" in names
    model.add_task("t")
    model.set_task("t")
    model.eval()
    with torch.no_grad():
        before = model(images)
        model.task().scores["encoder.self_attn.in_proj_weight"][:8].fill_(-1.0)
        assert not torch.equal(model(images), before)  # the fast path saw the mask too


def test_unmasked_attention_weights_are_refused_by_name(tiny_transformer):
    config = PiggybackConfig(layer_types=("linear", "conv"))
    with pytest.raises(UnsupportedModelError, match=r"encoder\.self_attn\.in_proj_weight"):
        PiggybackModel(tiny_transformer, config)
    PiggybackModel(copy.deepcopy(tiny_transformer), PiggybackConfig(exclude=("encoder.self_attn",)))


def test_other_unmasked_weights_are_reported_not_silently_skipped():
    class WithToken(TinyCNN):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 16, 2))

    with pytest.warns(UserWarning, match="pos_embed"):
        model = PiggybackModel(WithToken())
    assert model.unmasked == ["pos_embed"]


def test_include_exclude_patterns_and_bias_option(tiny_cnn):
    model = PiggybackModel(copy.deepcopy(tiny_cnn), PiggybackConfig(exclude=("stem",)))
    assert "stem.weight" not in {t.name for t in model.targets}
    model = PiggybackModel(copy.deepcopy(tiny_cnn), PiggybackConfig(include=("depth*",)))
    assert [t.name for t in model.targets] == ["depthwise.weight"]
    model = PiggybackModel(copy.deepcopy(tiny_cnn), PiggybackConfig(mask_bias=True))
    assert "depthwise.bias" in {t.name for t in model.targets}
    assert {t.name for t in PiggybackModel(tiny_cnn).targets} == {
        "stem.weight",
        "depthwise.weight",
        "grouped.weight",
    }  # the head is per task, never masked; biases are not masked by default
    with pytest.raises(UnsupportedModelError, match="no layer to mask"):
        PiggybackModel(TinyCNN(), PiggybackConfig(include=("nothing*",)))


def test_head_found_or_named(tiny_cnn):
    assert PiggybackModel(copy.deepcopy(tiny_cnn)).head_name == "fc"
    with pytest.raises(UnsupportedModelError, match="not a module"):
        PiggybackModel(tiny_cnn, PiggybackConfig(head="classifier"))
    with pytest.raises(UnsupportedModelError, match="already wrapped"):
        model = PiggybackModel(TinyCNN())
        PiggybackModel(model.backbone)


def test_uniform_init_is_seeded_per_task(tiny_cnn):
    model = PiggybackModel(tiny_cnn, PiggybackConfig(init="uniform"))
    model.add_task("a", 3, seed=5)
    model.add_task("b", 3, seed=5)
    for name, scores in model.task("a").scores.items():
        assert torch.equal(scores, model.task("b").scores[name])
    assert 0.1 < model.overall_density("a") < 0.4  # U(-1e-2, 1e-2) above 5e-3: about 25% on


def test_unload_gives_back_the_original_model(tiny_cnn, images):
    reference = copy.deepcopy(tiny_cnn)
    tiny_cnn.train()
    model = PiggybackModel(tiny_cnn)
    model.add_task("a", 3)
    model.set_task("a")
    model.train()
    assert not tiny_cnn.bn1.training  # frozen while wrapped
    backbone = model.unload()
    assert isinstance(backbone.fc, nn.Linear)
    assert all(p.requires_grad for p in backbone.parameters())  # as before wrapping
    assert backbone.bn1.training
    backbone.eval()
    assert torch.equal(backbone(images), reference(images))


def test_cache_follows_layout_and_dtype_changes_and_packed_tasks(tiny_cnn, images, tmp_path):
    model = add_trained_task(PiggybackModel(tiny_cnn), images, "a")
    with torch.no_grad():
        expected = model(images)
        model.to(memory_format=torch.channels_last)
        assert model._cache.info().tasks == []  # new tensors: the cache was dropped
        torch.testing.assert_close(model(images), expected)
        model.double()
        assert model(images.double()).dtype == torch.float64
        model.float()
    path = model.save_task(tmp_path / "a.safetensors")
    model.load_task(path, name="b")
    model.set_task("b")
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected)  # packed bits: the same weights
        torch.testing.assert_close(model(images), expected)  # and from the cache


def test_concurrent_forward_passes_do_not_mix_weights(tiny_cnn, images):
    import threading

    model = add_trained_task(PiggybackModel(tiny_cnn), images, "a")
    original = {n: t.clone() for n, t in model.backbone_tensors().items()}
    with torch.no_grad():
        expected = model(images)
    failures = []

    def work():
        for _ in range(30):
            with torch.no_grad():
                if not torch.equal(model(images), expected):
                    failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    for name, tensor in model.backbone_tensors().items():
        assert torch.equal(tensor, original[name]), name  # the frozen originals are back
