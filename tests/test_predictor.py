"""Predictor: many tasks from one backbone, mixed-task batches, LRU cache, routing, threads."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, randomize_norms
from PIL import Image
from safetensors.torch import save_file
from test_export import CLASSES, PREPROCESS
from test_model import train_steps

from piggyback import PiggybackModel, Predictor, TaskError
from piggyback.errors import DataError, TaskFileError
from piggyback.fileio import content_checksum
from piggyback.inputs import preprocess_key
from piggyback.packing import packed_size
from piggyback.predictor import TaskPrediction
from piggyback.preprocess import Preprocess
from piggyback.route_fit import fit_routing_profile, spherical_kmeans, stratified_subset
from piggyback.routing import NoRoutingProfileWarning, RoutingProfile
from piggyback.taskfile import read_task_file

TASKS = ("a", "b", "c")


def batch(seed: int, count: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def backbone() -> TinyCNN:
    torch.manual_seed(0)
    return randomize_norms(TinyCNN()).eval()


def load(directory: Path, **options) -> Predictor:
    return Predictor.from_pretrained(directory, backbone=backbone(), device="cpu", **options)


def tasks_model(names=TASKS) -> PiggybackModel:
    """TinyCNN with 3-class tasks trained (differently) a few steps each, as training records."""
    model = PiggybackModel(backbone())
    for seed, name in enumerate(names):
        model.add_task(name, 3, class_names=CLASSES, seed=seed)
        model.set_task(name)
        train_steps(model, batch(seed))
        model.task(name).metadata.preprocess = dict(PREPROCESS)
    return model


def saved_tasks(tmp_path: Path, names=TASKS) -> Path:
    """A model directory of packed tasks, as `piggyback train` leaves it."""
    return tasks_model(names).save_pretrained(tmp_path / "model")


def probabilities(answer: TaskPrediction) -> list[float]:
    """All class probabilities in class order (predict with top_k >= the class count)."""
    return [dict(answer.top)[name] for name in CLASSES]


def reference(model: PiggybackModel, task: str, images: torch.Tensor) -> torch.Tensor:
    model.set_task(task)
    with torch.no_grad():
        return model(images).softmax(1)


# -- mixed-task batches -------------------------------------------------------------------------


def test_mixed_task_batch_equals_each_tasks_own_batch_exactly(tmp_path):
    """Each sample's answer in a mixed batch is bit-for-bit (float32) the answer of its task's
    single-task batch of the same samples: grouping by task adds nothing."""
    predictor = load(saved_tasks(tmp_path))
    images = batch(7, count=7)
    order = ["a", "b", "a", "c", "b", "a", "c"]
    mixed = predictor.predict(images, order, top_k=3)
    assert [answer.task for answer in mixed] == order
    for task in TASKS:
        rows = [i for i, name in enumerate(order) if name == task]
        group = reference(predictor.model, task, images[rows])
        for row, index in zip(group, rows, strict=True):
            assert torch.equal(torch.tensor(probabilities(mixed[index])), row)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_invariant_mixed_batch_equals_each_sample_run_alone_exactly(tmp_path, threads):
    """With batch_invariant=True, each sample's answer in a mixed batch (tasks by name and
    routed) is bit-for-bit its answer run alone, with one or several torch threads."""
    predictor = Predictor(routed_model(), batch_invariant=True)
    images = torch.cat([coloured(1, 0, 4), coloured(2, 2, 3)])[torch.tensor([0, 4, 1, 5, 2, 6, 3])]
    order = ["red", "red", "auto", "blue", "auto", "auto", "blue"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mixed = predictor.predict(images, order, top_k=3)
        alone = [predictor.predict(images[i : i + 1], t, top_k=3)[0] for i, t in enumerate(order)]
    finally:
        torch.set_num_threads(previous)
    assert [answer.to_dict() for answer in mixed] == [answer.to_dict() for answer in alone]


class WideCNN(torch.nn.Module):
    """1024 pooled features: wide enough that a batched matrix product rounds otherwise than a
    one-row product (16 features, as TinyCNN has, agree by chance)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1024, 4, stride=4)
        self.fc = torch.nn.Linear(1024, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_batch_invariant_routing_by_wide_prototypes_equals_each_image_alone():
    torch.manual_seed(0)
    model = PiggybackModel(WideCNN().eval())
    for seed, task in enumerate(("x", "y")):
        model.add_task(task, 3, class_names=CLASSES, seed=seed)
        model.task(task).metadata.preprocess = dict(PREPROCESS)
        prototypes = torch.randn(32, 1024, generator=torch.Generator().manual_seed(seed))
        model.task(task).routing = RoutingProfile(prototypes, dict(PREPROCESS), 32)
    predictor = Predictor(model, batch_invariant=True)
    images = batch(3, count=8)
    routed = predictor.predict(images, "auto", top_k=3)
    alone = [predictor.predict(images[i : i + 1], "auto", top_k=3)[0] for i in range(8)]
    assert [a.to_dict() for a in routed] == [a.to_dict() for a in alone]


def test_each_task_of_a_mixed_batch_runs_once(tmp_path):
    predictor = load(saved_tasks(tmp_path))
    calls = []
    applied = predictor.model.tensors_applied

    def counting(task, tensors):
        calls.append(task)
        return applied(task, tensors)

    predictor.model.tensors_applied = counting
    predictor.predict(batch(1, count=6), ["a", "b", "a", "b", "c", "a"])
    assert calls == ["a", "b", "c"]


def test_predict_each_gives_every_tasks_answer_per_image(tmp_path):
    predictor = load(saved_tasks(tmp_path))
    images = batch(2, count=3)
    each = predictor.predict_each(images, ["c", "a"], top_k=3)
    assert [[answer.task for answer in row] for row in each] == [["c", "a"]] * 3
    for task, column in (("c", 0), ("a", 1)):
        single = predictor.predict(images, task, top_k=3)
        assert [row[column] for row in each] == single


# -- cache --------------------------------------------------------------------------------------


def test_alternating_between_cached_tasks_recomputes_nothing(tmp_path):
    predictor = load(saved_tasks(tmp_path), max_cached_tasks=2)
    images = batch(3)
    first = {task: predictor.predict(images, task) for task in ("a", "b")}
    assert predictor.cache_info().misses == 2
    for _ in range(3):
        for task in ("a", "b"):
            assert predictor.predict(images, task) == first[task]
    info = predictor.cache_info()
    assert (info.hits, info.misses, info.evictions) == (6, 2, 0)
    assert info.tasks == ["a", "b"]


def test_cache_evicts_the_least_recently_used_task_beyond_its_budget(tmp_path):
    predictor = load(saved_tasks(tmp_path), max_cached_tasks=2)
    images = batch(3)
    for task in ("a", "b", "a", "c"):
        predictor.predict(images, task)
    info = predictor.cache_info()
    assert info.tasks == ["a", "c"] and info.evictions == 1  # b was least recently used
    one_task = info.bytes // 2
    predictor.task_cache.configure(max_tasks=None, max_bytes=one_task)
    assert predictor.cache_info().tasks == ["c"]
    predictor.task_cache.configure(max_tasks=None, max_bytes=one_task - 1)
    assert predictor.cache_info().tasks == []  # an entry over the budget is not kept
    with pytest.raises(ValueError, match="max_tasks"):
        Predictor(predictor.model, max_cached_tasks=-1)


def test_a_replaced_or_deleted_task_is_never_served_stale(tmp_path):
    directory = saved_tasks(tmp_path)
    predictor = load(directory, max_cached_tasks=4)
    images = batch(4)
    answers = {task: predictor.predict(images, task, top_k=3) for task in TASKS}
    assert answers["a"] != answers["b"]
    predictor.load_task(directory / "tasks" / "b.safetensors", "a", replace=True)
    assert predictor.predict(images, "a", top_k=3) == [
        TaskPrediction("a", answer.top) for answer in answers["b"]
    ]
    predictor.delete_task("a")
    assert "a" not in predictor.cache_info().tasks
    with pytest.raises(TaskError, match="unknown task"):
        predictor.predict(images, "a")
    # Deleted, then a new task under the old name: new objects may reuse the old ids.
    predictor.load_task(directory / "tasks" / "c.safetensors", "a")
    assert [x.top for x in predictor.predict(images, "a", top_k=3)] == [x.top for x in answers["c"]]
    # Also through the model itself, and without a replace in one step.
    predictor.model.delete_task("b")
    predictor.model.load_task(directory / "tasks" / "a.safetensors", "b")
    assert [x.top for x in predictor.predict(images, "b", top_k=3)] == [x.top for x in answers["a"]]
    with pytest.raises(TaskError, match="already exists"):
        predictor.load_task(directory / "tasks" / "c.safetensors", "b")


def test_trainable_tasks_are_frozen_and_in_place_changes_of_their_masks_noticed():
    model = tasks_model(("a",))
    predictor = Predictor(model)
    state = model.task("a")
    assert state.is_frozen and state.is_packed and len(state.scores) == 0  # 1 bit per weight
    images = batch(5)
    before = predictor.predict(images, "a", top_k=3)
    with torch.no_grad():
        state.packed_masks.zero_()  # every mask off
    assert predictor.predict(images, "a", top_k=3) != before
    assert predictor.cache_info().misses == 2


# -- memory -------------------------------------------------------------------------------------


def test_loaded_tasks_cost_their_packed_bits_head_and_prototypes(tmp_path):
    predictor = load(saved_tasks(tmp_path), max_cached_tasks=2)
    model = predictor.model
    head = sum(t.numel() * t.element_size() for t in model.task("a").head.state_dict().values())
    masked_float_bytes = sum(t.numel for t in model.targets) * 4
    memory = predictor.memory()
    for task in TASKS:  # 1 bit per masked weight, the head; no float copy of any weight
        assert memory["tasks"][task] == packed_size(model.num_masked, 1) + head
    assert memory["cache_bytes"] == 0
    backbone = sum(
        t.numel() * t.element_size() for t in model.backbone_tensors(exclude_head=True).values()
    )
    assert memory["backbone_bytes"] == backbone
    for task in TASKS:
        predictor.predict(batch(1), task)
    memory = predictor.memory()
    assert memory["cache_bytes"] == 2 * masked_float_bytes  # two tasks' W * mask, as budgeted
    assert memory["total_bytes"] == backbone + memory["tasks_bytes"] + memory["cache_bytes"]
    model.task("a").routing = RoutingProfile(torch.ones(3, 16), dict(PREPROCESS), 12)
    assert predictor.memory()["tasks"]["a"] == memory["tasks"]["a"] + 3 * 16 * 2  # float16


# -- inputs -------------------------------------------------------------------------------------


def test_images_as_pil_paths_bytes_or_tensors_use_each_tasks_preprocessing(tmp_path):
    model = tasks_model(("a", "b"))
    model.task("b").metadata.preprocess = PREPROCESS | {"image_size": 20, "resize_size": 24}
    predictor = Predictor(model)
    picture = Image.fromarray(
        torch.randint(0, 256, (30, 40, 3), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
    )
    path = tmp_path / "picture.png"
    picture.save(path)
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    for task, size in (("a", 16), ("b", 20)):
        prep = predictor.preprocess(task)
        assert prep["image_size"] == size
        tensor = Preprocess.from_dict(prep).transform()(picture)
        sources = [picture, path, str(path), encoded.getvalue(), tensor]
        expected = reference(model, task, torch.stack([tensor] * len(sources)))
        for answer, row in zip(predictor.predict(sources, task, top_k=3), expected, strict=True):
            assert torch.equal(torch.tensor(probabilities(answer)), row)
    answers = predictor.predict(torch.stack([tensor, tensor]), "b")  # NCHW: two images
    assert len(answers) == 2 and answers[0] == answers[1]


def picture_of(seed: int, size=(30, 40)) -> Image.Image:
    pixels = torch.randint(0, 256, (*size, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def test_prepared_images_are_answered_exactly_as_the_pictures_they_came_from():
    model = tasks_model(("a", "b", "c"))
    model.task("b").metadata.preprocess = PREPROCESS | {"image_size": 20, "resize_size": 24}
    predictor = Predictor(model)
    pictures = [picture_of(seed) for seed in range(4)]
    tasks = ["a", "b", "c", "b"]
    both = predictor.prepare(pictures[0], ["a", "b", "c"])
    assert len(both.inputs) == 2  # a and c share one preprocessing: made once
    prepared = [predictor.prepare(p, t) for p, t in zip(pictures, tasks, strict=True)]
    expected = predictor.predict(pictures, tasks, top_k=3)
    assert predictor.predict(prepared, tasks, top_k=3) == expected
    # Prepared for another task than the one asked: the missing input is made from the picture.
    alone = predictor.predict(pictures[0], "b", top_k=3)
    assert predictor.predict(prepared[0], "b", top_k=3) == alone
    tensor = Preprocess.from_dict(predictor.preprocess("a")).transform()(pictures[0])
    as_given = predictor.prepare(tensor, "b")  # a preprocessed tensor is used as given
    assert as_given.inputs == {} and as_given.picture is tensor
    with pytest.raises(TaskError, match=r"unknown task\(s\) \['z'\]"):
        predictor.prepare(pictures[0], ["a", "z"])


def test_an_image_prepared_without_its_picture_answers_the_tasks_it_was_prepared_for():
    model = tasks_model(("a", "b"))
    model.task("b").metadata.preprocess = PREPROCESS | {"image_size": 20, "resize_size": 24}
    predictor = Predictor(model)
    picture = picture_of(7)
    light = predictor.prepare(picture, "a", keep_picture=False)
    assert light.picture is None and light != predictor.prepare(picture, "a", keep_picture=False)
    assert predictor.predict(light, "a", top_k=3) == predictor.predict(picture, "a", top_k=3)
    with pytest.raises(DataError, match="without keeping its picture: prepare it for the task"):
        predictor.predict(light, "b")


def test_images_prepared_for_auto_carry_every_input_routing_may_need():
    model = tasks_model(("a", "b"))
    model.task("b").metadata.preprocess = PREPROCESS | {"image_size": 20, "resize_size": 24}
    predictor = Predictor(model)
    pictures = [picture_of(seed) for seed in range(3)]
    prepared = [predictor.prepare(p, "auto") for p in pictures]
    assert all(len(p.inputs) == 2 for p in prepared)
    with pytest.warns(NoRoutingProfileWarning):
        expected = predictor.predict(pictures, "auto", top_k=3)
    assert predictor.predict(prepared, "auto", top_k=3) == expected


def test_bad_inputs_and_task_lists_are_refused_with_a_clear_error(tmp_path):
    predictor = Predictor(tasks_model(("a",)))
    with pytest.raises(DataError, match=r"missing\.png"):
        predictor.predict(tmp_path / "missing.png", "a")
    with pytest.raises(DataError, match=r"22 bytes.*not an image file"):
        predictor.predict(b"<html>not found</html>", "a")
    with pytest.raises(DataError, match="CHW or NCHW"):
        predictor.predict(torch.zeros(16, 16), "a")
    with pytest.raises(TaskError, match="2 task names for 1 images"):
        predictor.predict(batch(0, count=1), ["a", "a"])
    with pytest.raises(TaskError, match=r"unknown task\(s\) \['z'\]"):
        predictor.predict(batch(0, count=1), "z")
    with pytest.raises(ValueError, match="top_k"):
        predictor.predict(batch(0, count=1), "a", top_k=0)


def test_task_description_says_what_a_client_needs(tmp_path):
    predictor = load(saved_tasks(tmp_path))
    description = predictor.task_description("a")
    assert description["classes"] == CLASSES and description["num_classes"] == 3
    assert description["preprocess"]["image_size"] == 16
    assert description["routing"] is None  # made without training images
    assert description["bytes"] == predictor.memory()["tasks"]["a"]


def test_prediction_dicts_keep_the_predict_json_shape():
    plain = TaskPrediction("a", [("cat", 0.75), ("dog", 0.25)])
    assert plain.to_dict() == {
        "task": "a",
        "top": [{"class": "cat", "probability": 0.75}, {"class": "dog", "probability": 0.25}],
    }
    routed = TaskPrediction("a", [("cat", 1.0)], 0.9, routed=True, routed_by="prototypes")
    assert routed.to_dict() | {"top": None} == {
        "task": "a",
        "top": None,
        "confidence": 0.9,
        "routed_by": "prototypes",
    }


# -- routing ------------------------------------------------------------------------------------


def coloured(seed: int, colour: int, count: int) -> torch.Tensor:
    """Noisy images dominated by one colour channel: a clearly separated 'domain' per colour."""
    images = 0.3 * torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    images[:, colour] += 2.0
    return images


def routed_model() -> PiggybackModel:
    """Tasks 'red' and 'blue' with prototypes fitted on images of their own colour."""
    model = tasks_model(("red", "blue"))
    for colour, task in ((0, "red"), (2, "blue")):
        images = coloured(10 + colour, colour, 24)
        labels = torch.arange(24) % 3
        batches = [(images[:12], labels[:12]), (images[12:], labels[12:])]
        model.task(task).routing = fit_routing_profile(model, batches, dict(PREPROCESS))
    return model


def test_auto_routes_each_image_to_the_task_of_its_domain(tmp_path):
    model = routed_model()
    profile = model.task("red").routing
    assert profile.prototypes.shape == (3, 16) and profile.images == 24
    predictor = Predictor(model)
    reds, blues = coloured(1, 0, 6), coloured(2, 2, 6)
    images = torch.cat([reds, blues])[torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])]
    answers = predictor.predict(images, "auto", top_k=3)
    assert [a.task for a in answers] == ["red", "blue"] * 6
    assert all(a.routed and a.routed_by == "prototypes" and a.confidence > 0.5 for a in answers)
    for answer, image in zip(answers, images, strict=True):  # answered as the task would
        expected = reference(model, answer.task, image[None])[0]
        assert torch.allclose(torch.tensor(probabilities(answer)), expected, atol=1e-6)
    mixed = predictor.predict(images[:3], ["blue", "auto", "red"])
    model.task("red").routing.preprocess = PREPROCESS | {"image_size": 12, "resize_size": 14}
    routing_input = preprocess_key(model.task("red").routing.preprocess)
    assert routing_input in Predictor(model).prepare(picture_of(0), "auto").inputs
    assert [(a.task, a.routed) for a in mixed] == [("blue", False), ("blue", True), ("red", False)]


def test_routing_prototypes_are_saved_in_the_task_file(tmp_path):
    model = routed_model()
    directory = model.save_pretrained(tmp_path / "model")
    predictor = load(directory)
    for task in ("red", "blue"):
        saved = predictor.model.task(task).routing
        original = model.task(task).routing
        assert saved.preprocess == original.preprocess and saved.images == original.images
        assert torch.equal(saved.prototypes, original.prototypes)
        assert saved.prototypes.dtype == torch.float16  # in memory as in the file
    answers = predictor.predict(coloured(3, 2, 4), "auto")
    assert {a.task for a in answers} == {"blue"}


def test_malformed_routing_data_is_refused(tmp_path):
    path = routed_model().save_task(tmp_path / "red.safetensors", "red")
    meta, tensors = read_task_file(path)
    tensors["routing/prototypes"] = torch.ones(4, dtype=torch.float16)  # not classes x features
    meta["checksum"] = content_checksum(meta, tensors)  # consistent: only its routing is wrong
    save_file(tensors, str(path), metadata={"piggyback": json.dumps(meta)})
    with pytest.raises(TaskFileError, match="malformed routing data"):
        tasks_model(("x",)).load_task(path)


def test_tasks_without_prototypes_route_by_entropy_and_say_so():
    model = tasks_model(("a", "b"))
    predictor = Predictor(model)
    images = batch(6, count=5)
    with pytest.warns(NoRoutingProfileWarning, match=r"\['a', 'b'\].*route-fit"):
        answers = predictor.predict(images, "auto", top_k=3)
    probs = {task: reference(model, task, images) for task in ("a", "b")}
    for index, answer in enumerate(answers):
        assert answer.routed and answer.routed_by == "entropy"
        entropy = {
            t: float(-(p[index] * p[index].log()).sum() / torch.log(torch.tensor(3.0)))
            for t, p in probs.items()
        }
        assert answer.task == min(entropy, key=entropy.get)
        assert answer.confidence == pytest.approx(1 - entropy[answer.task], abs=1e-5)
        assert torch.allclose(torch.tensor(probabilities(answer)), probs[answer.task][index])


def test_stratified_subset_keeps_every_class():
    labels = [0] * 50 + [1] * 3 + [2] * 10
    chosen = stratified_subset(labels, 9)
    assert len(chosen) == 9 and {labels[i] for i in chosen} == {0, 1, 2}
    assert chosen == stratified_subset(labels, 9)  # seeded
    assert stratified_subset(labels, None) == list(range(len(labels)))


def test_many_classes_are_merged_into_at_most_max_prototypes():
    points = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    points = torch.cat([points, -points])  # 80 directions, in pairs of opposites
    centres = spherical_kmeans(points, 5)
    assert centres.shape == (5, 8)
    assert torch.allclose(centres.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.equal(centres, spherical_kmeans(points, 5))  # seeded


# -- threads ------------------------------------------------------------------------------------


def test_concurrent_calls_with_different_tasks_equal_sequential_calls(tmp_path):
    predictor = load(saved_tasks(tmp_path), max_cached_tasks=1)
    images = {task: batch(seed, count=3) for seed, task in enumerate(TASKS)}
    expected = {task: predictor.predict(images[task], task, top_k=3) for task in TASKS}
    mixed = ["a", "b", "c"]
    expected_mixed = predictor.predict(images["a"], mixed, top_k=3)
    failures: list[str] = []

    def work(task: str) -> None:
        for _ in range(5):
            if predictor.predict(images[task], task, top_k=3) != expected[task]:
                failures.append(task)
            if predictor.predict(images["a"], mixed, top_k=3) != expected_mixed:
                failures.append("mixed")

    threads = [threading.Thread(target=work, args=(task,)) for task in TASKS * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert predictor.cache_info().misses > 3  # one cached task: the threads kept evicting


def test_a_task_loaded_while_routing_bypasses_the_heads_gets_a_real_head(tmp_path):
    """Routing runs the backbone with nn.Identity in the head slots; a task loaded by another
    thread meanwhile waits for that pass instead of copying the Identity as its head."""
    model = routed_model()
    path = model.save_task(tmp_path / "red.safetensors", "red")
    predictor = Predictor(model)
    loaded: list[str] = []
    waiting: list[threading.Thread] = []

    def load_during_the_pass(*_: object) -> None:
        if not waiting:  # once: the pass over the stem is inside backbone_features
            thread = threading.Thread(target=lambda: loaded.append(predictor.load_task(path, "x")))
            waiting.append(thread)
            thread.start()
            thread.join(timeout=0.3)  # it cannot finish while this pass holds the heads

    hook = model.backbone.stem.register_forward_hook(load_during_the_pass)
    answers = predictor.predict(coloured(1, 0, 2), "auto")
    hook.remove()
    waiting[0].join()
    assert loaded == ["x"] and {a.task for a in answers} == {"red"}
    reds = coloured(2, 0, 3)
    assert predictor.predict(reds, "x") == [
        replace(answer, task="x") for answer in predictor.predict(reds, "red")
    ]


def test_a_source_changed_while_its_tensors_are_computed_is_not_cached_as_current():
    """Versions are read before computing: an in-place change made meanwhile (training in
    another thread) makes the next lookup recompute instead of serving the older result."""
    from piggyback.task_cache import TaskCache

    cache, score = TaskCache(max_tasks=2), torch.zeros(3)

    def compute_while_changed() -> list[torch.Tensor]:
        result = [score * 2]
        score.add_(1)  # changed after it was read
        return result

    cache.get("t", [score], compute_while_changed)
    assert cache.get("t", [score], lambda: [score * 2])[0].tolist() == [2.0, 2.0, 2.0]
    assert cache.info().misses == 2
