"""Optimizer and learning-rate schedule of a run, one parameter group per role.

The paper trains the scores and the head with separate Adam optimizers; one optimizer with one
group per role (scores / head / norms / backbone) is the same thing with one state to checkpoint.
The schedule is a closed-form step decay (LambdaLR), so its state is a few numbers that resume
exactly.
"""

from __future__ import annotations

from bisect import bisect_right
from functools import partial

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from piggyback.model import PiggybackModel
from piggyback.training.recipe import TrainConfig


def group_lr(name: str, config: TrainConfig) -> float:
    """Learning rate of a parameter group: scores, head (and norms) or the fine-tuned backbone."""
    if name == "scores":
        return config.lr_scores
    if name in ("head", "norms"):
        return config.lr_head
    return config.lr


def build_optimizer(model: PiggybackModel, config: TrainConfig) -> Optimizer:
    groups = [
        {**group, "lr": group_lr(group["name"], config)}
        for group in model.trainable_parameters(config.task)
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)


def step_factor(epoch: int, milestones: tuple[int, ...], factor: float) -> float:
    """factor ** (number of milestones reached by `epoch`)."""
    return factor ** bisect_right(milestones, epoch)


def build_scheduler(optimizer: Optimizer, config: TrainConfig) -> LambdaLR:
    """Step decay by `lr_decay_factor` at each of `lr_decay_epochs` (stepped once per epoch)."""
    rule = partial(
        step_factor, milestones=tuple(config.lr_decay_epochs), factor=config.lr_decay_factor
    )
    return LambdaLR(optimizer, rule)


def change_learning_rates(
    optimizer: Optimizer, scheduler: LambdaLR, config: TrainConfig
) -> dict[str, tuple[float, float]]:
    """Give a restored optimizer and schedule `config`'s learning rates, keeping the schedule's
    position (the decay already reached still applies). Returns {group: (old, new)} base rates
    of the groups that changed; nothing changes when the rates are those of the checkpoint."""
    changed = {}
    for index, group in enumerate(optimizer.param_groups):
        old, new = scheduler.base_lrs[index], group_lr(group["name"], config)
        if old == new:
            continue
        changed[group["name"]] = (old, new)
        scheduler.base_lrs[index] = group["initial_lr"] = new
        group["lr"] = new * scheduler.lr_lambdas[index](scheduler.last_epoch)
    return changed
