"""Task files and model indexes whose metadata has values of the wrong type or size (checksums
made consistent, as by someone editing them, or absent in version-1 indexes) are refused when
read, with the field named, instead of loading and failing later or escaping as a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_export import PREPROCESS
from test_model_directory import edit_index, load
from test_model_directory import model_dir as model_dir  # a fixture, used by name
from test_serialization import make_model, trained

from piggyback import PiggybackConfig, Predictor, TaskFileError, fileio, taskfile
from piggyback.describe import describe_model_dir, format_description
from piggyback.routing import PROTOTYPES_KEY, RoutingProfile

# -- task files ----------------------------------------------------------------------------------


@pytest.fixture
def task_path(tmp_path, images) -> Path:
    """Task "t" of TinyCNN (3 classes, 16 features) with preprocessing and routing prototypes."""
    model = trained(images)
    state = model.task("t")
    state.metadata.preprocess = dict(PREPROCESS)
    state.routing = RoutingProfile(torch.randn(3, 16), dict(PREPROCESS), images=6)
    return model.save_task(tmp_path / "t.safetensors", "t")


def rewritten(path: Path, change_meta=None, change_tensors=None) -> Path:
    meta, tensors = taskfile.read_task_file(path)
    (change_meta or (lambda m: None))(meta)
    (change_tensors or (lambda t: None))(tensors)
    meta["checksum"] = fileio.content_checksum(meta, tensors)
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata={"piggyback": json.dumps(meta)})
    return out


def assert_refused(path: Path, match: str) -> None:
    model = make_model()
    with pytest.raises(TaskFileError, match=match):
        model.load_task(path)
    assert model.tasks == []


def test_the_unedited_task_file_loads_and_routes(task_path):
    model = make_model()
    model.load_task(task_path)
    assert len(Predictor(model).predict(torch.randn(2, 3, 16, 16), "auto")) == 2


@pytest.mark.parametrize("value", [["float16"], {"dtype": "float16"}, 16])
def test_a_head_dtype_that_is_not_a_name_is_refused(task_path, value):
    path = rewritten(task_path, lambda meta: meta.update(head_dtype=value))
    assert_refused(path, r"'head_dtype' must be null or a dtype name, found")


@pytest.mark.parametrize("value", [10**30, 7])
def test_a_class_count_other_than_the_heads_is_refused(task_path, value):
    path = rewritten(task_path, lambda meta: meta.update(num_classes=value))
    assert_refused(path, rf"'num_classes' is {value}, but its head tensors have \[3\] outputs")


@pytest.mark.parametrize(
    "value",
    ["x", [1], 5, PREPROCESS | {"image_size": "big"}, PREPROCESS | {"mean": [0.5]}, {"x": 1}],
)
def test_a_malformed_preprocessing_record_is_refused_when_loaded(task_path, value):
    path = rewritten(task_path, lambda meta: meta["info"].update(preprocess=value))
    assert_refused(path, r"'info.preprocess' is malformed")


def test_info_reports_a_malformed_preprocessing_record_as_that_tasks_error(tmp_path, images):
    model = trained(images)
    model.task("t").metadata.preprocess = "x"  # written as it is, refused when read
    directory = model.save_pretrained(tmp_path / "model")
    description = describe_model_dir(directory)
    assert "'info.preprocess' is malformed" in description["tasks"]["t"]["error"]
    assert "error" in format_description(description)


def test_routing_prototypes_of_another_feature_width_are_refused(task_path):
    def transpose(tensors):
        tensors[PROTOTYPES_KEY] = tensors[PROTOTYPES_KEY].T.contiguous()

    path = rewritten(task_path, change_tensors=transpose)
    assert_refused(path, r"routing prototypes have 3 features, but this backbone gives 16")


# -- model indexes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "key", "value", "match"),
    [
        ("config", "include", [3], r"invalid 'config' \(include must be glob patterns"),
        ("config", "layer_types", [1], r"invalid 'config' \(layer_types must be a non-empty"),
        ("config", "layer_types", 7, r"invalid 'config' \(layer_types must be a list of strings"),
        ("config", "head", 5, r"invalid 'config' \(head must be a module name"),
        ("backbone", "spec", "timm", r"'backbone.spec' must be an object or null, found 'timm'"),
        ("backbone", "num_masked", "many", r"'backbone.num_masked' must be a whole number"),
        ("backbone", "num_masked", None, r"'backbone.num_masked' must be a whole number"),
        ("backbone", "head", ["fc"], r"'backbone.head' must be a string or null"),
    ],
)
def test_index_values_of_the_wrong_type_are_refused_naming_the_field(
    model_dir, where, key, value, match
):
    edit_index(model_dir, lambda index: index[where].update({key: value}))
    with pytest.raises(TaskFileError, match=match):
        load(model_dir)
    with pytest.raises(TaskFileError, match=match):
        describe_model_dir(model_dir)


def test_one_string_in_the_index_config_is_one_entry_as_in_code(model_dir):
    edit_index(model_dir, lambda index: index["config"].update(exclude="no_such_layer"))
    assert load(model_dir).config.exclude == ("no_such_layer",)  # not its letters
    assert PiggybackConfig(exclude="no_such_layer").exclude == ("no_such_layer",)
    assert describe_model_dir(model_dir)["config"]["exclude"] == ["no_such_layer"]


@pytest.mark.parametrize("value", [{}, {"image_size": 16}, PREPROCESS | {"std": "x"}])
def test_an_incomplete_routing_preprocessing_record_is_refused(task_path, value):
    path = rewritten(task_path, lambda meta: meta["routing"].update(preprocess=value))
    assert_refused(path, r"'routing.preprocess' is malformed")
