"""Thresholds and their straight-through gradients."""

import pytest
import torch

from piggyback.config import PiggybackConfig
from piggyback.mask_kinds import get_mask_kind
from piggyback.masks import BinaryMask, TernaryMask


def threshold_scores(scores, kind, threshold):
    return get_mask_kind(kind).mask(scores, PiggybackConfig(threshold=threshold, init_value=1.0))


def test_binary_threshold_values():
    scores = torch.tensor([-1.0, 0.0, 5e-3, 5.0001e-3, 1e-2])
    assert BinaryMask.apply(scores, 5e-3).tolist() == [0, 0, 0, 1, 1]


def test_ternary_threshold_values():
    scores = torch.tensor([-1.0, -1e-9, 0.0, 5e-3, 6e-3])
    assert TernaryMask.apply(scores, 5e-3).tolist() == [-1, -1, 0, 0, 1]


def test_straight_through_gradient_by_hand():
    # W' = W * mask(s); L = sum(c * W'). dL/dW' = c, and straight-through: dL/ds = dL/dmask = c * W.
    weight = torch.tensor([[2.0, -3.0], [0.5, 4.0]])
    scores = torch.tensor([[1e-2, 1e-3], [-1.0, 2e-2]], requires_grad=True)
    c = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    loss = (c * weight * threshold_scores(scores, "binary", 5e-3)).sum()
    loss.backward()
    expected = torch.tensor([[2.0, -6.0], [1.5, -4.0]])
    assert torch.equal(scores.grad, expected)
    assert loss.item() == pytest.approx(1 * 2.0 + (-1) * 4.0)  # only the two scores above 5e-3


def test_ternary_gradient_is_straight_through():
    scores = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    (threshold_scores(scores, "ternary", 5e-3) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0]


def test_masks_work_under_torch_func_transforms():
    # Modern static autograd.Functions (setup_context + generate_vmap_rule), so vmap works.
    scores = torch.randn(3, 4)
    out = torch.vmap(lambda s: BinaryMask.apply(s, 0.0))(scores)
    assert torch.equal(out, (scores > 0).float())


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_codes_round_trip(kind):
    scores = torch.randn(100)
    mask = threshold_scores(scores, kind, 0.1)
    strategy = get_mask_kind(kind)
    assert torch.equal(strategy.from_codes(strategy.to_codes(mask), torch.float32), mask)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_scores_rebuilt_from_a_mask_give_that_mask_back(kind):
    config = PiggybackConfig(mask_kind=kind)
    strategy = get_mask_kind(kind)
    mask = strategy.mask(torch.randn(200) * 1e-2, config)
    assert torch.equal(strategy.mask(strategy.scores_from_mask(mask, config), config), mask)


def test_init_scores_ones_and_uniform():
    init_scores = get_mask_kind("binary").init_scores
    ones = init_scores(torch.Size([3, 4]), PiggybackConfig(), None)
    assert torch.all(ones == 1e-2)
    config = PiggybackConfig(init="uniform")
    a = init_scores(torch.Size([1000]), config, torch.Generator().manual_seed(0))
    b = init_scores(torch.Size([1000]), config, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= -1e-2 and a.max() <= 1e-2 and a.std() > 1e-3


def test_config_refuses_settings_that_would_start_masked_out():
    with pytest.raises(ValueError, match="init_value"):
        PiggybackConfig(init_value=1e-3, threshold=5e-3)
    with pytest.raises(ValueError, match="mask_kind"):
        PiggybackConfig(mask_kind="quaternary")
    with pytest.raises(ValueError, match="layer_types"):
        PiggybackConfig(layer_types=("lstm",))
    with pytest.raises(ValueError, match="unknown PiggybackConfig keys"):
        PiggybackConfig.from_dict({"treshold": 1})


def test_config_json_round_trip():
    config = PiggybackConfig(mask_kind="ternary", include=("layer*",), exclude=("fc",))
    assert PiggybackConfig.from_dict(config.to_dict()) == config
