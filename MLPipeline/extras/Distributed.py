"""Several processes: `torchrun --nproc_per_node=N engine.py ...` starts N copies of the program with RANK,
WORLD_SIZE and LOCAL_RANK set. Each takes its share of the images; rank 0 alone logs progress and writes.

train() joins the job once, at its top, where it also wraps the trained network in DistributedDataParallel;
everything else goes through PyTorch's own pieces (DistributedSampler, all_gather_object).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from MLPipeline.extras.Common import log


def world() -> tuple[int, int]:
    """(this process's rank, number of processes) in the job it has joined: (0, 1) until start_distributed()
    (a process that never joins, e.g. predicting with an .onnx file, works alone on everything)."""
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main_process() -> bool:
    return world()[0] == 0


def start_distributed(device: torch.device) -> torch.device:
    """Join the torchrun job, if there is one (NCCL on GPUs, Gloo on CPUs); returns this process's device.

    Every process but rank 0 logs warnings only, so progress is printed once.
    """
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if size == 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=
                                         device if device.type == "cuda" else None)
    if rank != 0:
        log.setLevel(logging.WARNING)
    return device


def gather(item) -> list:
    """Every process's `item` (any picklable value), in rank order; [item] in a single process."""
    if not torch.distributed.is_initialized():
        return [item]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, item)
    return gathered


def my_share(count: int, batch_size: int) -> list[int]:
    """The positions of `count` items that this process computes: every N-th whole batch of batch_size (all of
    them in one process). Whole batches, so that each item is computed in the same batch as in one process:
    the same outputs to the last bit (a network's rounding depends on the batch)."""
    rank, size = world()
    return list(range(count)) if size == 1 else [p for p in range(count) if p // batch_size % size == rank]


def gather_shares(outputs: torch.Tensor, positions: list[int], failed: dict[str, str],
                  ) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """Every process's (outputs, positions of the items that worked, {item: why it failed}) of its share, put
    together in the items' order; in one process, what it was given."""
    if world()[1] == 1:
        return outputs, positions, failed
    parts = gather((outputs.cpu(), positions, failed))
    positions = [position for _, part_positions, _ in parts for position in part_positions]
    order = torch.tensor(positions).argsort(stable=True) if positions else torch.zeros(0, dtype=torch.long)
    non_empty = [part for part, _, _ in parts if len(part)] or [parts[0][0]]  # an empty part has no width
    failed = {item: why for _, _, part_failed in parts for item, why in part_failed.items()}
    return torch.cat(non_empty)[order], sorted(positions), failed


def sharded(run: Callable[[list], tuple[torch.Tensor, list[int], dict[str, str]]], items: list, batch_size: int,
            ) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """`run(items) -> (outputs, positions of the items that worked, {item: why it failed})`, split across the
    job (my_share) and put together again (gather_shares): every process gets everyone's results."""
    mine = my_share(len(items), batch_size)
    outputs, positions, failed = run([items[position] for position in mine])
    return gather_shares(outputs, [mine[position] for position in positions], failed)


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under torchrun, `module` wrapped in DistributedDataParallel, which averages the processes' gradients
    at each step; else `module` itself. Buffers are not broadcast: BatchNorm keeps its pretrained
    statistics, the same in every process."""
    if world()[1] == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                     broadcast_buffers=False)
