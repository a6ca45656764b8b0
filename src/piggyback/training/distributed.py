"""Several processes (GPUs) training one task: `torchrun --nproc-per-node N -m piggyback.cli train`.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; each process then takes one GPU (NCCL) or, without
GPUs, runs on the CPU (gloo, which is also how this is tested). Training uses PyTorch's
DistributedDataParallel; each process sees its own shard of every epoch's shuffled order and of
the evaluation sets, and evaluation counts are summed over processes. Only process 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run (1 process when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over all processes."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def start(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the process group torchrun describes (if any); returns this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(), device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(int(os.environ["RANK"]), world_size, local_rank, owns_group), device


def stop(processes: Processes) -> None:
    if processes.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class EpochShuffle(Sampler[int]):
    """Every epoch a fresh order seeded by (seed, epoch); process r takes every world-th index.

    The order depends only on the seed and epoch, which keeps resumed runs identical; the shards
    are cut to equal length so that all processes take the same number of steps.
    """

    def __init__(self, size: int, processes: Processes) -> None:
        self.size, self.processes = size, processes
        self.seed = 0

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def _indices(self) -> list[int]:
        order = np.random.default_rng(self.seed).permutation(self.size)
        per_process = self.size // self.processes.world_size
        return order[self.processes.rank :: self.processes.world_size][:per_process].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return self.size // self.processes.world_size


class Shard(Sampler[int]):
    """Evaluation order, split over processes without padding (counts are summed afterwards)."""

    def __init__(self, size: int, processes: Processes) -> None:
        self.indices = list(range(processes.rank, size, processes.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
