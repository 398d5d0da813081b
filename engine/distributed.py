"""Several processes under torchrun: the process group, the rank's device, and what the ranks
exchange. A plain `python -m ...` is one process and none of this sets anything up.

    torchrun --nproc-per-node N -m engine.infer ...
"""

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank() -> int:
    """This process's rank: 0 when not under torchrun. Known before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_processes(device: torch.device) -> int:
    """How many processes a job on this machine runs: one per GPU, else one."""
    return torch.cuda.device_count() if device.type == "cuda" else 1


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) for the block, if torchrun
    started this process; yields the device this rank computes on (its own GPU)."""
    if "WORLD_SIZE" not in os.environ:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def from_rank_0(make: Callable[[], T]) -> T:
    """`make()`, run by rank 0 alone; every rank gets its result."""
    if not dist.is_initialized():
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(counts: list[int], device: torch.device, poll: Callable[[], None]
                   ) -> list[int]:
    """The counts summed over every rank, once all have got here (a barrier). `poll` runs
    every half second meanwhile, so that a rank done early still reports and can be
    cancelled while the others work."""
    if not dist.is_initialized():
        return counts
    total = torch.tensor(counts, dtype=torch.int64, device=device)  # nccl reduces on the GPU
    work = dist.all_reduce(total, async_op=True)
    while not work.is_completed():
        poll()
        time.sleep(0.5)
    work.wait()
    return total.tolist()
