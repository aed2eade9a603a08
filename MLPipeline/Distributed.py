"""Several processes: `torchrun --nproc_per_node=N engine.py ...` starts N copies of the program with RANK,
WORLD_SIZE and LOCAL_RANK set. Each takes its share of the images; rank 0 alone logs progress and writes.

The recipe calls `start_distributed` once and asks `is_main_process()` before writing; everything else
goes through PyTorch's own pieces (DistributedSampler, DistributedDataParallel, all_gather_object).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from MLPipeline.Common import log


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


def sharded(run: Callable[[list], tuple[torch.Tensor, list[int], dict[str, str]]], batch_size: int):
    """`run(items) -> (outputs, positions of the items that worked, {item: why it failed})` split across the
    job: each process runs every N-th batch of batch_size items, and every process gets everyone's results in
    the items' order. Whole batches, so that each item is computed in the same batch as in one process: the
    same outputs to the last bit (a network's rounding depends on the batch). In one process it is `run`."""
    if world()[1] == 1:
        return run

    def run_sharded(items: list) -> tuple[torch.Tensor, list[int], dict[str, str]]:
        rank, size = world()
        mine = [position for position in range(len(items)) if position // batch_size % size == rank]
        outputs, positions, failed = run([items[i] for i in mine])
        parts = gather((outputs.cpu(), [mine[p] for p in positions], failed))
        positions = [position for _, part_positions, _ in parts for position in part_positions]
        order = torch.tensor(positions).argsort(stable=True) if positions else torch.zeros(0, dtype=torch.long)
        non_empty = [part for part, _, _ in parts if len(part)] or [parts[0][0]]  # an empty part has no width
        outputs = torch.cat(non_empty)[order]
        failed = {item: why for _, _, part_failed in parts for item, why in part_failed.items()}
        return outputs, sorted(positions), failed
    return run_sharded


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under torchrun, `module` wrapped in DistributedDataParallel, which averages the processes' gradients
    at each step; else `module` itself. Buffers are not broadcast: the head has none, and the backbone's
    BatchNorm keeps its pretrained statistics, the same in every process."""
    if world()[1] == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                     broadcast_buffers=False)
