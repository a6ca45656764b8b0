"""PiggybackConfig: what it accepts and what it refuses before a model is built."""

from __future__ import annotations

import math

import pytest

from piggyback import PiggybackConfig, PiggybackModel


@pytest.mark.parametrize(
    ("key", "value"), [("include", "stem"), ("exclude", "stem"), ("layer_types", "conv")]
)
def test_a_single_string_is_one_entry_not_a_list_of_its_letters(key, value):
    assert getattr(PiggybackConfig(**{key: value}), key) == (value,)


def test_a_module_excluded_by_a_single_string_is_not_masked(tiny_cnn):
    model = PiggybackModel(tiny_cnn, PiggybackConfig(exclude="stem"))
    names = [target.name for target in model.targets]
    assert "stem.weight" not in names and "depthwise.weight" in names


@pytest.mark.parametrize("key", ["threshold", "init_value"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0.1", None])
def test_thresholds_and_initial_scores_must_be_finite_numbers(key, value):
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):
        PiggybackConfig(**{key: value})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"include": ["stem", 3]}, r"include must be glob patterns \(strings\)"),
        ({"exclude": [None]}, r"exclude must be glob patterns \(strings\)"),
        ({"layer_types": [["conv"]]}, r"layer_types must be a non-empty subset"),
        ({"head": 5}, r"head must be a module name \(a string\) or None"),
    ],
)
def test_entries_of_the_wrong_type_are_refused_with_the_setting_named(change, match):
    with pytest.raises(ValueError, match=match):
        PiggybackConfig(**change)
